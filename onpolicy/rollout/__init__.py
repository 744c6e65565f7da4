"""Rollout workers: vLLM engines sampling the student (importing this imports neither vLLM nor torch)."""

from onpolicy.rollout.engine import VLLMEngine, vllm_env
from onpolicy.rollout.worker import RolloutWorker, make_rollout_workers

__all__ = ["RolloutWorker", "VLLMEngine", "make_rollout_workers", "vllm_env"]

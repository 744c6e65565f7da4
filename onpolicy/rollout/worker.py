"""`RolloutWorker`: a Ray actor that owns one `VLLMEngine` (a thin shell; logic is in engine.py).

Ray and vLLM are imported lazily: importing this module costs nothing, and the class is turned
into an actor only in `make_rollout_workers`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from onpolicy.engines.vllm import vllm_env
from onpolicy.model_dir import engine_dtype, require_model_dir
from onpolicy.ray_utils import actor_class
from onpolicy.types import Rollout, RolloutBatch, ScoreRequestItem, WeightUpdate

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from onpolicy.config import RunConfig


class RolloutWorker:
    """Actor body: every method forwards to the engine. Call through `.remote()`."""

    def __init__(self, model_path: str, threads: int = 0, **engine_kwargs: Any) -> None:
        if threads > 0:  # before vLLM starts (it refuses to change the thread count afterwards)
            import torch

            torch.set_num_threads(threads)
        from onpolicy.rollout.engine import VLLMEngine

        self.engine = VLLMEngine(model_path, **engine_kwargs)

    def ready(self) -> bool:
        """Returns once the engine is up (actor start-up is asynchronous)."""
        return True

    def pid(self) -> int:
        return os.getpid()

    def version(self) -> int:
        return self.engine.version

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def generate(self, prompts: list[list[int]], **kwargs: Any) -> list[Rollout]:
        return self.engine.generate(prompts, **kwargs)

    def sample(self, prompts: list[list[int]], **kwargs: Any) -> RolloutBatch:
        """`generate`, with the version sampled from and the engine's busy seconds (for the pipeline's metrics)."""
        t0 = time.perf_counter()
        rollouts = self.engine.generate(prompts, **kwargs)
        return RolloutBatch(rollouts=rollouts, policy_version=self.engine.version, seconds=time.perf_counter() - t0)

    def score(self, items: list[ScoreRequestItem]) -> list[list[float]]:
        return self.engine.score(items)

    def load_weights(self, update: WeightUpdate) -> int:
        return self.engine.load_weights(update)

    def open_sync(self, address: str, port: int, rank: int, world: int, meta, timeout_s: float) -> bool:
        """Join the learner's weight-sync group as `rank` (see engines/collective.py)."""
        import torch

        from onpolicy.engines.collective import open_group

        self._sync_meta = meta
        self._sync = open_group(address, port, rank, world, torch.device("cpu"), timeout_s)
        return True

    def receive_weights(self) -> int:
        """Take the learner's next broadcast and serve it; returns its version."""
        import torch

        from onpolicy.engines.collective import receive

        version, tensors = receive(self._sync, self._sync_meta, torch.device("cpu"))
        return self.engine.load_tensors(version, tensors)


def make_rollout_workers(
    n: int, model_path: str, cfg: RunConfig, *, max_model_len: int | None = None, seed_offset: int = 0
) -> list[ActorHandle]:
    """Start `n` rollout workers serving `model_path`; blocks until every engine is up.

    Worker i's engine is seeded with `cfg.seed + seed_offset + i`, so unseeded sampling differs per worker
    (`seed_offset`: the index of a worker made again to replace one that died).
    """
    import ray

    # Fail here, naming the path, rather than inside n actors; workers may not share our cwd.
    model_path = str(require_model_dir(model_path, "student"))
    res = cfg.resources
    workers = [
        actor_class(RolloutWorker).options(
            num_cpus=res.worker_num_cpus,
            runtime_env={"env_vars": vllm_env(res.vllm_kv_cache_gib, res.vllm_threads_bind)},
            max_restarts=res.max_restarts,
        ).remote(
            model_path,
            threads=cfg.threads()["rollout"],
            dtype=engine_dtype(model_path, cfg.model.dtype),
            lora_rank=cfg.model.lora.rank if cfg.model.lora is not None else None,
            seed=cfg.seed + seed_offset + i,
            kv_cache_gib=res.vllm_kv_cache_gib,
            threads_bind=res.vllm_threads_bind,
            max_model_len=max_model_len,
            tensor_parallel_size=cfg.rollout.tensor_parallel_size,
        )
        for i in range(n)
    ]
    ray.get([w.ready.remote() for w in workers])
    return workers

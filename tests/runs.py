"""The reference run: one config, run once undisturbed (`reference_run` in conftest.py) and again with a
fault (tests/test_faults.py) or with two learner ranks (tests/test_learner_group.py), so the variants are
compared against the same yardstick instead of each starting an undisturbed twin of its own.

1 rollout worker, the local HF teacher, 16 steps of 32 prompts, an evaluation every 8 steps, a checkpoint
every 4 (the fault test kills the learner after the one at step 8)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onpolicy.config import RunConfig, load_config
from onpolicy.types import ScoreRequestItem

STEPS = 16
PROMPTS = 32
EVAL_EVERY = 8
CHECKPOINT_EVERY = 4
# Fixed sequences scored by the engines and the learner once the run is over (weights in sync).
FIXED = [ScoreRequestItem(prompt_ids=[1, 5, 6, 14, 7, 15], completion_ids=[9, 4, 2]),
         ScoreRequestItem(prompt_ids=[1, 13, 14, 13, 15], completion_ids=[5, 12, 10, 11, 2])]


def reference_cfg(student: str | Path, teacher: str | Path, out: str | Path, *extra: str) -> RunConfig:
    return load_config(None, [
        f"model.student={student}", f"teacher.model={teacher}", f"output_dir={out}",
        "rollout.num_workers=1", f"rollout.prompts_per_step={PROMPTS}", "rollout.max_new_tokens=6",
        "optim.lr=0.003", "optim.warmup_steps=0", "optim.schedule=constant", "optim.micro_batch_size=16",
        f"schedule.steps={STEPS}", f"eval.every={EVAL_EVERY}", "eval.num_prompts=64", "eval.ood_num_prompts=16",
        f"checkpoint.every={CHECKPOINT_EVERY}", "checkpoint.keep=2", "resources.restart_timeout_s=300", *extra,
    ])


@dataclass
class ReferenceRun:
    out: Path
    summary: dict[str, Any]
    collective: bool  # the run pushed its weights by broadcast (rollout.weight_sync=auto formed the group)
    push_by: str  # how the last push went
    worker_versions: list[int]  # the version each engine served once the run was over
    engine_logprobs: list[list[list[float]]]  # per worker: log-probs of FIXED
    learner_logprobs: list[list[float]]


def finish_reference(student: str | Path, teacher: str | Path, out: Path) -> ReferenceRun:
    import ray

    from onpolicy.driver import Run

    run = Run(reference_cfg(student, teacher, out), show_progress=False)
    try:
        summary = run.run()
        return ReferenceRun(
            out=out, summary=summary, collective=run.sync.collective, push_by=run.pushed.by,
            worker_versions=ray.get([w.version.remote() for w in run.workers]),
            engine_logprobs=ray.get([w.score.remote(FIXED) for w in run.workers]),
            learner_logprobs=ray.get(run.learner.score.remote(FIXED)),
        )
    finally:
        run.close()

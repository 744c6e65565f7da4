"""`onpolicy eval`: score any student folder against the configured teacher on the held-out splits."""

from __future__ import annotations

from onpolicy.config import RunConfig


def eval_student(cfg: RunConfig, student_dir: str) -> dict[str, float]:
    import ray
    from transformers import AutoTokenizer

    from onpolicy.data import PromptSource
    from onpolicy.driver import init_ray, require_model_dir
    from onpolicy.evaluation import evaluate
    from onpolicy.rollout.worker import make_rollout_workers
    from onpolicy.teacher.actor import make_local_teacher
    from onpolicy.teacher.fingerprint import check_compatible

    student = require_model_dir(student_dir, "student")
    teacher_path = require_model_dir(cfg.teacher.model, "teacher")
    check_compatible(student, teacher_path)
    init_ray()
    workers = make_rollout_workers(1, student, cfg)
    teacher = make_local_teacher(cfg)
    try:
        source = PromptSource(cfg.data, cfg.eval, cfg.seed)
        return evaluate(workers, teacher, AutoTokenizer.from_pretrained(student), source.heldout, source.ood,
                        max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed + 12345)
    finally:
        for w in workers:
            ray.kill(w)

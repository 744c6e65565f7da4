"""`onpolicy eval`: score any student folder against the configured teacher (any `teacher.kind`) on the
held-out splits, with one rollout worker."""

from __future__ import annotations

from onpolicy.config import RunConfig


def eval_student(cfg: RunConfig, student_dir: str) -> dict[str, float]:
    from onpolicy.chat import load_student_tokenizer, stop_token_ids
    from onpolicy.data import PromptSource
    from onpolicy.heldout import eval_seed, evaluate
    from onpolicy.model_dir import require_model_dir
    from onpolicy.ray_utils import init_ray
    from onpolicy.rollout.worker import make_rollout_workers
    from onpolicy.teacher.factory import open_teacher

    student = str(require_model_dir(student_dir, "student"))
    init_ray()
    teacher = open_teacher(cfg.teacher, student=student, seed=cfg.seed, resources=cfg.resources)
    workers = []
    try:
        workers = make_rollout_workers(1, student, cfg)
        source = PromptSource(cfg.data, cfg.eval, cfg.seed)
        tokenizer = load_student_tokenizer(student, cfg.data.chat_template)
        stop = {"stop_token_ids": stop_token_ids(tokenizer, cfg.rollout.stop_tokens, source.chat)}
        return evaluate(workers, teacher, tokenizer, source.heldout, source.ood,
                        max_new_tokens=cfg.rollout.max_new_tokens, seed=eval_seed(cfg.seed), stop=stop)
    finally:
        import ray

        for w in workers:
            ray.kill(w)
        teacher.close()

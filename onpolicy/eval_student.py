"""`onpolicy eval`: score any student folder against the configured teacher (any `teacher.kind`) on the
held-out splits (and `eval.retention`'s probe sets, against the config's starting student), with one rollout
worker."""

from __future__ import annotations

from onpolicy.config import RunConfig


def eval_student(cfg: RunConfig, student_dir: str) -> dict[str, float]:
    """Held-out and OOD exact match and reverse KL of `student_dir` against `cfg`'s teacher, with the prompts,
    chat template and stop tokens a run of `cfg` uses (`stack.check`), on one rollout worker."""
    from onpolicy.heldout import eval_seed, evaluate
    from onpolicy.stack import check, open_stack

    checked = check(cfg, student=student_dir)
    stack = open_stack(cfg, checked, workers=1, learner=False)
    try:
        return evaluate(stack.workers, stack.teacher, checked.tokenizer, checked.source.heldout, checked.source.ood,
                        max_new_tokens=cfg.rollout.max_new_tokens, seed=eval_seed(cfg.seed), stop=checked.stop,
                        unseen=checked.source.unseen, retention=checked.retention)
    finally:
        stack.close()

"""Held-out evaluation: the student samples, the teacher scores, the task checks.

Two numbers per split:
- `reverse_kl`: per-token reverse KL(student || teacher) estimated from completions sampled
  from the student at temperature 1 (on its own distribution, the quantity distillation
  lowers), with the non-negative k3 estimator (see `mean_reverse_kl`).
- `accuracy`: exact match of the greedy completion against the task's answer (only when every
  example of the split has one; a data set without `data.answer_field` reports no accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onpolicy.prompts import encode_prompts, exact_match
from onpolicy.protocols import Teacher
from onpolicy.rollout.pool import generate_on
from onpolicy.teacher.scoring import score_rollouts
from onpolicy.types import Example, Rollout

# Held-out sampling uses its own seed, apart from the training stream's: the run seed plus this.
EVAL_SEED_OFFSET = 12345


def eval_seed(run_seed: int) -> int:
    return run_seed + EVAL_SEED_OFFSET



def mean_reverse_kl(rollouts: list[Rollout], teacher_logprobs: list[list[float]]) -> float:
    """Per-token reverse KL(student || teacher) from the student's own samples.

    Uses the non-negative, unbiased "k3" estimator (exp(-r) - 1 + r with r = log q - log p_T):
    same expectation as the plain mean of r, lower variance, and never below zero, so a student
    that matches its teacher reads ~0 rather than a small negative number.
    """
    num, den = 0.0, 0
    for r, t in zip(rollouts, teacher_logprobs):
        for q, p in zip(r.sampler_logprobs, t):
            diff = q - p
            num += math.expm1(-diff) + diff
        den += len(t)
    return num / max(den, 1)


@dataclass
class SplitResult:
    accuracy: float | None
    reverse_kl: float
    mean_completion_tokens: float


def evaluate_split(workers, teacher: Teacher, tokenizer, examples: list[Example], *,
                   max_new_tokens: int, seed: int, stop: dict | None = None, recover=None) -> SplitResult:
    """`stop`: extra sampling arguments that end completions (`stop_token_ids`), as in training; `recover`:
    brings a rollout worker that died back (see `rollout.pool.gather`)."""
    prompts = encode_prompts(tokenizer, examples)
    accuracy = None
    if all(e.answer is not None for e in examples):
        greedy = generate_on(workers, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed,
                             recover=recover, **(stop or {}))
        correct = sum(exact_match(tokenizer, r.completion_ids, examples[r.prompt_index]) for r in greedy)
        accuracy = correct / max(len(examples), 1)
    sampled = generate_on(workers, prompts, n=1, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                          recover=recover, **(stop or {}))
    scores = score_rollouts(teacher, sampled)
    kl = mean_reverse_kl(sampled, [s.logprobs for s in scores])
    mean_len = sum(len(r.completion_ids) for r in sampled) / max(len(sampled), 1)
    return SplitResult(accuracy=accuracy, reverse_kl=kl, mean_completion_tokens=mean_len)


def evaluate(workers, teacher: Teacher, tokenizer, heldout: list[Example], ood: list[Example], *,
             max_new_tokens: int, seed: int, stop: dict | None = None, recover=None) -> dict[str, float]:
    """Flat metrics dict: `heldout_accuracy`, `heldout_reverse_kl`, `ood_accuracy`, `ood_reverse_kl`
    (no `*_accuracy` for a split without answers)."""
    out: dict[str, float] = {}
    for name, examples in (("heldout", heldout), ("ood", ood)):
        if not examples:
            continue
        res = evaluate_split(workers, teacher, tokenizer, examples, max_new_tokens=max_new_tokens, seed=seed,
                             stop=stop, recover=recover)
        if res.accuracy is not None:
            out[f"{name}_accuracy"] = res.accuracy
        out[f"{name}_reverse_kl"] = res.reverse_kl
        out[f"{name}_completion_tokens"] = res.mean_completion_tokens
    return out

"""Held-out evaluation: the student samples, the teacher scores, the task checks.

Two numbers per split:
- `reverse_kl`: per-token reverse KL(student || teacher) estimated from completions sampled
  from the student at temperature 1 (on its own distribution, the quantity distillation
  lowers), with the non-negative k3 estimator (see `mean_reverse_kl`).
- `accuracy`: exact match of the greedy completion against the task's answer (only when every
  example of the split has one; a data set without `data.answer_field` reports no accuracy).

A mean can fall while the tail grows (the seed's warning: "loss can drop while KL on rare tokens
explodes"), so each split also logs the distribution of the per-token terms whose mean is
`reverse_kl` (`token_kl_p50/p95/p99/max`) and those terms at the *rare* tokens, where the teacher gives
the token the student sampled less than 1 % (`rare_kl`: their mean; `rare_share`: their share of the
sampled tokens). The splits are `heldout`, `ood` (a length the teacher learnt and the student did not)
and `unseen` (a length neither learnt), and each `eval.retention` probe set, scored against the frozen
starting student instead of the teacher (`onpolicy.retention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from onpolicy.prompts import encode_prompts, exact_match
from onpolicy.protocols import Teacher
from onpolicy.retention import Retention
from onpolicy.rollout.pool import generate_on
from onpolicy.teacher.scoring import can_score, score_rollouts
from onpolicy.types import Example, Rollout

# Held-out sampling uses its own seed, apart from the training stream's: the run seed plus this.
EVAL_SEED_OFFSET = 12345


def eval_seed(run_seed: int) -> int:
    return run_seed + EVAL_SEED_OFFSET



RARE_P = 0.01  # a sampled token the teacher gives less than this probability is "rare"
QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99, "max": 1.0}


def token_kl_terms(rollouts: list[Rollout], teacher_logprobs: list[list[float]]) -> tuple[list[float], list[float]]:
    """(k3 term, teacher log-prob) of every sampled token: the term is exp(-r) - 1 + r with r = log q - log p_T,
    the non-negative, unbiased "k3" estimate of KL(q || p_T) at that position (module docstring)."""
    terms, teacher = [], []
    for r, t in zip(rollouts, teacher_logprobs):
        for q, p in zip(r.sampler_logprobs, t):
            diff = q - p
            terms.append(math.expm1(-diff) + diff)
            teacher.append(p)
    return terms, teacher


def mean_reverse_kl(rollouts: list[Rollout], teacher_logprobs: list[list[float]]) -> float:
    """Per-token reverse KL(student || teacher) from the student's own samples.

    Uses the non-negative, unbiased "k3" estimator (exp(-r) - 1 + r with r = log q - log p_T):
    same expectation as the plain mean of r, lower variance, and never below zero, so a student
    that matches its teacher reads ~0 rather than a small negative number.
    """
    terms, _ = token_kl_terms(rollouts, teacher_logprobs)
    return math.fsum(terms) / max(len(terms), 1)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values` by linear interpolation between order statistics (numpy's default);
    NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def tail_stats(terms: list[float], teacher_logprobs: list[float]) -> dict[str, float]:
    """`token_kl_<q>` for the quantiles of QUANTILES, and over the tokens whose teacher probability is below
    RARE_P: `rare_kl` (their mean term; NaN when there is none) and `rare_share` (their share of all tokens)."""
    out = {f"token_kl_{name}": quantile(terms, q) for name, q in QUANTILES.items()}
    cut = math.log(RARE_P)
    rare = [k for k, p in zip(terms, teacher_logprobs) if p < cut]
    out["rare_kl"] = math.fsum(rare) / len(rare) if rare else float("nan")
    out["rare_share"] = len(rare) / len(terms) if terms else float("nan")
    return out


@dataclass
class SplitResult:
    accuracy: float | None
    reverse_kl: float
    mean_completion_tokens: float
    tail: dict[str, float] = field(default_factory=dict)  # `tail_stats` of the sampled tokens


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
    if not can_score(teacher):  # a text-only teacher returns no log-probs: exact match only
        return SplitResult(accuracy=accuracy, reverse_kl=float("nan"), mean_completion_tokens=float("nan"))
    sampled = generate_on(workers, prompts, n=1, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                          recover=recover, **(stop or {}))
    # the examples: a teacher with another tokenizer renders a conversation with its own template
    scores = score_rollouts(teacher, sampled, examples=[examples[r.prompt_index] for r in sampled])
    terms, teacher_lp = token_kl_terms(sampled, [s.logprobs for s in scores])
    kl = math.fsum(terms) / max(len(terms), 1)
    mean_len = sum(len(r.completion_ids) for r in sampled) / max(len(sampled), 1)
    return SplitResult(accuracy=accuracy, reverse_kl=kl, mean_completion_tokens=mean_len,
                       tail=tail_stats(terms, teacher_lp))


def evaluate(workers, teacher: Teacher, tokenizer, heldout: list[Example], ood: list[Example], *,
             max_new_tokens: int, seed: int, stop: dict | None = None, recover=None, unseen: list[Example] = (),
             retention: Retention | None = None) -> dict[str, float]:
    """Flat metrics dict: per split (`heldout`, `ood`, `unseen`) `<split>_accuracy`, `<split>_reverse_kl`,
    `<split>_completion_tokens` and the tail statistics `<split>_token_kl_p50` ... `<split>_rare_share` (no
    `*_accuracy` for a split without answers); per retention probe set `retention_<name>_accuracy` and
    `retention_<name>_reverse_kl` (to the starting student)."""
    out: dict[str, float] = {}
    kw = {"max_new_tokens": max_new_tokens, "seed": seed, "stop": stop, "recover": recover}
    for name, examples in (("heldout", heldout), ("ood", ood), ("unseen", list(unseen))):
        if not examples:
            continue
        res = evaluate_split(workers, teacher, tokenizer, examples, **kw)
        if res.accuracy is not None:
            out[f"{name}_accuracy"] = res.accuracy
        out[f"{name}_reverse_kl"] = res.reverse_kl
        out[f"{name}_completion_tokens"] = res.mean_completion_tokens
        out.update({f"{name}_{key}": v for key, v in res.tail.items()})
    for probe in retention.probes if retention is not None else []:
        res = evaluate_split(workers, retention.reference(), tokenizer, probe.examples, **kw)
        out[f"retention_{probe.name}_accuracy"] = res.accuracy
        out[f"retention_{probe.name}_reverse_kl"] = res.reverse_kl
    return out

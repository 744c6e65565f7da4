"""The loss registry: `loss.kind` -> the function that computes it and what it needs from the teacher.

A loss is a member of the `loss` union (onpolicy/config/loss.py: its fields, default lr, `needs_topk`,
who samples) and one registration here, which takes those facts from the member of that kind:

    @register_objective("my_loss")
    def my_loss(x: LossInputs, cfg: MyLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
        ...

A loss is a function of one position at a time: the learner hands it a chunk of N completion positions
(`LossInputs`: their logits, the learner's log-probs of the sampled tokens, and the batch's per-position
tensors) and it returns (differentiable per-position loss [N], per-position metrics [N], detached). The
learner weighs and sums the positions (token or sequence normalisation over the WHOLE batch, see
`batch.token_batch`), so the loss never needs more than one chunk's logits at once (`chunked.py`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onpolicy.config import LOSS_KINDS, Samples

if TYPE_CHECKING:  # importing the registry costs nothing: the driver reads it without torch
    import torch

    from onpolicy.config import (
        JSDLossConfig,
        ReverseKLLossConfig,
        SFTLossConfig,
        SoftTargetsLossConfig,
        TopKReverseKLLossConfig,
    )
    from onpolicy.learner.batch import TokenBatch


@dataclass(frozen=True)
class LossInputs:
    tokens: TokenBatch  # one chunk of N positions (targets, sampler/teacher log-probs, advantages, top-k)
    logits_NV: torch.Tensor  # the learner's logits there (float32; float64 when the model is)
    learner_logprobs_N: torch.Tensor  # log pi(target token), differentiable


# (inputs, the loss's config member) -> (per-position loss [N], per-position metrics [N])
LossFn = Callable[[LossInputs, Any], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class Objective:
    name: str
    fn: LossFn
    needs_topk: bool  # the teacher must return its top-k at every position (teacher.top_k > 0)
    samples: Samples  # who samples the completions: the student (on-policy), the teacher, or `lmbda` mixing


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[LossFn], LossFn]:
    """Register the function of loss `name`; what it needs (`needs_topk`, `samples`) is its config member's."""
    if name not in LOSS_KINDS.members:
        raise ValueError(f"loss {name!r} has no member in the loss union: add its config to onpolicy/config/loss.py")
    member = LOSS_KINDS.members[name]

    def add(fn: LossFn) -> LossFn:
        if name in OBJECTIVES:
            raise ValueError(f"loss {name!r} is registered twice")
        OBJECTIVES[name] = Objective(name, fn, member.needs_topk, member.samples)
        return fn

    return add


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss.kind {name!r}: registered losses are {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


@register_objective("reverse_kl")
def _reverse_kl(x: LossInputs, cfg: ReverseKLLossConfig):
    from onpolicy.learner.losses import sampled_reverse_kl

    t = x.tokens
    advantages = t.advantages_N
    if advantages is None:  # the learner passes the whole batch's (discounted, with the baseline)
        if cfg.gamma != 0.0 or cfg.baseline != "none":
            raise ValueError("reverse_kl with gamma > 0 or a baseline needs the batch's advantages (token_advantages)")
        advantages = -cfg.kl_coef * (t.sampler_logprobs_N - t.teacher_logprobs_N)
    return sampled_reverse_kl(x.learner_logprobs_N, t.sampler_logprobs_N, advantages, cfg.ratio_max), {}


@register_objective("topk_reverse_kl")
def _topk_reverse_kl(x: LossInputs, cfg: TopKReverseKLLossConfig):
    from onpolicy.learner.losses import topk_reverse_kl

    t = x.tokens
    kl = topk_reverse_kl(x.logits_NV, t.topk_ids_NK, t.topk_logprobs_NK, t.topk_mask_NK)
    return kl, {"topk_kl": kl.detach()}


@register_objective("jsd")
@register_objective("gkd")
def _jsd(x: LossInputs, cfg: JSDLossConfig):
    from onpolicy.learner.losses import generalized_jsd

    t = x.tokens
    jsd = generalized_jsd(x.logits_NV, t.topk_ids_NK, t.topk_logprobs_NK, cfg.beta, t.topk_mask_NK)
    return jsd, {"jsd": jsd.detach()}


@register_objective("sft")
def _sft(x: LossInputs, cfg: SFTLossConfig):
    nll = -x.learner_logprobs_N
    return nll, {"nll": nll.detach()}


@register_objective("soft_targets")
def _soft_targets(x: LossInputs, cfg: SoftTargetsLossConfig):
    from onpolicy.learner.losses import soft_target

    t = x.tokens
    per_token, soft = soft_target(x.logits_NV, x.learner_logprobs_N, t.topk_ids_NK, t.topk_logprobs_NK,
                                  cfg.temperature, cfg.alpha, t.topk_mask_NK)
    return per_token, {"soft_kl": soft.detach()}


def student_samples(objective: Objective, lmbda: float, seed: int, step: int) -> bool:
    """Whether step `step`'s batch is sampled by the student (else by the teacher). `mixed` (GKD, Agarwal et
    al. 2023): a fixed-seed draw per step, student with probability `lmbda`, so a run and its resume agree."""
    if objective.samples != "mixed":
        return objective.samples == "student"
    return random.Random(seed * 1_000_003 + step).random() < lmbda

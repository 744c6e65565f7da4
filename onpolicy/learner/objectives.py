"""The loss registry: `loss.kind` -> the function that computes it and what it needs from the teacher.

A loss is a member of the `loss` union (onpolicy/config/loss.py: its fields, default lr, `needs_topk`,
who samples) and one registration here, which takes those facts from the member of that kind:

    @register_objective("my_loss")
    def my_loss(x: LossInputs, cfg: MyLossConfig, normalizer: float) -> tuple[Tensor, dict[str, float]]:
        ...

The learner computes the logits and the learner log-probs of the sampled tokens once per
micro-batch and hands them over in `LossInputs`; the function returns (differentiable loss,
plain-float metrics). `normalizer` is the WHOLE batch's token (or sequence) count, so gradients
accumulated over micro-batches equal the gradient of the whole batch.
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
    from onpolicy.learner.batch import LearnBatch


@dataclass(frozen=True)
class LossInputs:
    batch: LearnBatch  # one micro-batch, on the learner's device
    logits_BTV: torch.Tensor  # float32 logits of the learner
    learner_logprobs_BT: torch.Tensor  # log pi(target token), differentiable


# (inputs, the loss's config member, normalizer) -> (loss, metrics)
LossFn = Callable[[LossInputs, Any, float], "tuple[torch.Tensor, dict[str, float]]"]


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
def _reverse_kl(x: LossInputs, cfg: ReverseKLLossConfig, normalizer: float):
    from onpolicy.learner.losses import sampled_reverse_kl_loss

    b = x.batch
    return sampled_reverse_kl_loss(
        x.learner_logprobs_BT, b.sampler_logprobs_BT, b.teacher_logprobs_BT, b.mask_BT,
        kl_coef=cfg.kl_coef, gamma=cfg.gamma, ratio_max=cfg.ratio_max, normalize=cfg.normalize,
        normalizer=normalizer, advantages_BT=b.advantages_BT,
    )


@register_objective("topk_reverse_kl")
def _topk_reverse_kl(x: LossInputs, cfg: TopKReverseKLLossConfig, normalizer: float):
    from onpolicy.learner.losses import topk_reverse_kl_loss

    b = x.batch
    return topk_reverse_kl_loss(
        x.logits_BTV, b.topk_ids_BTK, b.topk_logprobs_BTK, b.mask_BT, topk_mask_BTK=b.topk_mask_BTK,
        normalize=cfg.normalize, normalizer=normalizer,
    )


@register_objective("jsd")
@register_objective("gkd")
def _jsd(x: LossInputs, cfg: JSDLossConfig, normalizer: float):
    from onpolicy.learner.losses import generalized_jsd_loss

    b = x.batch
    return generalized_jsd_loss(
        x.logits_BTV, b.topk_ids_BTK, b.topk_logprobs_BTK, b.mask_BT, cfg.beta, topk_mask_BTK=b.topk_mask_BTK,
        normalize=cfg.normalize, normalizer=normalizer,
    )


@register_objective("sft")
def _sft(x: LossInputs, cfg: SFTLossConfig, normalizer: float):
    from onpolicy.learner.losses import sequence_kd_loss

    return sequence_kd_loss(x.learner_logprobs_BT, x.batch.mask_BT, normalize=cfg.normalize, normalizer=normalizer)


@register_objective("soft_targets")
def _soft_targets(x: LossInputs, cfg: SoftTargetsLossConfig, normalizer: float):
    from onpolicy.learner.losses import soft_target_loss

    b = x.batch
    return soft_target_loss(
        x.logits_BTV, x.learner_logprobs_BT, b.topk_ids_BTK, b.topk_logprobs_BTK, b.mask_BT,
        temperature=cfg.temperature, alpha=cfg.alpha, topk_mask_BTK=b.topk_mask_BTK, normalize=cfg.normalize,
        normalizer=normalizer,
    )


def student_samples(objective: Objective, lmbda: float, seed: int, step: int) -> bool:
    """Whether step `step`'s batch is sampled by the student (else by the teacher). `mixed` (GKD, Agarwal et
    al. 2023): a fixed-seed draw per step, student with probability `lmbda`, so a run and its resume agree."""
    if objective.samples != "mixed":
        return objective.samples == "student"
    return random.Random(seed * 1_000_003 + step).random() < lmbda

"""Distillation losses: small pure torch functions (registered by name in `objectives.py`).

Shape suffixes: B sequences, T positions, V vocabulary, K teacher top-k slots. Every loss
takes a 0/1 `mask_BT` of the positions that predict a completion token and returns
`(loss, metrics)`; `loss` is differentiable, `metrics` holds plain floats.

Normalisation (`normalize`): "token" divides the masked sum by the number of masked tokens;
"sequence" averages each sequence over its own tokens, then averages over the sequences that
have at least one token. `normalizer`, when given, replaces that denominator (token count or
sequence count); the learner passes the WHOLE batch's count so that gradients accumulated over
micro-batches equal the gradient of the whole batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Normalize = Literal["token", "sequence"]

# Log-probabilities are floored here instead of -inf: exp(LOG_ZERO) is exactly 0 in every float
# dtype, so empty buckets contribute exactly 0 to a KL, and no -inf - -inf = NaN appears in a value
# or a gradient.
LOG_ZERO = -1e4


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half types; float32 and float64 as they are (the float64 tests keep their precision)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def masked_reduce(
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    normalize: Normalize = "token",
    normalizer: float | None = None,
) -> torch.Tensor:
    """Token mean:    sum_bt m_bt v_bt / sum_bt m_bt.
    Sequence mean: (1/N) sum_b [sum_t m_bt v_bt / sum_t m_bt], N = sequences with a token.
    `normalizer` replaces the denominator (sum m, or N)."""
    mask_BT = mask_BT.to(values_BT.dtype)
    if normalize == "token":
        total = (values_BT * mask_BT).sum()
        denom = mask_BT.sum().item() if normalizer is None else normalizer
        return total / max(denom, 1.0)
    if normalize == "sequence":
        tokens_B = mask_BT.sum(dim=1)
        per_seq_B = (values_BT * mask_BT).sum(dim=1) / tokens_B.clamp(min=1.0)
        denom = (tokens_B > 0).sum().item() if normalizer is None else normalizer
        return per_seq_B.sum() / max(denom, 1.0)
    raise ValueError(f"normalize must be 'token' or 'sequence', got {normalize!r}")


def discounted_returns(rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s-t) m_s r_s, within each sequence (gamma=0: G_t = m_t r_t)."""
    rewards_BT = rewards_BT * mask_BT.to(rewards_BT.dtype)
    if gamma == 0.0:
        return rewards_BT
    returns_BT = torch.zeros_like(rewards_BT)
    running_B = torch.zeros_like(rewards_BT[:, 0])
    for t in range(rewards_BT.shape[1] - 1, -1, -1):
        running_B = rewards_BT[:, t] + gamma * running_B
        returns_BT[:, t] = running_B
    return returns_BT


def token_advantages(
    sampler_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    kl_coef: float = 1.0,
    gamma: float = 0.0,
    baseline: str = "none",
) -> torch.Tensor:
    """A_t = -kl_coef * G_t with G_t the (discounted) per-token KL r_t = log q - log p_T, then over the
    masked tokens of the WHOLE batch (so micro-batches see one set of statistics):

        baseline="none":   A_t
        baseline="center": A_t - mean(A)                 (a constant baseline: less variance, no bias)
        baseline="whiten": (A_t - mean(A)) / std(A)      (also a constant scale: steps of one size
                                                          whatever the teacher's log-prob range)

    Masked-out positions are 0."""
    m = mask_BT.to(sampler_logprobs_BT.dtype)
    rewards_BT = (sampler_logprobs_BT - teacher_logprobs_BT).detach()
    adv_BT = -kl_coef * discounted_returns(rewards_BT, m, gamma)
    if baseline == "none":
        return adv_BT * m
    n = m.sum().clamp(min=1.0)
    mean = (adv_BT * m).sum() / n
    adv_BT = adv_BT - mean
    if baseline == "whiten":
        std = torch.sqrt(((adv_BT * m) ** 2).sum() / n).clamp(min=1e-6)
        adv_BT = adv_BT / std
    elif baseline != "center":
        raise ValueError(f"baseline must be none, center or whiten, got {baseline!r}")
    return adv_BT * m


def sampled_kl_metrics(
    learner_logprobs_BT: torch.Tensor,
    sampler_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    ratio_max: float = 10.0,
) -> dict[str, float]:
    """Diagnostics on the sampled tokens (token means over the mask):
    teacher_kl = mean(log q - log p_T), a one-sample estimate of KL(q || p_T);
    sampler_learner_kl = mean(log q - log pi), ~0 when learner and sampler weights agree;
    ratio_mean / ratio_max over rho = pi/q; ratio_masked_frac = fraction with rho > ratio_max."""
    with torch.no_grad():
        m = mask_BT.bool()
        n = int(m.sum().item())
        if n == 0:
            return {
                "teacher_kl": 0.0,
                "sampler_learner_kl": 0.0,
                "ratio_mean": 1.0,
                "ratio_max": 1.0,
                "ratio_masked_frac": 0.0,
            }
        learner, sampler, teacher = (
            x.detach().double()[m] for x in (learner_logprobs_BT, sampler_logprobs_BT, teacher_logprobs_BT)
        )
        ratio = torch.exp(learner - sampler)
        return {
            "teacher_kl": (sampler - teacher).mean().item(),
            "sampler_learner_kl": (sampler - learner).mean().item(),
            "ratio_mean": ratio.mean().item(),
            "ratio_max": ratio.max().item(),
            "ratio_masked_frac": (ratio > ratio_max).double().mean().item(),
        }


def sampled_reverse_kl_loss(
    learner_logprobs_BT: torch.Tensor,
    sampler_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    kl_coef: float = 1.0,
    gamma: float = 0.0,
    ratio_max: float = 10.0,
    normalize: Normalize = "token",
    normalizer: float | None = None,
    advantages_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sampled per-token reverse KL with an importance ratio (on-policy distillation).

        r_t   = log q(y_t) - log p_T(y_t)                    (one-sample KL(q || p_T) at t)
        A_t   = -kl_coef * sum_{s>=t} gamma^(s-t) r_s       (detached; gamma=0: -kl_coef r_t)
        rho_t = exp(log pi(y_t) - log q(y_t))
        keep_t = m_t * [rho_t <= ratio_max]
        loss  = -sum_t keep_t rho_t A_t / sum_t m_t          (normalize="token")

    Masked-out ratios still count in the denominator, so dropping a token does not up-weight
    the others. At rho = 1 the gradient is REINFORCE on per-token reverse KL:
    sum_t m_t kl_coef r_t grad log pi(y_t) / sum_t m_t. `advantages_BT`, when given, replaces A_t (the
    learner passes `token_advantages` of the whole batch, with a baseline).
    """
    mask_BT = mask_BT.to(learner_logprobs_BT.dtype)
    if advantages_BT is None:
        advantages_BT = token_advantages(sampler_logprobs_BT, teacher_logprobs_BT, mask_BT, kl_coef=kl_coef,
                                         gamma=gamma)
    per_token_BT = sampled_reverse_kl(learner_logprobs_BT, sampler_logprobs_BT, advantages_BT, ratio_max)
    loss = masked_reduce(per_token_BT, mask_BT, normalize, normalizer)
    metrics = sampled_kl_metrics(
        learner_logprobs_BT, sampler_logprobs_BT, teacher_logprobs_BT, mask_BT, ratio_max
    )
    return loss, metrics


def sampled_reverse_kl(
    learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, advantages: torch.Tensor, ratio_max: float
) -> torch.Tensor:
    """Per token, any leading shape: -rho_t A_t [rho_t <= ratio_max], rho_t = exp(log pi - log q) (the masked
    sum of it is `sampled_reverse_kl_loss`'s numerator)."""
    ratio = torch.exp(learner_logprobs - sampler_logprobs.detach())
    keep = (ratio.detach() <= ratio_max).to(ratio.dtype)
    return -ratio * advantages.detach() * keep


def bucketed_logprobs(
    full_logprobs_BTV: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_mask_BTK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Restrict a distribution to the teacher's top-k ids plus one tail bucket.

        out[..., j] = log pi(id_j)                    j < K (LOG_ZERO for padded slots)
        out[..., K] = log sum_{v not in top-k} pi(v)  (the tail; LOG_ZERO when empty)

    The tail is a logsumexp over the non-top-k entries rather than log(1 - sum top-k), which
    would lose precision when the top-k holds almost all the mass. `topk_mask_BTK` marks the
    real slots (padding slots must not count their placeholder id twice)."""
    if topk_mask_BTK is None:
        topk_mask_BTK = torch.ones_like(topk_ids_BTK, dtype=torch.bool)
    valid_BTK = topk_mask_BTK.bool()
    top_BTK = full_logprobs_BTV.gather(-1, topk_ids_BTK).masked_fill(~valid_BTK, LOG_ZERO)
    # scatter_add, not scatter: a padded slot may repeat a real id, and must not unmark it.
    in_top_BTV = (
        torch.zeros_like(full_logprobs_BTV).scatter_add_(
            -1, topk_ids_BTK, valid_BTK.to(full_logprobs_BTV.dtype)
        )
        > 0
    )
    rest_BTV = full_logprobs_BTV.masked_fill(in_top_BTV, LOG_ZERO)
    tail_BT = torch.logsumexp(rest_BTV, dim=-1)
    empty_BT = in_top_BTV.all(dim=-1)
    tail_BT = torch.where(empty_BT, torch.full_like(tail_BT, LOG_ZERO), tail_BT).clamp(min=LOG_ZERO)
    return torch.cat([top_BTK, tail_BT.unsqueeze(-1)], dim=-1)


def teacher_bucketed_logprobs(
    topk_logprobs_BTK: torch.Tensor, topk_mask_BTK: torch.Tensor | None = None
) -> torch.Tensor:
    """The teacher's top-k log-probs plus its tail log(1 - sum_j p_T(id_j)), floored at LOG_ZERO
    (no gradient flows to the teacher)."""
    top_BTK = topk_logprobs_BTK.detach()
    if topk_mask_BTK is not None:
        top_BTK = top_BTK.masked_fill(~topk_mask_BTK.bool(), float("-inf"))
    head_BT = torch.logsumexp(top_BTK, dim=-1).clamp(max=0.0)
    tail_BT = torch.log1p(-torch.exp(head_BT))
    return torch.cat([top_BTK, tail_BT.unsqueeze(-1)], dim=-1).clamp(min=LOG_ZERO)


def _kl_buckets(logp_BTN: torch.Tensor, logq_BTN: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_n p_n (log p_n - log q_n) over the last axis; inputs floored at LOG_ZERO,
    so empty buckets (p_n = 0) add exactly 0."""
    return (torch.exp(logp_BTN) * (logp_BTN - logq_BTN)).sum(dim=-1)


def _student_and_teacher_buckets(
    learner_logits_BTV, teacher_topk_ids_BTK, teacher_topk_logprobs_BTK, topk_mask_BTK
):
    """Both sides over the same k + 1 buckets. Where the top-k ids cover the whole vocabulary the
    tail is empty by definition, so the teacher's tail (then only the rounding error of its
    log-probs summing to 1) is set to zero too; otherwise forward KL would pair that noise with
    the student's exactly-empty tail."""
    student_BTN = bucketed_logprobs(
        torch.log_softmax(upcast(learner_logits_BTV), dim=-1), teacher_topk_ids_BTK, topk_mask_BTK
    )
    teacher_BTN = teacher_bucketed_logprobs(teacher_topk_logprobs_BTK.double(), topk_mask_BTK).to(student_BTN.dtype)
    empty_BT = student_BTN[..., -1].detach() <= LOG_ZERO
    teacher_BTN[..., -1] = torch.where(
        empty_BT, torch.full_like(teacher_BTN[..., -1], LOG_ZERO), teacher_BTN[..., -1]
    )
    return student_BTN, teacher_BTN


def topk_reverse_kl(
    learner_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
    topk_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per position, any leading shape: KL_t of `topk_reverse_kl_loss` (vocabulary on the last axis)."""
    student, teacher = _student_and_teacher_buckets(learner_logits, topk_ids, topk_logprobs, topk_mask)
    return _kl_buckets(student, teacher)


def topk_reverse_kl_loss(
    learner_logits_BTV: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor,
    teacher_topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    topk_mask_BTK: torch.Tensor | None = None,
    normalize: Normalize = "token",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reverse KL over the teacher's top-k support plus one tail bucket:

        KL_t = sum_{n in top-k + tail} pi_n (log pi_n - log p_T,n),
        pi_tail = 1 - sum_j pi(id_j),  p_T,tail = 1 - sum_j p_T(id_j),
        loss = masked mean of KL_t (token or sequence normalisation).

    Exact, fully differentiable in the learner's logits; with k = V it is the full KL(pi || p_T)."""
    kl_BT = topk_reverse_kl(learner_logits_BTV, teacher_topk_ids_BTK, teacher_topk_logprobs_BTK, topk_mask_BTK)
    loss = masked_reduce(kl_BT, mask_BT, normalize, normalizer)
    return loss, {"topk_kl": masked_reduce(kl_BT.detach(), mask_BT, "token").item()}


def generalized_jsd(
    learner_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, beta: float,
    topk_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per position, any leading shape: JSD_beta of `generalized_jsd_loss`."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    student, teacher = _student_and_teacher_buckets(learner_logits, topk_ids, topk_logprobs, topk_mask)
    if beta == 0.0:
        return _kl_buckets(teacher, student)
    if beta == 1.0:
        return _kl_buckets(student, teacher)
    mix = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1.0 - beta)]), dim=0)
    return beta * _kl_buckets(teacher, mix) + (1.0 - beta) * _kl_buckets(student, mix)


def generalized_jsd_loss(
    learner_logits_BTV: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor,
    teacher_topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    beta: float,
    *,
    topk_mask_BTK: torch.Tensor | None = None,
    normalize: Normalize = "token",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Generalised JSD of GKD (Agarwal et al. 2023) over the top-k + tail buckets, TRL convention:

        M = beta p_T + (1 - beta) pi
        JSD_beta = beta KL(p_T || M) + (1 - beta) KL(pi || M)
        beta = 0: exactly forward KL(p_T || pi);  beta = 1: exactly reverse KL(pi || p_T).

    The end points are special-cased (the formula itself tends to 0 there)."""
    jsd_BT = generalized_jsd(learner_logits_BTV, teacher_topk_ids_BTK, teacher_topk_logprobs_BTK, beta,
                             topk_mask_BTK)
    loss = masked_reduce(jsd_BT, mask_BT, normalize, normalizer)
    return loss, {"jsd": masked_reduce(jsd_BT.detach(), mask_BT, "token").item()}


def sequence_kd_loss(
    learner_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    normalize: Normalize = "token",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence-level KD (Kim & Rush 2016), the "black-box" route: cross-entropy on completions the TEACHER
    generated,

        loss = -sum_t m_t log pi(y_t | x, y_<t) / sum_t m_t      y ~ p_T(. | x).

    Only the teacher's tokens are needed, no log-probs."""
    nll_BT = -learner_logprobs_BT
    loss = masked_reduce(nll_BT, mask_BT, normalize, normalizer)
    return loss, {"nll": masked_reduce(nll_BT.detach(), mask_BT, "token").item()}


def soft_target(
    learner_logits: torch.Tensor, learner_logprobs: torch.Tensor, topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor, temperature: float, alpha: float, topk_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, any leading shape: (L_t of `soft_target_loss`, its soft term KL(p_T^(T) || pi^(T)))."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student = bucketed_logprobs(torch.log_softmax(upcast(learner_logits) / temperature, dim=-1), topk_ids, topk_mask)
    teacher = teacher_bucketed_logprobs(topk_logprobs.double(), topk_mask)
    empty = student[..., -1].detach() <= LOG_ZERO  # k = V: no tail on either side
    teacher[..., -1] = torch.where(empty, torch.full_like(teacher[..., -1], LOG_ZERO), teacher[..., -1])
    teacher = torch.log_softmax(teacher / temperature, dim=-1).clamp(min=LOG_ZERO).to(student.dtype)
    soft = _kl_buckets(teacher, student)
    return alpha * temperature**2 * soft + (1.0 - alpha) * (-learner_logprobs), soft


def soft_target_loss(
    learner_logits_BTV: torch.Tensor,
    learner_logprobs_BT: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor,
    teacher_topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    topk_mask_BTK: torch.Tensor | None = None,
    normalize: Normalize = "token",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Hinton et al. (2015) soft targets, on teacher-generated (or data set) completions y:

        L_t = alpha * T^2 * KL(p_T^(T) || pi^(T)) + (1 - alpha) * (-log pi(y_t))

    where ^(T) is the distribution at temperature T (softmax(logits / T)); T^2 keeps the soft term's
    gradient on the scale of the hard term's. The teacher is known by its top-k log-probs (at T = 1), so
    both sides live on the same k + 1 buckets: the teacher's bucket n gets weight exp(log p_T,n / T)
    normalised over the buckets (its tail bucket is tempered as one outcome: exact when k = V, an
    approximation otherwise), the student's buckets are its full softmax(z / T) grouped the same way."""
    per_token_BT, soft_BT = soft_target(learner_logits_BTV, learner_logprobs_BT,
                                        teacher_topk_ids_BTK, teacher_topk_logprobs_BTK, temperature, alpha,
                                        topk_mask_BTK)
    loss = masked_reduce(per_token_BT, mask_BT, normalize, normalizer)
    return loss, {"soft_kl": masked_reduce(soft_BT.detach(), mask_BT, "token").item()}

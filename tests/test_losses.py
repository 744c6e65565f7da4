"""Losses against float64 brute-force references computed by hand (no shared code paths)."""

from __future__ import annotations

import math

import pytest
import torch

from onpolicy.config import OptimConfig
from onpolicy.learner.losses import (
    bucketed_logprobs,
    discounted_returns,
    generalized_jsd_loss,
    masked_reduce,
    sampled_reverse_kl_loss,
    sequence_kd_loss,
    soft_target_loss,
    teacher_bucketed_logprobs,
    token_advantages,
    topk_reverse_kl_loss,
)
from onpolicy.learner.schedule import lr_at

F64 = torch.float64


def _full_kl(logp_BTV, logq_BTV):
    """Brute force sum_v p_v (log p_v - log q_v), with explicit loops in float64."""
    B, T, V = logp_BTV.shape
    out = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        for t in range(T):
            out[b, t] = sum(
                math.exp(logp_BTV[b, t, v]) * (logp_BTV[b, t, v] - logq_BTV[b, t, v]) for v in range(V)
            )
    return out


def test_reinforce_gradient_at_ratio_one():
    torch.manual_seed(0)
    T, V, kl_coef = 3, 5, 0.7
    theta = torch.randn(1, T, V, dtype=F64, requires_grad=True)
    teacher_logits = torch.randn(1, T, V, dtype=F64)
    probs = torch.softmax(theta.detach(), -1)
    y = torch.multinomial(probs[0], 1).view(1, T)
    mask = torch.tensor([[1.0, 0.0, 1.0]], dtype=F64)

    learner_lp = torch.log_softmax(theta, -1).gather(-1, y[..., None]).squeeze(-1)
    sampler_lp = learner_lp.detach().clone()  # ratio 1: learner == sampler
    teacher_lp = torch.log_softmax(teacher_logits, -1).gather(-1, y[..., None]).squeeze(-1)
    loss, metrics = sampled_reverse_kl_loss(learner_lp, sampler_lp, teacher_lp, mask, kl_coef=kl_coef)
    loss.backward()

    expected = torch.zeros(1, T, V, dtype=F64)
    for t in range(T):
        onehot = torch.zeros(V, dtype=F64)
        onehot[y[0, t]] = 1.0
        r = math.log(probs[0, t, y[0, t]]) - math.log(torch.softmax(teacher_logits[0, t], -1)[y[0, t]])
        expected[0, t] = mask[0, t] * kl_coef * r * (onehot - probs[0, t]) / mask.sum()
    torch.testing.assert_close(theta.grad, expected, rtol=1e-10, atol=1e-12)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["sampler_learner_kl"] == pytest.approx(0.0, abs=1e-12)
    r_all = (sampler_lp - teacher_lp)[0]
    assert metrics["teacher_kl"] == pytest.approx(((r_all[0] + r_all[2]) / 2).item())
    # The loss value at ratio 1 is kl_coef * masked mean of r.
    assert loss.item() == pytest.approx(kl_coef * ((r_all[0] + r_all[2]) / 2).item())


def test_discounted_advantages():
    r = torch.tensor([[1.0, 2.0, -1.0, 4.0, 9.0]], dtype=F64)
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]], dtype=F64)
    gamma = 0.5
    expected = torch.zeros_like(r)
    for t in range(5):
        expected[0, t] = sum(gamma ** (s - t) * m[0, s] * r[0, s] for s in range(t, 5))
    torch.testing.assert_close(discounted_returns(r, m, gamma), expected)
    torch.testing.assert_close(discounted_returns(r, m, 0.0), r * m)

    # The loss uses A_t = -kl_coef * G_t: at ratio 1, d loss / d learner_lp_t = m_t kl_coef G_t / sum m.
    zeros = torch.zeros_like(r)
    learner = zeros.clone().requires_grad_(True)
    teacher = -r  # sampler 0, so r_t = 0 - teacher_t = r
    loss, _ = sampled_reverse_kl_loss(learner, zeros, teacher, m, kl_coef=2.0, gamma=gamma)
    loss.backward()
    torch.testing.assert_close(learner.grad, 2.0 * expected * m / 3.0)


def test_ratio_masking_counts_and_drops_tokens():
    ratios = torch.tensor([[1.0, 20.0, 0.5, 11.0, 50.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=F64)
    sampler = torch.full_like(ratios, -2.0)
    learner = (sampler + ratios.log()).requires_grad_(True)
    teacher = torch.full_like(ratios, -3.0)  # r = 1 everywhere
    loss, metrics = sampled_reverse_kl_loss(learner, sampler, teacher, mask, ratio_max=10.0)
    assert metrics["ratio_masked_frac"] == pytest.approx(2 / 4)  # 20 and 11; 50 is outside the mask
    assert metrics["ratio_max"] == pytest.approx(20.0)
    assert metrics["ratio_mean"] == pytest.approx((1 + 20 + 0.5 + 11) / 4)
    assert loss.item() == pytest.approx((1.0 + 0.5) / 4)  # kept rho * r over ALL 4 masked tokens
    loss.backward()
    torch.testing.assert_close(learner.grad, torch.tensor([[1.0, 0.0, 0.5, 0.0, 0.0]], dtype=F64) / 4)


def test_sequence_normalisation():
    values = torch.tensor([[1.0, 3.0, 0.0], [10.0, 0.0, 0.0], [7.0, 7.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    assert masked_reduce(values, mask, "sequence").item() == pytest.approx((2.0 + 10.0) / 2)
    assert masked_reduce(values, mask, "token").item() == pytest.approx(14.0 / 3)
    assert masked_reduce(values, mask, "token", normalizer=7.0).item() == pytest.approx(2.0)


def _random_case(B=2, T=3, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(B, T, V, dtype=F64, generator=g) * 2
    teacher_lp = torch.log_softmax(torch.randn(B, T, V, dtype=F64, generator=g) * 2, -1)
    return student_logits, teacher_lp


def test_topk_full_vocab_equals_full_kl_with_finite_grads():
    B, T, V = 2, 3, 6
    logits, teacher_lp = _random_case(B, T, V)
    logits.requires_grad_(True)
    ids = torch.arange(V).flip(0).expand(B, T, V).contiguous()  # k = V, in some order
    mask = torch.ones(B, T, dtype=F64)
    loss, _ = topk_reverse_kl_loss(logits, ids, teacher_lp.gather(-1, ids), mask)
    student_lp = torch.log_softmax(logits.detach(), -1)
    expected = _full_kl(student_lp, teacher_lp).mean()
    assert torch.isfinite(loss)
    # Up to float32 (the loss runs in float32, as the learner does).
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    ref = logits.detach().clone().requires_grad_(True)
    _full_kl_autograd = (torch.softmax(ref, -1) * (torch.log_softmax(ref, -1) - teacher_lp)).sum(-1).mean()
    _full_kl_autograd.backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-4, atol=1e-6)
    # The tail bucket is empty: log-prob floored, probability exactly 0.
    buckets = bucketed_logprobs(student_lp, ids)
    assert (buckets[..., -1].exp() == 0).all()


def test_topk_tail_bucket_matches_brute_force():
    B, T, V, K = 2, 3, 7, 3
    logits, teacher_lp = _random_case(B, T, V, seed=1)
    ids = torch.stack(
        [torch.randperm(V, generator=torch.Generator().manual_seed(i))[:K] for i in range(B * T)]
    )
    ids = ids.view(B, T, K)
    student_lp = torch.log_softmax(logits, -1)
    buckets = bucketed_logprobs(student_lp, ids)
    tbuckets = teacher_bucketed_logprobs(teacher_lp.gather(-1, ids))
    expected_kl = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        for t in range(T):
            p = torch.softmax(logits[b, t], -1)
            top = [int(i) for i in ids[b, t]]
            tail = sum(float(p[v]) for v in range(V) if v not in top)
            assert buckets[b, t, -1].item() == pytest.approx(math.log(tail), rel=1e-12)
            for j, v in enumerate(top):
                assert buckets[b, t, j].item() == pytest.approx(math.log(p[v]), rel=1e-12)
            q = teacher_lp[b, t].exp()
            q_tail = 1.0 - sum(float(q[v]) for v in top)
            assert tbuckets[b, t, -1].item() == pytest.approx(math.log(q_tail), rel=1e-9)
            expected_kl[b, t] = sum(
                float(p[v]) * math.log(float(p[v]) / float(q[v])) for v in top
            ) + tail * math.log(tail / q_tail)
    loss, _ = topk_reverse_kl_loss(logits, ids, teacher_lp.gather(-1, ids), torch.ones(B, T))
    assert loss.item() == pytest.approx(expected_kl.mean().item(), rel=1e-5)


def test_topk_padding_slots_do_not_count():
    """A padded slot (id 0, masked) must give the same loss as the unpadded row."""
    B, T, V, K = 1, 2, 6, 2
    logits, teacher_lp = _random_case(B, T, V, seed=2)
    ids = torch.tensor([[[3, 5], [1, 4]]])
    lps = teacher_lp.gather(-1, ids)
    ref, _ = topk_reverse_kl_loss(logits, ids, lps, torch.ones(B, T))
    ids_pad = torch.cat([ids, torch.zeros(B, T, 1, dtype=torch.long)], -1)
    lps_pad = torch.cat([lps, torch.full((B, T, 1), float("-inf"), dtype=F64)], -1)
    valid = torch.cat([torch.ones(B, T, K, dtype=torch.bool), torch.zeros(B, T, 1, dtype=torch.bool)], -1)
    got, _ = topk_reverse_kl_loss(logits, ids_pad, lps_pad, torch.ones(B, T), topk_mask_BTK=valid)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_jsd_matches_brute_force(beta):
    B, T, V = 2, 2, 5
    logits, teacher_lp = _random_case(B, T, V, seed=3)
    logits.requires_grad_(True)
    ids = torch.arange(V).expand(B, T, V).contiguous()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = generalized_jsd_loss(logits, ids, teacher_lp.gather(-1, ids), mask, beta)
    student_lp = torch.log_softmax(logits.detach(), -1)
    if beta == 0.0:
        per_pos = _full_kl(teacher_lp, student_lp)  # forward KL(p_T || pi)
    elif beta == 1.0:
        per_pos = _full_kl(student_lp, teacher_lp)  # reverse KL(pi || p_T)
    else:
        mix_lp = torch.log(beta * teacher_lp.exp() + (1 - beta) * student_lp.exp())
        per_pos = beta * _full_kl(teacher_lp, mix_lp) + (1 - beta) * _full_kl(student_lp, mix_lp)
    expected = (per_pos * mask.double()).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_lr_schedule_endpoints():
    cos = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cos, 20) == pytest.approx(0.25)
    assert lr_at(3, cos, 20) == pytest.approx(1.0)
    assert lr_at(4, cos, 20) == pytest.approx(1.0)
    assert lr_at(19, cos, 20) == pytest.approx(0.1)
    assert lr_at(100, cos, 20) == pytest.approx(0.1)
    assert lr_at(4 + 15 / 2, cos, 20) == pytest.approx(0.55)  # cosine midpoint
    lin = OptimConfig(lr=0.8, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(0, lin, 11) == pytest.approx(0.8)
    assert lr_at(5, lin, 11) == pytest.approx(0.4)
    assert lr_at(10, lin, 11) == pytest.approx(0.0)
    const = OptimConfig(lr=0.5, warmup_steps=2, schedule="constant")
    assert [lr_at(s, const, 10) for s in range(4)] == pytest.approx([0.25, 0.5, 0.5, 0.5])
    assert lr_at(50, cos, None) == pytest.approx(1.0)


def test_jsd_with_tail_bucket_matches_brute_force():
    """k < V: both sides keep a tail bucket; compare JSD_0.5 and forward KL to explicit sums."""
    B, T, V = 1, 2, 6
    logits, teacher_lp = _random_case(B, T, V, seed=4)
    ids = torch.tensor([[[0, 3], [5, 2]]])
    for beta in (0.0, 0.5):
        expected = 0.0
        for t in range(T):
            p = torch.softmax(logits[0, t], -1).tolist()
            q = teacher_lp[0, t].exp().tolist()
            top = ids[0, t].tolist()
            ps = [p[v] for v in top] + [1 - sum(p[v] for v in top)]
            qs = [q[v] for v in top] + [1 - sum(q[v] for v in top)]
            if beta == 0.0:
                expected += sum(b * math.log(b / a) for a, b in zip(ps, qs))
            else:
                ms = [beta * b + (1 - beta) * a for a, b in zip(ps, qs)]
                expected += beta * sum(b * math.log(b / m) for b, m in zip(qs, ms))
                expected += (1 - beta) * sum(a * math.log(a / m) for a, m in zip(ps, ms))
        loss, _ = generalized_jsd_loss(logits, ids, teacher_lp.gather(-1, ids), torch.ones(B, T), beta)
        assert loss.item() == pytest.approx(expected / T, rel=1e-5)


def test_sequence_kd_is_the_mean_nll_of_the_teacher_tokens():
    torch.manual_seed(5)
    lp = torch.log_softmax(torch.randn(2, 3, 4, dtype=F64), -1)
    y = torch.tensor([[1, 2, 3], [0, 0, 1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64)
    loss, _ = sequence_kd_loss(lp.gather(-1, y[..., None])[..., 0], mask)
    expected = -(lp[0, 0, 1] + lp[0, 1, 2] + lp[1, 1, 0] + lp[1, 2, 1]) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.9)])
def test_soft_targets_match_brute_force(temperature, alpha):
    """k = V: alpha * T^2 * KL(softmax(teacher_logits/T) || softmax(student_logits/T)) + (1-alpha) * CE, by hand."""
    B, T, V = 2, 2, 5
    logits, teacher_lp = _random_case(B, T, V, seed=6)
    logits.requires_grad_(True)
    y = torch.tensor([[0, 3], [4, 1]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    ids = torch.arange(V).expand(B, T, V).contiguous()
    learner_lp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    loss, _ = soft_target_loss(logits, learner_lp, ids, teacher_lp.gather(-1, ids), mask,
                               temperature=temperature, alpha=alpha)
    expected, n = 0.0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            # teacher at temperature T from its log-probs: softmax(log p / T); student: softmax(z / T)
            q = [math.exp(teacher_lp[b, t, v].item() / temperature) for v in range(V)]
            q = [x / sum(q) for x in q]
            s = [math.exp(logits[b, t, v].item() / temperature) for v in range(V)]
            s = [x / sum(s) for x in s]
            kl = sum(qi * math.log(qi / si) for qi, si in zip(q, s))
            z = [math.exp(logits[b, t, v].item()) for v in range(V)]
            ce = -math.log(z[y[b, t]] / sum(z))
            expected += alpha * temperature**2 * kl + (1 - alpha) * ce
            n += 1
    assert loss.item() == pytest.approx(expected / n, rel=1e-5, abs=1e-7)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_gkd_mixing_draws_the_documented_fraction():
    from onpolicy.learner.objectives import OBJECTIVES, student_samples

    for lmbda in (0.0, 0.25, 0.5, 1.0):
        draws = [student_samples(OBJECTIVES["gkd"], lmbda, seed=3, step=s) for s in range(4000)]
        assert abs(sum(draws) / len(draws) - lmbda) < 0.03, lmbda
    again = [student_samples(OBJECTIVES["gkd"], 0.5, seed=3, step=s) for s in range(50)]
    assert again == [student_samples(OBJECTIVES["gkd"], 0.5, seed=3, step=s) for s in range(50)]  # resumable
    assert not student_samples(OBJECTIVES["sft"], 1.0, 0, 0) and student_samples(OBJECTIVES["reverse_kl"], 0.0, 0, 0)


def test_token_advantages_baselines():
    sampler = torch.tensor([[-1.0, -2.0, -0.5, 0.0]], dtype=F64)
    teacher = torch.tensor([[-3.0, -1.0, -0.5, -9.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    raw = token_advantages(sampler, teacher, mask, kl_coef=2.0)
    assert raw.tolist() == [[-4.0, 2.0, 0.0, 0.0]]  # -2 * (log q - log p), masked position 0
    centered = token_advantages(sampler, teacher, mask, kl_coef=2.0, baseline="center")
    assert centered[0, :3].tolist() == pytest.approx([-10 / 3, 8 / 3, 2 / 3]) and centered[0, 3] == 0
    white = token_advantages(sampler, teacher, mask, kl_coef=2.0, baseline="whiten")
    vals = white[0, :3]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-12) and (vals**2).mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="baseline"):
        token_advantages(sampler, teacher, mask, baseline="median")

"""The hidden-state term (`loss.hidden`): its maths against float64 brute force, the teacher's hidden states at
the right positions, the learner's step (the projection trains, is checkpointed and never exported), and
configurations that cannot work refused before engines start."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import FP32_BATCH, FP64_ORDER, assert_tensor_close

from onpolicy.config import HiddenStateConfig, load_config
from onpolicy.learner.batch import build_batch
from onpolicy.learner.hidden import HiddenTerm, hidden_state_loss
from onpolicy.teacher.local.engines import HFTeacher
from onpolicy.types import Rollout, ScoreRequestItem

HIDDEN = "loss.hidden={layers: {0: 1}, kind: cosine}"


def brute(student, teacher, mask, kind, normalizer):
    """sum_t m_t mean_l ell_{t,l} / N with plain Python floats."""
    B, T, L, H = teacher.shape
    total = 0.0
    for b in range(B):
        for t in range(T):
            per = []
            for ell in range(L):
                s, u = student[b, t, ell].tolist(), teacher[b, t, ell].tolist()
                if kind == "cosine":
                    dot = sum(x * y for x, y in zip(s, u))
                    per.append(1 - dot / (math.sqrt(sum(x * x for x in s)) * math.sqrt(sum(y * y for y in u))))
                else:
                    per.append(sum((x - y) ** 2 for x, y in zip(s, u)) / H)
            total += mask[b, t].item() * sum(per) / L
    return total / normalizer


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_loss_matches_float64_brute_force(kind):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    u = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    got = hidden_state_loss(s, u, mask, kind, normalizer=9.0).item()
    assert FP64_ORDER.close(got, brute(s, u, mask, kind, 9.0)), (got, brute(s, u, mask, kind, 9.0))
    # the term is zero where the student equals the teacher (cosine: any positive multiple of it)
    assert abs(hidden_state_loss(u * (2.0 if kind == "cosine" else 1.0), u, mask, kind, 9.0).item()) < 1e-12


def test_projection_applies_where_widths_differ_and_learns():
    cfg = HiddenStateConfig(layers={0: 2, 1: 0}, kind="mse", weight=0.5)
    term = HiddenTerm(cfg, student_width=3, teacher_width=5).double()
    assert term.student_layers == [0, 1] and cfg.teacher_layers() == [2, 0]
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    teacher = torch.randn(2, 4, 2, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.float64)
    loss = term.loss(states, teacher, mask, normalizer=8.0)
    projected = torch.stack([w(h) for w, h in zip(term.projections, states)], dim=2).detach()
    assert FP64_ORDER.close(loss.item(), 0.5 * brute(projected, teacher, mask, "mse", 8.0))
    loss.backward()
    assert all(w.weight.grad is not None and w.weight.grad.abs().sum() > 0 for w in term.projections)
    assert HiddenTerm(cfg, 5, 5).projections is None  # equal widths: compared as they are


def test_the_teacher_returns_its_hidden_states_at_the_predicting_positions(tiny_teacher_dir):
    """HFTeacher's hidden states for layer 0 are the residual stream after block 0 (transformers'
    hidden_states[1]) at positions P-1+t, and build_batch puts them where mask_BT is 1."""
    from transformers import AutoModelForCausalLM

    items = [ScoreRequestItem(prompt_ids=[1, 5, 6], completion_ids=[7, 15, 2]),
             ScoreRequestItem(prompt_ids=[1], completion_ids=[4, 9])]
    scores = HFTeacher(tiny_teacher_dir, hidden_layers=[0, 0]).score(items)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32).eval()
    for it, sc in zip(items, scores):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([it.prompt_ids + it.completion_ids]),
                        output_hidden_states=True).hidden_states[1][0]
        p = len(it.prompt_ids)
        got = torch.tensor(sc.hidden)
        assert got.shape == (len(it.completion_ids), 2, 64)
        assert_tensor_close(got[:, 0], ref[p - 1 : p - 1 + len(it.completion_ids)], FP32_BATCH, per="tensor")
    rollouts = [Rollout(prompt_ids=it.prompt_ids, completion_ids=it.completion_ids,
                        sampler_logprobs=[-1.0] * len(it.completion_ids), policy_version=0) for it in items]
    batch = build_batch(rollouts, scores, pad_id=0, with_hidden=True)
    on = batch.mask_BT.bool()
    assert torch.equal(batch.teacher_hidden_BTLH[on], torch.tensor([row for s in scores for row in s.hidden]))
    assert batch.teacher_hidden_BTLH[~on].abs().sum() == 0
    with pytest.raises(ValueError, match="needs the teacher's hidden states at each of its 3 completion tokens"):
        build_batch(rollouts, [s.model_copy(update={"hidden": None}) for s in scores], pad_id=0, with_hidden=True)


def test_learner_step_adds_the_term_and_trains_a_projection(tmp_path, tiny_model_dir, tiny_teacher_dir):
    """A student 32 wide against a 64-wide teacher: the projection is built, trains with the student (its weights
    move), sits in the checkpoint and not in the exported student."""
    from safetensors import safe_open

    from onpolicy.learner.core import Learner
    from onpolicy.prune.student_init import init_student

    student = tmp_path / "narrow"
    init_student(tiny_teacher_dir, student, hidden=32, config="configs/toy.yaml", calibration_prompts=8,
                 calibration_new_tokens=2)
    cfg = load_config("configs/toy.yaml", [f"model.student={student}", f"teacher.model={tiny_teacher_dir}",
                                           "loss.kind=reverse_kl", "loss.hidden={layers: {0: 1, 1: 0}, kind: mse, weight: 2.0}"])
    learner = Learner(str(student), cfg, device="cpu")
    assert learner.hidden is not None and learner.hidden.projections is not None
    before = learner.hidden.projections[0].weight.detach().clone()
    items = [ScoreRequestItem(prompt_ids=[1, 5, 6], completion_ids=[7, 15, 2]),
             ScoreRequestItem(prompt_ids=[1, 12], completion_ids=[4, 9, 13, 2])]
    teacher = HFTeacher(tiny_teacher_dir, hidden_layers=cfg.loss.hidden.teacher_layers())
    scores = teacher.score(items)
    rollouts = [Rollout(prompt_ids=it.prompt_ids, completion_ids=it.completion_ids,
                        sampler_logprobs=lp, policy_version=0) for it, lp in zip(items, learner.score(items))]
    metrics = learner.train_step(rollouts, scores)
    assert metrics["hidden_loss"] > 0 and math.isfinite(metrics["hidden_loss"])
    assert not torch.equal(before, learner.hidden.projections[0].weight.detach())
    learner.save_checkpoint(tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "trainer_state.pt", weights_only=True)
    assert set(state["hidden"]) == {"projections.0.weight", "projections.1.weight"}
    learner.save_model(tmp_path / "export")
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not [k for k in names if "projection" in k]


def test_hidden_term_value_equals_brute_force_at_the_start(tmp_path, tiny_model_dir, tiny_teacher_dir):
    """Same widths (no projection): the step's hidden_loss equals the float64 brute force over the student's
    and the teacher's residual streams at the completion-predicting positions."""
    from transformers import AutoModelForCausalLM

    from onpolicy.learner.core import Learner

    cfg = load_config("configs/toy.yaml", [f"model.student={tiny_model_dir}", f"teacher.model={tiny_teacher_dir}",
                                           "loss.kind=reverse_kl", "loss.hidden={layers: {1: 0}, kind: cosine}"])
    learner = Learner(str(tiny_model_dir), cfg, device="cpu")
    assert learner.hidden.projections is None
    items = [ScoreRequestItem(prompt_ids=[1, 5, 6], completion_ids=[7, 15, 2]),
             ScoreRequestItem(prompt_ids=[1], completion_ids=[4, 9])]
    scores = HFTeacher(tiny_teacher_dir, hidden_layers=[0]).score(items)
    student = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float64).eval()
    total, tokens = 0.0, 0
    seen: dict[str, torch.Tensor] = {}
    hook = student.model.layers[1].register_forward_hook(
        lambda m, i, o: seen.update(h=o[0] if isinstance(o, tuple) else o))
    for it in items:
        ids = torch.tensor([it.prompt_ids + it.completion_ids])
        with torch.no_grad():
            # the student's layer 1 is its last block: read by the hook, not hidden_states[-1] (normed)
            student(input_ids=ids)
            u = teacher(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        p, n = len(it.prompt_ids), len(it.completion_ids)
        s_ = seen["h"][0][p - 1 : p - 1 + n]
        total += brute(s_[None, :, None], u[p - 1 : p - 1 + n][None, :, None], torch.ones(1, n), "cosine", 1.0)
        tokens += n
    hook.remove()
    rollouts = [Rollout(prompt_ids=it.prompt_ids, completion_ids=it.completion_ids, sampler_logprobs=lp,
                        policy_version=0) for it, lp in zip(items, learner.score(items))]
    metrics = learner.train_step(rollouts, scores)
    assert FP32_BATCH.close(metrics["hidden_loss"], total / tokens), (metrics["hidden_loss"], total / tokens)


@pytest.mark.parametrize("overrides, message", [
    (["teacher.kind=vllm", "teacher.url=http://127.0.0.1:9"], r"a remote teacher \(teacher.kind=vllm\) answers"),
    (["teacher.backend=vllm"], "which vLLM does not return: set teacher.backend=hf"),
    (["loss.kind=gkd"], "not gkd: its teacher-sampled batches carry no hidden states"),
    (["learner.num_ranks=2"], "set learner.num_ranks=1"),
    (["loss.hidden={layers: {-1: 0}}"], "negative layer indices"),
])
def test_configurations_that_cannot_work_are_refused(overrides, message):
    from onpolicy.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match=message):
        load_config("configs/toy.yaml", [HIDDEN, *overrides])


def test_a_layer_out_of_range_is_refused_before_engines(tiny_model_dir, tiny_teacher_dir):
    from onpolicy.stack import check

    cfg = load_config("configs/toy.yaml", [f"model.student={tiny_model_dir}", f"teacher.model={tiny_teacher_dir}",
                                           "loss.hidden={layers: {0: 2}}"])
    with pytest.raises(ValueError, match=r"names teacher layer\(s\) \[2\], but the teacher .* has 2 decoder layers"):
        check(cfg)

"""bf16/fp16 students: float32 master weights and optimizer state, autocast forward, float32 log-prob
maths, the push in the engines' dtype; fp16 refused without loss scaling; a bf16 HF teacher; and a
bf16 vLLM engine serving a bf16 learner's push."""

from __future__ import annotations

import math

import pytest
import torch

from onpolicy.config import ConfigError, LoraConfig, RunConfig, load_config
from onpolicy.learner.core import Learner
from tests.test_lora import ITEMS, PROMPTS, batch
from tests.tolerances import BF16_KERNELS, assert_nested_close, worst


def cfg_for(dtype: str, **model) -> RunConfig:
    cfg = RunConfig()
    cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.lr = 0, "constant", 1e-2
    cfg.optim.loss_scaling = dtype == "float16"
    cfg.model.dtype = dtype
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.resources.learner_device = "cpu"
    return cfg


def test_fp16_is_refused_without_loss_scaling():
    with pytest.raises(ConfigError, match=r"model\.dtype=float16 needs loss scaling.*optim\.loss_scaling=true"):
        load_config(None, ["model.dtype=float16"])
    assert load_config(None, ["model.dtype=float16", "optim.loss_scaling=true"]).model.dtype == "float16"
    assert load_config(None, ["model.dtype=bfloat16"]).optim.loss_scaling is False


def test_bf16_learner_step_is_finite_with_fp32_masters_and_fp32_logprobs(tiny_model_dir):
    fp32 = Learner(str(tiny_model_dir), cfg_for("float32"))
    bf16 = Learner(str(tiny_model_dir), cfg_for("bfloat16"))
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # the master weights
    # The forward really ran in bf16: close to the fp32 learner (same weights), yet not equal to it.
    lp32, lp16 = fp32.score(ITEMS), bf16.score(ITEMS)
    # log_softmax ran in float32 on the bf16 logits: its log-probs are not all bf16-rounded values
    assert any(float(torch.tensor(v, dtype=torch.bfloat16)) != v for v in flat(lp16))
    assert flat(lp32) != flat(lp16)
    assert_nested_close(lp16, lp32, BF16_KERNELS, "bf16 vs fp32 learner")

    rollouts, scores = batch(bf16)
    metrics = bf16.train_step(rollouts, scores)
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert metrics["sampler_learner_kl"] == pytest.approx(0.0, abs=1e-5)
    state = next(iter(bf16.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    # The push is in the engines' dtype: half the bytes of the fp32 one.
    update = bf16.weight_update()
    assert {t.dtype for _, t in update.tensors} == {torch.bfloat16}
    assert bf16.push_bytes * 2 == fp32.push_bytes == metrics["full_push_bytes"] * 2


def test_fp16_step_scales_the_loss(tiny_model_dir):
    learner = Learner(str(tiny_model_dir), cfg_for("float16"))
    rollouts, scores = batch(learner)
    before = [p.detach().clone() for p in learner.trainable]
    metrics = learner.train_step(rollouts, scores)
    assert math.isfinite(metrics["loss"]) and metrics["loss_scale"] > 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.trainable))  # the step was not skipped


def test_bf16_lora_keeps_a_bf16_base_and_trains_an_fp32_adapter(tiny_model_dir):
    learner = Learner(str(tiny_model_dir), cfg_for("bfloat16", lora=LoraConfig(rank=8, target_modules=["q_proj"])))
    frozen = {p.dtype for p in learner.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in learner.trainable} == {torch.float32} and learner.trainable
    rollouts, scores = batch(learner)
    assert math.isfinite(learner.train_step(rollouts, scores)["loss"])


def test_hf_teacher_scores_in_bf16(tiny_teacher_dir):
    from onpolicy.teacher.local.engines import HFTeacher

    fp32 = HFTeacher(tiny_teacher_dir, dtype="float32").score(ITEMS, top_k=4)
    bf16 = HFTeacher(tiny_teacher_dir, dtype="bfloat16").score(ITEMS, top_k=4)
    lp32, lp16 = [s.logprobs for s in fp32], [s.logprobs for s in bf16]
    assert flat(lp32) != flat(lp16)
    assert_nested_close(lp16, lp32, BF16_KERNELS, "bf16 vs fp32 teacher")
    assert all(math.isfinite(x) for s in bf16 for x in s.logprobs)


@pytest.mark.slow
def test_bf16_engine_serves_a_bf16_learner_push(ray_session, tiny_model_dir):
    from onpolicy.rollout.pool import push_weights
    from onpolicy.rollout.worker import make_rollout_workers

    cfg = cfg_for("bfloat16", student=str(tiny_model_dir))
    learner = Learner(str(tiny_model_dir), cfg)
    (worker,) = make_rollout_workers(1, str(tiny_model_dir), cfg)
    try:
        assert ray_session.get(worker.info.remote())["dtype"] == "bfloat16"
        rollouts, scores = batch(learner)
        learner.train_step(rollouts, scores)
        mine = learner.score(ITEMS)
        # The push not yet made: the engine serves version 0, far outside bf16 rounding of the learner's
        # version 1 (seen: > 100 relative eps). This is what the check below must catch.
        stale = ray_session.get(worker.score.remote(ITEMS))
        assert worst(flat(stale), flat(mine), BF16_KERNELS) > 1, "a missed push must fail the check"
        assert push_weights(learner.weight_update(), [worker]) == [1]
        # Both run bf16 matmuls on the same bf16-rounded weights; kernels and accumulation order differ,
        # so they agree within a few bf16 steps at each value (tests/tolerances.py).
        assert_nested_close(ray_session.get(worker.score.remote(ITEMS)), mine, BF16_KERNELS, "engine vs learner")
        sampled = ray_session.get(worker.generate.remote([PROMPTS[0]], n=2, max_new_tokens=4, temperature=1.0))
        assert all(r.policy_version == 1 and all(math.isfinite(x) for x in r.sampler_logprobs) for r in sampled)
    finally:
        ray_session.kill(worker)


def flat(xs: list[list[float]]) -> list[float]:
    return [x for row in xs for x in row]

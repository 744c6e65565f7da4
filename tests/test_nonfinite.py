"""Non-finite guard: a step whose loss or gradient norm is not finite changes no weight and is counted; the
driver fails the run, naming the fix, after `schedule.max_nonfinite_steps` such steps in a row."""

from __future__ import annotations

import math

import pytest
import torch

from onpolicy.learner.core import Learner
from onpolicy.step_stats import NonFinite, NonFiniteSteps
from onpolicy.types import TeacherScores
from tests.test_learner import fixed_rollouts, make_cfg, teacher_scores, tiny_model  # noqa: F401 (fixture)


def test_nonfinite_step_changes_no_weight_then_training_goes_on(tiny_model):  # noqa: F811
    learner = Learner(tiny_model, make_cfg(lr=1e-2))
    rollouts = fixed_rollouts(learner)
    good = teacher_scores(rollouts)
    bad = [TeacherScores(logprobs=[float("nan")] * len(s.logprobs)) for s in good]
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    m = learner.train_step(rollouts, bad)
    assert m["skipped_nonfinite"] == 1.0 and not math.isfinite(m["loss"])
    assert all(torch.equal(p, before[n]) for n, p in learner.model.named_parameters())
    assert not learner.optimizer.state  # AdamW never stepped: no moment holds a NaN
    m = learner.train_step(rollouts, good)
    assert m["skipped_nonfinite"] == 0.0 and math.isfinite(m["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in learner.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in learner.model.parameters())


def test_driver_counts_and_fails_after_the_limit_in_a_row():
    state = NonFinite()
    for skipped in (True, True, False, True):  # a finite step resets the streak, not the total
        state = state.after(skipped)
        state.check(3, {})
    assert state == NonFinite(streak=1, total=3)
    state = state.after(True)
    state.check(3, {})
    state = state.after(True)
    with pytest.raises(NonFiniteSteps, match=r"3 steps in a row .*loss=nan.*checkpoints are intact.*optim.lr"):
        state.check(3, {"loss": float("nan"), "grad_norm": float("inf")})

"""A learner group: 2 Ray actors in one gloo process group, the student sharded with FSDP2, against the
1-rank learner on the same batches (fp32, within rounding: tests/tolerances.py), a 2-rank checkpoint resumed on 1 rank, and a 2-rank
run that loses a rank and still learns like the 1-rank reference run.

lr 1e-3: the ranks sum gradients in another order than one rank does, so the losses and gradients agree to
fp32 rounding, and the weights to the rounding AdamW lifts to the step size (`adam_rounding`)."""

from __future__ import annotations

import pytest
import torch

from onpolicy.learner.core import Learner
from onpolicy.learner.distributed import my_micro_batches
from tests.test_learner import fixed_rollouts, make_cfg, teacher_scores, tiny_model  # noqa: F401 (fixture)
from tests.tolerances import FP32_KERNELS, adam_rounding

pytestmark = pytest.mark.slow
LR = 1e-3


def test_micro_batches_are_dealt_round_robin_and_padded():
    assert my_micro_batches(3, 0, 2) == ([0, 2], 0)
    assert my_micro_batches(3, 1, 2) == ([1], 1)  # one empty forward: both ranks run two
    assert my_micro_batches(1, 1, 4) == ([], 1)
    assert my_micro_batches(8, 3, 4) == ([3, 7], 0)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_ranks_train_like_one_and_their_checkpoint_resumes_on_one(ray_session, tiny_model, tmp_path):  # noqa: F811
    from onpolicy.learner.group import make_learner_group

    ray = ray_session
    single = Learner(tiny_model, make_cfg(micro_batch_size=1, lr=LR))
    rollouts = fixed_rollouts(single)
    scores = teacher_scores(rollouts)
    cfg = make_cfg(micro_batch_size=1, lr=LR)
    cfg.learner.num_ranks = 2
    group = make_learner_group(cfg, tiny_model, device="cpu")
    try:
        # 4 micro-batches (2 per rank), then 3 (one rank runs an empty forward)
        for batch in (slice(0, 4), slice(0, 3)):
            one = single.train_step(rollouts[batch], scores[batch])
            two = ray.get(group.train_step.remote(rollouts[batch], scores[batch]))
            for key in ("loss", "grad_norm", "teacher_kl"):
                assert FP32_KERNELS.close(two[key], one[key]), (key, two[key], one[key])
            # both ~0 (sampler and learner in sync): a mean of differences, each within rounding of its log-prob
            assert abs(two["sampler_learner_kl"] - one["sampler_learner_kl"]) <= FP32_KERNELS.at(16)
        update = ray.get(group.weight_update.remote())
        assert update.version == 2
        diff = _max_diff(dict(update.tensors), dict(single.weights()))
        print(f"2 ranks vs 1 after 2 steps: max weight difference {diff:.2e}")
        assert diff < adam_rounding(LR, steps=2)
        ckpt = tmp_path / "step_0000002"
        ray.get(group.save_checkpoint.remote(str(ckpt), {"driver_state.json": {"step": 2, "prompts_drawn": 8}}))
        assert (ckpt / "dcp").is_dir() and (ckpt / "model.safetensors").is_file()
    finally:
        group.kill()
    resumed = Learner(tiny_model, make_cfg(micro_batch_size=1, lr=LR))
    resumed.load_checkpoint(ckpt)  # written by 2 ranks, read by 1
    assert resumed.step == 2
    assert _max_diff(dict(resumed.weights()), dict(update.tensors)) == 0.0
    # the optimiser's moments came along: the next step matches the learner that never stopped
    one = single.train_step(rollouts, scores)
    again = resumed.train_step(rollouts, scores)
    assert FP32_KERNELS.close(again["loss"], one["loss"]), (again["loss"], one["loss"])
    assert _max_diff(dict(resumed.weights()), dict(single.weights())) < adam_rounding(LR, steps=3)


def test_two_learner_ranks_lose_one_recover_and_learn_like_one(ray_session, tiny_model_dir, tiny_teacher_dir,
                                                               tmp_path, reference_run):
    """The reference run (tests/runs.py) again with learner.num_ranks=2, and rank 1 SIGKILLed after the
    checkpoint at step 8: the driver makes a new group, loads that checkpoint and redoes the steps after it
    once; every push, the first after the restart included, goes by broadcast; the engine ends with the
    learner's weights; the held-out reverse KL falls as the 1-rank reference's (same seeds, so the runs
    differ only by float rounding); the group's checkpoint is a torch.distributed one. This run is the
    module's own (it kills a rank). The figures are printed (pytest -s) for the README's fault table."""
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    from onpolicy.driver import Run
    from onpolicy.metrics import read_metrics
    from onpolicy.status import read_status
    from tests.runs import FIXED, STEPS, reference_cfg
    from tests.test_faults import _steps, _wait
    from tests.tolerances import FP32_KERNELS, assert_nested_close

    run = Run(reference_cfg(tiny_model_dir, tiny_teacher_dir, tmp_path, "learner.num_ranks=2"), show_progress=False)
    pool = ThreadPoolExecutor(1)
    try:
        training = pool.submit(run.run)
        _wait(lambda: _steps(tmp_path) >= 10, 300, "10 steps")  # the checkpoint at step 8 exists
        os.kill(ray_session.get(run.learner.ranks[1].pid.remote()), signal.SIGKILL)  # a rank of this test's run
        killed_at = time.time()
        two = training.result(timeout=600)  # the run's own error, if it failed, is raised here
        assert run.sync.collective and run.pushed.by == "collective"
        assert ray_session.get(run.workers[0].version.remote()) == STEPS
        assert_nested_close(ray_session.get(run.workers[0].score.remote(FIXED)),
                            ray_session.get(run.learner.score.remote(FIXED)), FP32_KERNELS, "engine vs learner")
    finally:
        run.close()
        pool.shutdown(wait=True)
    assert read_status(tmp_path)["status"] == "finished" and two["steps"] == STEPS
    train = read_metrics(tmp_path / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # the redone steps logged once
    assert [r["policy_version"] for r in train] == list(range(1, STEPS + 1))
    assert train[-1]["restarts_learner"] == 1
    assert [r["weight_push"] for r in train] == ["collective"] * STEPS
    (fault,) = read_metrics(tmp_path / "metrics.jsonl", kind="fault")
    assert fault["actor"] == "learner" and fault["action"] == "re-created"
    assert fault["checkpoint"].endswith("step_0000008") and fault["steps_redone"] >= 1
    print(f"FAULT learner rank 1: {fault['action']}, {fault['time'] - killed_at:.1f}s from the kill to serving "
          f"again ({fault['recover_seconds']:.1f}s recovering), steps redone {fault['steps_redone']}")
    one = reference_run.summary
    before = one["before"]["heldout_reverse_kl"]
    kl1, kl2 = one["after"]["heldout_reverse_kl"], two["after"]["heldout_reverse_kl"]
    print(f"held-out reverse KL {before:.4f} -> 1 rank {kl1:.4f}, 2 ranks with a rank lost {kl2:.4f}")
    assert two["before"]["heldout_reverse_kl"] == pytest.approx(before, rel=1e-4)
    assert kl1 < 0.8 * before and kl2 == pytest.approx(kl1, rel=0.05)
    assert (tmp_path / "checkpoints" / f"step_{STEPS:07d}" / "dcp").is_dir()

"""A run survives its actors dying: each actor's process is SIGKILLed mid-run (by the pid it reports), and
the run finishes with every step logged once, policy versions without gaps, and a student as good as an
undisturbed run's of the same length.

One faulty run (rollout worker killed, then the local teacher, then the learner after a checkpoint) of the
reference config (tests/runs.py), compared with the undisturbed reference run of the session. The faulty
run is this module's own: nothing it kills is shared. The figures are printed (pytest -s) for the README's
fault table.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from onpolicy.driver import Run
from onpolicy.metrics import read_metrics
from onpolicy.status import read_status
from tests.runs import FIXED, PROMPTS, STEPS, reference_cfg
from tests.tolerances import FP32_KERNELS, assert_nested_close

pytestmark = pytest.mark.slow


def _steps(out) -> int:
    return len(read_metrics(out / "metrics.jsonl", kind="train"))


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(handle) -> int:
    import ray

    pid = ray.get(handle.pid.remote())
    os.kill(pid, signal.SIGKILL)  # an actor process of the run this test started
    return pid


@pytest.fixture(scope="module")
def runs(ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path_factory, reference_run):
    """(faulty run dir, its summary, the undisturbed reference run's summary)."""
    import ray

    out = tmp_path_factory.mktemp("faulty")
    run = Run(reference_cfg(tiny_model_dir, tiny_teacher_dir, out), show_progress=False)
    result: dict = {}

    def go():
        try:
            result["summary"] = run.run()
        except BaseException as err:  # noqa: BLE001 -- surfaced by the assertions
            result["error"] = err

    thread = threading.Thread(target=go)
    thread.start()
    try:
        _wait(lambda: _steps(out) >= 2, 300, "2 steps")
        _kill(run.workers[0])
        _wait(lambda: _steps(out) >= 5, 300, "5 steps after the worker died")
        _kill(run.teacher.first.handle)  # the run's one teacher (a TeacherSet of one)
        _wait(lambda: _steps(out) >= 10, 300, "10 steps after the teacher died")  # checkpoint at 8 exists
        _kill(run.learner)
        thread.join(timeout=600)
        if "summary" in result:  # what only live actors can tell: the engine ends with the learner's weights
            result["engine"] = ray.get(run.workers[0].score.remote(FIXED))
            result["learner"] = ray.get(run.learner.score.remote(FIXED))
    finally:
        run.close()
    assert "error" not in result, repr(result.get("error"))
    assert_nested_close(result["engine"], result["learner"], FP32_KERNELS, "engine vs learner after the faults")
    return out, result["summary"], reference_run.summary


def test_every_step_logged_once_and_versions_without_gaps(runs):
    out, summary, _ = runs
    assert read_status(out)["status"] == "finished" and summary["steps"] == STEPS
    train = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["policy_version"] for r in train] == list(range(1, STEPS + 1))
    assert all(r["sequences"] == PROMPTS for r in train)  # no rollout lost: a dead worker's part is re-sampled
    assert train[-1]["restarts_rollout"] == 1 and train[-1]["restarts_learner"] == 1
    assert train[-1]["teacher_restarts"] == 1
    # the broadcast group is formed again after each restart: no push of the run fell back to the object store
    assert [r["weight_push"] for r in train] == ["collective"] * STEPS


def test_each_fault_is_an_event_with_its_recovery(runs):
    out, _, _ = runs
    faults = read_metrics(out / "metrics.jsonl", kind="fault")
    by_actor = {f["actor"]: f for f in faults}
    assert set(by_actor) == {"rollout_worker_0", "teacher", "learner"}, faults
    learner = by_actor["learner"]
    assert learner["checkpoint"].endswith("step_0000008") and learner["steps_redone"] >= 2
    assert by_actor["rollout_worker_0"]["weights_version"] >= 2  # the restarted worker got current weights
    for f in faults:
        print(f"FAULT {f['actor']}: {f['action']}, recovered in {f['recover_seconds']:.1f}s, "
              f"steps redone {f.get('steps_redone', 0)}")


def test_faulty_run_learns_as_well_as_an_undisturbed_one(runs):
    _, summary, clean = runs
    before = summary["before"]["heldout_reverse_kl"]
    faulty, undisturbed = summary["after"]["heldout_reverse_kl"], clean["after"]["heldout_reverse_kl"]
    print(f"held-out reverse KL: before {before:.4f}, faulty run {faulty:.4f}, undisturbed {undisturbed:.4f}")
    assert clean["before"]["heldout_reverse_kl"] == pytest.approx(before, rel=1e-3)  # same start
    assert undisturbed < 0.8 * before and faulty < 0.8 * before
    assert abs(faulty - undisturbed) < 0.15 * (before - undisturbed), (before, faulty, undisturbed)

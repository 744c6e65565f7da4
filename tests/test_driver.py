"""The whole loop with real vLLM engines, a real learner and Ray: tiny random models, short runs.

One module-scoped run (2 rollout workers, vLLM teacher) is shared by the assertions below,
since every engine takes ~20 s to start on 2 cores.
"""

from __future__ import annotations

import json
import math

import pytest

from onpolicy.config import load_config
from onpolicy.driver import Run
from onpolicy.learner.checkpoint import damage, step_dirs
from onpolicy.metrics import read_metrics
from onpolicy.status import read_status
from onpolicy.types import ScoreRequestItem

pytestmark = pytest.mark.slow

STEPS = 24


def _cfg(student, teacher, out, *extra):
    return load_config(None, [
        f"model.student={student}", f"teacher.model={teacher}", f"output_dir={out}",
        "rollout.num_workers=2", "rollout.prompts_per_step=32", "rollout.max_new_tokens=6",
        "optim.lr=0.003", "optim.warmup_steps=0", "optim.schedule=constant", "optim.micro_batch_size=16",
        f"schedule.steps={STEPS}", "eval.every=12", "eval.num_prompts=64", "eval.ood_num_prompts=16",
        "checkpoint.every=12", "checkpoint.keep=1", *extra,
    ])


@pytest.fixture(scope="module")
def finished_run(ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run = Run(_cfg(tiny_model_dir, tiny_teacher_dir, out), show_progress=False)
    summary = run.run()
    yield run, summary, out
    run.close()


def test_short_run_lowers_heldout_reverse_kl(finished_run):
    _, summary, _ = finished_run
    before, after = summary["before"]["heldout_reverse_kl"], summary["after"]["heldout_reverse_kl"]
    assert summary["steps"] == STEPS
    assert after < 0.7 * before, f"held-out reverse KL {before:.4f} -> {after:.4f}"


def test_every_step_is_logged_on_policy(finished_run):
    _, _, out = finished_run
    train = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        # workers serve exactly the learner's new version after every push...
        assert r["policy_version"] == r["step"]
        # ...so the sampler and the learner agree on the sampled tokens (weights in sync).
        assert abs(r["sampler_learner_kl"]) < 1e-3, r
        assert r["policy_lag"] == 0
        assert r["sequences"] == 32 and r["sampled_tokens"] > 0
        assert sum(r[f"{s}_share"] for s in ("rollout", "score", "learn", "push")) == pytest.approx(1.0)
    evals = read_metrics(out / "metrics.jsonl", kind="eval")
    assert [e["step"] for e in evals] == [0, 12, STEPS]
    assert all("ood_reverse_kl" in e and "heldout_accuracy" in e for e in evals)


def test_two_workers_serve_the_final_version(finished_run):
    run, _, _ = finished_run
    assert len(run.workers) == 2
    assert ray_get([w.version.remote() for w in run.workers]) == [STEPS, STEPS]


def test_weight_push_engine_logprobs_equal_learner_logprobs(finished_run):
    """After learner steps and collective pushes (rollout.weight_sync=auto forms the broadcast group), vLLM
    scores fixed sequences as the learner does (fp32, 1e-4)."""
    run, _, _ = finished_run
    assert run.collective and run.push_by == "collective"
    items = [ScoreRequestItem(prompt_ids=[1, 5, 6, 14, 7, 15], completion_ids=[9, 4, 2]),
             ScoreRequestItem(prompt_ids=[1, 13, 14, 13, 15], completion_ids=[5, 12, 10, 11, 2])]
    learner_lp = ray_get(run.learner.score.remote(items))
    for worker in run.workers:
        engine_lp = ray_get(worker.score.remote(items))
        for a, b in zip(learner_lp, engine_lp):
            assert len(a) == len(b)
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_checkpoint_and_final_student_written(finished_run):
    _, summary, out = finished_run
    ckpt = step_dirs(out / "checkpoints")[-1]
    assert ckpt.name == f"step_{STEPS:07d}" and damage(ckpt) is None  # sealed: marker and sizes agree
    assert summary["checkpoint"] == str(ckpt)
    assert json.loads((ckpt / "driver_state.json").read_text())["step"] == STEPS
    assert len(list((out / "checkpoints").glob("step_*"))) == 1  # keep=1
    assert (out / "student" / "config.json").is_file()
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    status = read_status(out)
    assert status["status"] == "finished" and status["step"] == STEPS


def test_resume_continues_from_the_checkpoint(finished_run, tiny_model_dir, tiny_teacher_dir):
    """A second run on the same directory picks up step, prompt stream and optimiser state."""
    first, _, out = finished_run
    first.close()  # free the cores for the resumed run's engines
    cfg = _cfg(tiny_model_dir, tiny_teacher_dir, out, f"schedule.steps={STEPS + 2}", "eval.every=0")
    run = Run(cfg, resume=True, show_progress=False)
    try:
        assert run.step == STEPS
        assert run.source.drawn == STEPS * 32
        assert ray_get(run.learner.step.remote()) == STEPS
        summary = run.run()
    finally:
        run.close()
    assert summary["steps"] == STEPS + 2
    train = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 3))  # every step once
    # the resumed run keeps the first run's "before" instead of evaluating step 24 again
    assert [e["step"] for e in read_metrics(out / "metrics.jsonl", kind="eval")] == [0, 12, STEPS, STEPS + 2]
    assert summary["before"]["heldout_reverse_kl"] == read_metrics(out / "metrics.jsonl", kind="eval")[0][
        "heldout_reverse_kl"]


def ray_get(refs):
    import ray

    return ray.get(refs)


def test_pipelined_run_never_trains_on_a_batch_more_than_k_behind(ray_session, tiny_model_dir, tiny_teacher_dir,
                                                                   tmp_path):
    """max_staleness=2: the next two steps are sampled while one learns; every trained rollout is at most 2
    versions behind (exactly 2 once the pipe is full), the importance ratio sees the lag, and a checkpoint
    records only the prompts trained on, so a resume re-samples the ones that were in flight. (Learning
    quality with a lag is measured by the demo with max_staleness=1, see README.)"""
    k, steps = 2, 16
    cfg = _cfg(tiny_model_dir, tiny_teacher_dir, tmp_path, f"schedule.max_staleness={k}", f"schedule.steps={steps}",
               "rollout.num_workers=1", "eval.every=0", "checkpoint.every=8")
    run = Run(cfg, show_progress=False)
    try:
        summary = run.run()
        assert run.prompts_trained == steps * 32 and run.source.drawn == (steps + k) * 32
    finally:
        run.close()
    train = read_metrics(tmp_path / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    lags = [r["policy_lag_max"] for r in train]
    assert max(lags) <= k and lags[k:] == [k] * (steps - k), lags
    assert all(r["stale_dropped"] == 0 and r["sequences"] == 32 for r in train)
    assert [r["policy_lag"] for r in train][k:] == [k] * (steps - k)  # the learner's own view agrees
    assert any(abs(r["sampler_learner_kl"]) > 1e-4 for r in train[k:])  # stale samples: the ratio is at work
    assert all(r["overlap"] > 0 for r in train)
    assert all(math.isfinite(r["loss"]) and r["ratio_max"] >= 1.0 for r in train[k:])
    assert summary["steps"] == steps
    state = json.loads((step_dirs(tmp_path / "checkpoints")[-1] / "driver_state.json").read_text())
    assert state == {"step": steps, "prompts_drawn": steps * 32}


def test_nonfinite_local_teacher_scores_are_refused_with_the_reason(
        ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path):
    """A local teacher whose weights hold a NaN: its scores are validated like a remote teacher's, so the
    first step fails the run naming the sequence and token, before any number reaches the loss; no step is
    applied or checkpointed. (A non-finite loss from the learner's own side is skipped and counted:
    tests/test_nonfinite.py.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    from onpolicy.driver import train
    from onpolicy.teacher.http import TeacherResponseError

    teacher = tmp_path / "nan_teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    weights = load_file(teacher / "model.safetensors")
    weights["lm_head.weight"][3, 0] = float("nan")
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, teacher, out, "rollout.num_workers=1", "checkpoint.every=1", "eval.every=0",
               "schedule.steps=8")
    with pytest.raises(TeacherResponseError, match=r"local teacher .*sequence \d+, token \d+: log-prob is nan"):
        train(cfg, show_progress=False)
    status = read_status(out)
    assert status["status"] == "failed" and "log-prob is nan" in status["reason"]
    assert read_metrics(out / "metrics.jsonl", kind="train") == []
    assert not list((out / "checkpoints").glob("step_*"))

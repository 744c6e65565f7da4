"""The whole loop with real vLLM engines, a real learner and Ray: tiny random models, short runs.

The undisturbed reference run (`reference_run` in conftest.py, config in tests/runs.py) is shared with the
fault and learner-group tests; a pipelined run with two rollout workers is this module's own. Resuming a
finished run is checked on the README's own `--resume` line (tests/test_readme_commands.py).
"""

from __future__ import annotations

import json
import math

import pytest

from onpolicy.driver import Run
from onpolicy.learner.checkpoint import damage, step_dirs
from onpolicy.metrics import read_metrics
from onpolicy.status import read_status
from tests.runs import EVAL_EVERY, FIXED, PROMPTS, STEPS, reference_cfg
from tests.tolerances import FP32_KERNELS, assert_nested_close

pytestmark = pytest.mark.slow
IN_SYNC = FP32_KERNELS.at(16)  # |sampler_learner_kl| of a sampler and learner on the same weights


def test_short_run_lowers_heldout_reverse_kl(reference_run):
    summary = reference_run.summary
    before, after = summary["before"]["heldout_reverse_kl"], summary["after"]["heldout_reverse_kl"]
    assert summary["steps"] == STEPS
    assert after < 0.7 * before, f"held-out reverse KL {before:.4f} -> {after:.4f}"


def test_every_step_is_logged_on_policy(reference_run):
    out = reference_run.out
    train = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        # the worker serves exactly the learner's new version after every push...
        assert r["policy_version"] == r["step"]
        # ...so the sampler and the learner agree on the sampled tokens (weights in sync): a mean of per-token
        # differences, each within fp32 kernel rounding at its log-prob (IN_SYNC: log-probs up to 16 nats).
        assert abs(r["sampler_learner_kl"]) < IN_SYNC, r
        assert r["policy_lag"] == 0
        assert r["sequences"] == PROMPTS and r["sampled_tokens"] > 0
        assert sum(r[f"{s}_share"] for s in ("rollout", "score", "learn", "push")) == pytest.approx(1.0)
    evals = read_metrics(out / "metrics.jsonl", kind="eval")
    assert [e["step"] for e in evals] == [0, EVAL_EVERY, STEPS]
    assert all("ood_reverse_kl" in e and "heldout_accuracy" in e for e in evals)


def test_weight_push_engine_logprobs_equal_learner_logprobs(reference_run):
    """After learner steps and collective pushes (rollout.weight_sync=auto forms the broadcast group), the
    engine serves the final version and scores fixed sequences as the learner does."""
    assert reference_run.collective and reference_run.push_by == "collective"
    assert reference_run.worker_versions == [STEPS]
    for engine in reference_run.engine_logprobs:
        assert_nested_close(engine, reference_run.learner_logprobs, FP32_KERNELS, "engine vs learner")


def test_checkpoint_and_final_student_written(reference_run):
    out, summary = reference_run.out, reference_run.summary
    ckpt = step_dirs(out / "checkpoints")[-1]
    assert ckpt.name == f"step_{STEPS:07d}" and damage(ckpt) is None  # sealed: marker and sizes agree
    assert summary["checkpoint"] == str(ckpt)
    assert json.loads((ckpt / "driver_state.json").read_text())["step"] == STEPS
    assert [p.name for p in step_dirs(out / "checkpoints")] == ["step_0000012", "step_0000016"]  # keep=2
    assert (out / "student" / "config.json").is_file()
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    status = read_status(out)
    assert status["status"] == "finished" and status["step"] == STEPS


def test_pipelined_run_never_trains_on_a_batch_more_than_k_behind(ray_session, tiny_model_dir, tiny_teacher_dir,
                                                                   tmp_path):
    """max_staleness=2 with two rollout workers: the next two steps are sampled while one learns, each
    worker's part scored as it lands; every trained rollout is at most 2 versions behind (exactly 2 once the
    pipe is full), the importance ratio sees the lag, both engines serve the final version with the learner's
    weights, and a checkpoint records only the prompts trained on, so a resume re-samples the ones that were
    in flight. (Learning quality with a lag is measured by the demo with max_staleness=1, see README.)"""
    import ray

    k, steps = 2, 12
    cfg = reference_cfg(tiny_model_dir, tiny_teacher_dir, tmp_path, f"schedule.max_staleness={k}",
                        f"schedule.steps={steps}", "rollout.num_workers=2", "eval.every=0", "eval.num_prompts=16",
                        "eval.ood_num_prompts=0", "checkpoint.every=6")
    run = Run(cfg, show_progress=False)
    try:
        summary = run.run()
        assert run.prompts_trained == steps * PROMPTS and run.source.drawn == (steps + k) * PROMPTS
        assert ray.get([w.version.remote() for w in run.workers]) == [steps, steps]
        learner = ray.get(run.learner.score.remote(FIXED))
        for engine in ray.get([w.score.remote(FIXED) for w in run.workers]):
            assert_nested_close(engine, learner, FP32_KERNELS, "engine vs learner")
    finally:
        run.close()
    train = read_metrics(tmp_path / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    lags = [r["policy_lag_max"] for r in train]
    assert max(lags) <= k and lags[k:] == [k] * (steps - k), lags
    assert all(r["stale_dropped"] == 0 and r["sequences"] == PROMPTS for r in train)
    assert [r["policy_lag"] for r in train][k:] == [k] * (steps - k)  # the learner's own view agrees
    # stale samples: the learner has moved off the sampler by more than rounding, and the ratio is at work
    print("sampler-learner KL at lag 2:", [round(r["sampler_learner_kl"], 5) for r in train[k:]])
    assert any(abs(r["sampler_learner_kl"]) > IN_SYNC for r in train[k:])
    assert all(r["overlap"] > 0 for r in train)
    assert all(math.isfinite(r["loss"]) and r["ratio_max"] >= 1.0 for r in train[k:])
    assert summary["steps"] == steps
    state = json.loads((step_dirs(tmp_path / "checkpoints")[-1] / "driver_state.json").read_text())
    assert state == {"step": steps, "prompts_drawn": steps * PROMPTS}


def test_nonfinite_local_teacher_scores_are_refused_naming_sequence_and_token(ray_session, tiny_teacher_dir,
                                                                                tmp_path):
    """A local teacher whose weights hold a NaN: its scores are validated like a remote teacher's, naming the
    sequence and token, before any number can reach a loss. (What a run does with a bad teacher answer, the
    run failing with the reason and nothing applied or checkpointed, is shown once, with a remote teacher, in
    tests/test_driver_remote.py; a non-finite loss from the learner's own side: tests/test_nonfinite.py.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    from onpolicy.config import load_config
    from onpolicy.teacher.errors import TeacherResponseError
    from onpolicy.teacher.factory import open_teacher

    teacher_dir = tmp_path / "nan_teacher"
    shutil.copytree(tiny_teacher_dir, teacher_dir)
    weights = load_file(teacher_dir / "model.safetensors")
    weights["lm_head.weight"][3, 0] = float("nan")
    save_file(weights, teacher_dir / "model.safetensors", metadata={"format": "pt"})
    teacher = open_teacher(load_config(None, [f"teacher.model={teacher_dir}"]).teacher)
    try:
        with pytest.raises(TeacherResponseError, match=r"local teacher .*sequence \d+, token \d+: log-prob is nan"):
            teacher.score(FIXED, top_k=0)
    finally:
        teacher.close()

"""The working task end to end, cut to a couple of steps: `onpolicy demo --config configs/working.yaml` on the
committed models (retention, the unseen split and the per-token KL's tail in its report, metrics and plot),
and `bench/quality.py` as a 2-step smoke on one length of its answer-length sweep (the measured sweep is docs/quality.md's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
PROBE = ("eval.retention=[{name: subtraction, num_prompts: 16, data: {task: working, operation: subtract, "
         "min_digits: 1, max_digits: 3}}]")


def test_working_demo_reports_retention_unseen_and_the_tail(ray_session, tmp_path):
    from onpolicy.demo import run_demo
    from onpolicy.metrics import read_metrics

    out = tmp_path / "demo"
    rep = run_demo(str(out), str(tmp_path / "working"), str(ROOT / "configs" / "working.yaml"), [
        "schedule.steps=2", "eval.every=1", "eval.num_prompts=16", "eval.ood_num_prompts=4",
        "rollout.prompts_per_step=8", "checkpoint.every=0", PROBE])
    assert rep["steps"] == 2 and rep["teacher_accuracy"] >= 0.9 and rep["student_accuracy_before"] <= 0.8
    keep = rep["retention"]["subtraction"]
    assert keep["accuracy_before"] >= 0.75  # the student's second skill, learnt in mid-training
    assert isinstance(keep["flagged"], bool) and rep["retention_flagged"] == (["subtraction"] if keep["flagged"] else [])
    for split in ("ood", "unseen"):
        assert f"{split}_student_accuracy_after" in rep and f"{split}_teacher_accuracy" in rep
    evals = read_metrics(out / "metrics.jsonl", kind="eval")
    assert [e["step"] for e in evals] == [0, 1, 2]
    # At step 0 the student is its starting self: its reverse KL to the frozen copy is rounding (vLLM's fp32
    # engine vs transformers), where any other model would be far (the teacher's is > 0.1 here).
    assert evals[0]["retention_subtraction_reverse_kl"] < 1e-3 < evals[0]["heldout_reverse_kl"]
    for e in evals:
        assert e["heldout_token_kl_p50"] <= e["heldout_token_kl_p99"] <= e["heldout_token_kl_max"]
        assert 0.0 <= e["heldout_rare_share"] <= 1.0 and "unseen_reverse_kl" in e
    summary = json.loads((out / "summary.json").read_text())
    assert summary["retention"]["subtraction"]["accuracy_before"] == keep["accuracy_before"]
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_length_sweep_smoke(ray_session, tmp_path):
    """One length x on-policy and sft, one lr, one seed, 2 steps each: the arms run through `onpolicy train`,
    the crossing table is read and the curves plotted (the numbers mean nothing at 2 steps). What only the
    sweep over lengths adds is pure and tested on made-up points (tests/test_eval_stats.py: the ratio per
    length, its table and plot; tests/test_working.py: the lengths' answer sizes), so one length runs here."""
    from onpolicy.working.build import build_working_models

    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    build_working_models(tmp_path / "working")
    summary = quality.main([
        "--lengths", "short", "--methods", "on_policy,sft", "--lrs", "1e-3", "--seeds", "0", "--steps", "2",
        "--eval-prompts", "8", "--models", str(tmp_path / "working"), "--out", str(tmp_path / "q"),
        "rollout.prompts_per_step=4"])
    res = summary["lengths"]["short"]
    assert set(res["methods"]) == {"on_policy", "sft"} and res["teacher_heldout_accuracy"] >= 0.9
    for method in ("on_policy", "sft"):
        points = res["methods"][method]["seeds"]["0"]
        assert [p["step"] for p in points] == [0, 1, 2] and points[-1]["teacher_tokens"] > 0
    assert 10 < res["answer_tokens"] < 30  # 1-2 digit operands: ~19 characters of working + EOS
    assert (tmp_path / "q" / "quality_short.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["steps"] == 2

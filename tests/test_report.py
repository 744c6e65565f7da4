"""Report maths, stage accounting and the plot, without engines."""

import json
import math

import pytest

from onpolicy.heldout import mean_reverse_kl
from onpolicy.metrics import MetricsLog, read_metrics
from onpolicy.report import build_report, format_table, gap_closed, plot_eval
from onpolicy.rollout.pool import shard
from onpolicy.stage_bench import summarise
from onpolicy.step_stats import STAGES, stage_metrics
from onpolicy.types import Rollout


def test_gap_closed():
    assert gap_closed(0.2, 0.8, 1.0) == pytest.approx(0.75)
    assert math.isnan(gap_closed(0.9, 0.95, 0.9))


def test_shard_keeps_order_and_sizes():
    items = list(range(11))
    parts = shard(items, 3)
    assert [len(p) for p in parts] == [4, 4, 3]
    assert [x for p in parts for x in p] == items
    assert shard([1], 3) == [[1], [], []]


def test_mean_reverse_kl_is_token_weighted():
    r1 = Rollout(prompt_ids=[1], completion_ids=[3, 4], sampler_logprobs=[-0.1, -0.2], policy_version=0)
    r2 = Rollout(prompt_ids=[1], completion_ids=[5], sampler_logprobs=[-1.0], policy_version=0)
    kl = mean_reverse_kl([r1, r2], [[-0.5, -0.2], [-1.6]])
    k3 = [math.expm1(-d) + d for d in (0.4, 0.0, 0.6)]  # r = log q - log p per token
    assert kl == pytest.approx(sum(k3) / 3)
    # never negative, even where the teacher is more confident than the student on a token
    assert mean_reverse_kl([r2], [[-0.5]]) > 0


def test_k3_estimator_is_unbiased_for_reverse_kl():
    import random

    q, p = [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]
    exact = sum(a * math.log(a / b) for a, b in zip(q, p))
    rng = random.Random(0)
    rolls, teach = [], []
    for _ in range(20000):
        i = rng.choices(range(3), weights=q)[0]
        rolls.append(Rollout(prompt_ids=[1], completion_ids=[i], sampler_logprobs=[math.log(q[i])],
                             policy_version=0))
        teach.append([math.log(p[i])])
    assert mean_reverse_kl(rolls, teach) == pytest.approx(exact, rel=0.05)


def test_stage_metrics_shares_sum_to_one():
    m = stage_metrics({"rollout": 1.0, "score": 0.5, "learn": 2.0, "push": 0.5}, tokens=400)
    assert sum(m[f"{s}_share"] for s in STAGES) == pytest.approx(1.0)
    assert m["rollout_tokens_per_second"] == pytest.approx(400)
    assert m["tokens_per_second"] == pytest.approx(100)
    s = summarise([dict(m, sampled_tokens=400), dict(m, sampled_tokens=400)])
    assert s["learn"]["share"] == pytest.approx(0.5) and s["step"]["tokens_per_second"] == pytest.approx(100)


def test_report_plot_and_metrics_log(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", total_steps=2, show_progress=False)
    for step, (kl, acc) in enumerate([(1.0, 0.1), (0.2, 0.8)]):
        log.eval(step, {"heldout_reverse_kl": kl, "heldout_accuracy": acc, "ood_reverse_kl": kl * 2,
                        "ood_accuracy": acc / 2})
    log.train(1, {"teacher_kl": float("nan")})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl", kind="train")[0]["teacher_kl"] is None  # NaN -> null
    plot_eval(tmp_path / "metrics.jsonl", tmp_path / "eval.png")
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {"heldout_accuracy": 0.1, "heldout_reverse_kl": 1.0, "ood_accuracy": 0.05, "ood_reverse_kl": 2.0}
    after = {"heldout_accuracy": 0.8, "heldout_reverse_kl": 0.2, "ood_accuracy": 0.4, "ood_reverse_kl": 0.4}
    rep = build_report({"before": before, "after": after, "distill_wall_seconds": 10.0, "eval_wall_seconds": 1.0,
                        "steps": 2, "student": "s"}, {"heldout": 1.0, "ood": 0.9})
    assert rep["gap_closed"] == pytest.approx(0.7 / 0.9)
    assert rep["reverse_kl_reduction"] == pytest.approx(5.0)
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "heldout_reverse_kl_before",
                "heldout_reverse_kl_after", "distill_wall_seconds", "steps", "ood_student_accuracy_after",
                "ood_reverse_kl_after"):
        assert key in rep
    json.dumps(rep)
    assert "gap closed: 0.78" in format_table(rep)


def test_overlap_is_busy_time_over_wall_time():
    waits = {"rollout": 0.0, "score": 0.0, "learn": 0.3, "push": 0.01}
    busy = {"rollout": 0.25, "score": 0.2, "learn": 0.28, "push": 0.01}
    m = stage_metrics(waits, tokens=100, wall=0.35, busy=busy)
    assert m["overlap"] == pytest.approx(0.74 / 0.35) and m["step_seconds"] == pytest.approx(0.35)
    assert m["rollout_busy_seconds"] == 0.25 and m["tokens_per_second"] == pytest.approx(100 / 0.35)
    s = summarise([dict(m, sampled_tokens=100, sequences=10)] * 3)
    assert s["step"]["overlap"] == pytest.approx(0.74 / 0.35) and s["step"]["sequences_per_second"] == pytest.approx(
        10 / 0.35)
    assert s["rollout"]["busy_seconds_per_step"] == pytest.approx(0.25)


def test_staleness_filter_drops_what_is_more_than_k_behind():
    from onpolicy.step_stats import staleness_filter

    keep, lags = staleness_filter([5, 4, 3, 5], learner_version=5, max_staleness=1)
    assert keep == [0, 1, 3] and lags == [0, 1, 2, 0]
    assert staleness_filter([2], 2, 0) == ([0], [0])

"""The evaluation statistics added for issue 28, each against a float64 brute force: the per-token reverse KL
terms and their tail (quantiles, the KL at rare tokens), the retention flags, the report and plot that carry
them, the eval schedule, and the quality bench's crossing read-out. No engines."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from onpolicy.config import ConfigError, EvalConfig, load_config
from onpolicy.heldout import RARE_P, mean_reverse_kl, quantile, tail_stats, token_kl_terms
from onpolicy.metrics import MetricsLog
from onpolicy.report import build_report, format_table, plot_eval
from onpolicy.retention import ProbeSet, retention_summary
from onpolicy.types import Rollout
from tests.tolerances import FP64_ORDER, assert_close

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import quality  # bench/quality.py: its pure functions


def _rollout(logprobs: list[float]) -> Rollout:
    return Rollout(prompt_ids=[1], completion_ids=list(range(len(logprobs))), sampler_logprobs=logprobs,
                   policy_version=0)


def test_token_terms_are_k3_per_token_in_float64():
    rng = np.random.default_rng(0)
    q = [rng.uniform(-6, 0, size=n).tolist() for n in (3, 1, 5)]
    p = [rng.uniform(-12, 0, size=len(x)).tolist() for x in q]
    terms, teacher = token_kl_terms([_rollout(x) for x in q], p)
    r = np.concatenate([np.array(a, dtype=np.float64) - np.array(b, dtype=np.float64) for a, b in zip(q, p)])
    brute = (np.exp(-r) - 1 + r).tolist()  # naive: cancels near r = 0, where the code's expm1 does not
    assert_close(terms, brute, FP64_ORDER, "k3 terms")
    assert teacher == [v for x in p for v in x]
    assert_close([mean_reverse_kl([_rollout(x) for x in q], p)], [sum(brute) / len(brute)], FP64_ORDER, "mean")


def test_per_token_terms_average_to_the_exact_kl_at_each_position():
    """Enumerate every completion of a two-token toy model: the per-position mean of the k3 terms, weighted by
    the student's probability of each completion, is that position's exact KL(q || p) (float64)."""
    vocab = 3

    def dist(*prefix):  # a fixed distribution per prefix, for the student and the teacher
        g = np.random.default_rng(abs(hash(prefix)) % 2**32)
        return g.dirichlet(np.ones(vocab)), g.dirichlet(np.ones(vocab) * 0.5)

    expected_terms = np.zeros(2)
    exact = np.zeros(2)
    for y in itertools.product(range(vocab), repeat=2):
        qs, ps = zip(*(dist(*y[:t]) for t in range(2)))
        weight = qs[0][y[0]] * qs[1][y[1]]
        terms, _ = token_kl_terms([_rollout([math.log(qs[t][y[t]]) for t in range(2)])],
                                  [[math.log(ps[t][y[t]]) for t in range(2)]])
        expected_terms += weight * np.array(terms)
        exact[1] += qs[0][y[0]] * qs[1][y[1]] * math.log(qs[1][y[1]] / ps[1][y[1]])
    q0, p0 = dist()
    exact[0] = float(np.sum(q0 * np.log(q0 / p0)))
    np.testing.assert_allclose(expected_terms, exact, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_quantiles_are_numpys_linear_ones(n):
    values = np.random.default_rng(n).lognormal(size=n).tolist()
    for q in (0.0, 0.5, 0.95, 0.99, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(np.array(values, np.float64), q)), rel=1e-15)
    assert math.isnan(quantile([], 0.5))


def test_tail_stats_against_a_brute_force():
    rng = np.random.default_rng(3)
    terms = rng.exponential(size=500).tolist()
    teacher = np.log(rng.uniform(1e-4, 1, size=500)).tolist()
    teacher[:3] = [math.log(RARE_P), math.nextafter(math.log(RARE_P), -math.inf), math.log(0.5)]  # the boundary
    stats = tail_stats(terms, teacher)
    t, p = np.array(terms), np.array(teacher)
    rare = p < math.log(0.01)
    assert not rare[0] and rare[1]  # exactly 1 % is not rare; a hair below is
    assert stats["rare_kl"] == pytest.approx(float(t[rare].mean()), rel=1e-13)
    assert stats["rare_share"] == pytest.approx(float(rare.mean()), rel=1e-15)
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        assert stats[f"token_kl_{name}"] == pytest.approx(float(np.quantile(t, q)), rel=1e-15)
    assert stats["token_kl_max"] == t.max()
    none = tail_stats([0.1, 0.2], [-0.1, -0.2])
    assert math.isnan(none["rare_kl"]) and none["rare_share"] == 0.0


def test_a_spike_at_rare_tokens_shows_in_the_tail_while_the_mean_falls():
    """The seed's warning, in numbers: the mean per-token KL falls while the KL at rare tokens doubles."""
    teacher = [-0.01] * 990 + [-5.0] * 10  # 1 % of the sampled tokens are ones the teacher gives < 1 %
    before_terms, after_terms = [0.01] * 990 + [0.5] * 10, [0.001] * 990 + [1.0] * 10
    before, after = tail_stats(before_terms, teacher), tail_stats(after_terms, teacher)
    assert sum(after_terms) < 0.75 * sum(before_terms)
    assert after["rare_kl"] == pytest.approx(1.0) == 2 * before["rare_kl"] and after["rare_share"] == 0.01
    assert after["token_kl_max"] == 1.0 > before["token_kl_max"] and after["token_kl_p50"] < before["token_kl_p50"]


def test_retention_summary_flags_a_drop_beyond_the_threshold():
    probes = [ProbeSet("subtraction", [], 0.05), ProbeSet("other", [], 0.2), ProbeSet("later", [], 0.05)]
    before = {"retention_subtraction_accuracy": 0.9, "retention_other_accuracy": 0.5}
    after = {"retention_subtraction_accuracy": 0.84, "retention_subtraction_reverse_kl": 0.3,
             "retention_other_accuracy": 0.35, "retention_later_accuracy": 0.1}
    out = retention_summary(before, after, probes)
    assert set(out) == {"subtraction", "other"}  # `later` was not in the first evaluation
    assert out["subtraction"]["drop"] == pytest.approx(0.06) and out["subtraction"]["flagged"]
    assert out["other"]["drop"] == pytest.approx(0.15) and not out["other"]["flagged"]
    assert out["subtraction"]["reverse_kl_to_start_after"] == 0.3
    exact = retention_summary({"retention_s_accuracy": 0.75}, {"retention_s_accuracy": 0.6875}, [ProbeSet("s", [], 0.0625)])
    assert exact["s"]["drop"] == 0.0625 and not exact["s"]["flagged"]  # a drop of exactly max_drop is kept


def test_eval_schedule_and_probe_config():
    cfg = EvalConfig(every=50, at=[1, 2, 3, 7])
    assert [s for s in range(1, 120) if cfg.due(s)] == [1, 2, 3, 7, 50, 100]
    assert [s for s in range(1, 5) if EvalConfig(every=0).due(s)] == []
    cfg = load_config(ROOT / "configs" / "working.yaml")
    assert [p.name for p in cfg.eval.retention] == ["subtraction"]
    assert cfg.eval.retention[0].data.operation == "subtract"
    twice = "eval.retention=[{name: a, data: {task: addition}}, {name: a, data: {task: addition}}]"
    with pytest.raises(ConfigError, match="more than once"):
        load_config(None, [twice])
    with pytest.raises(ConfigError, match="eval.retention.0.name"):
        load_config(None, ["eval.retention=[{name: 'no spaces', data: {task: addition}}]"])
    assert load_config(None, ["eval.retention=[{name: a, data: {}}]"]).eval.retention[0].data.task == "addition"


def test_probe_sets_need_answers_and_fit(tmp_path):
    from onpolicy.retention import open_retention
    from onpolicy.toy.tokenizer import build_tokenizer

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1=", "split": "heldout", "answer": "2"}\n{"prompt": "2+2="}\n')
    cfg = load_config(None, [f"eval.retention=[{{name: p, data: {{task: jsonl, prompts_path: {path}}}}}]"])
    ret = open_retention(cfg, "unused", build_tokenizer(), 100, "limit")
    assert [e.prompt for e in ret.probes[0].examples] == ["1+1="] and ret.start_dir == "unused"
    with pytest.raises(ValueError, match=r"eval.retention\[0\] \(p\): 1 prompt\(s\) are longer than 3 tokens"):
        open_retention(cfg, "unused", build_tokenizer(), 3, "limit")
    path.write_text('{"prompt": "2+2="}\n')
    with pytest.raises(ValueError, match="no held-out prompts"):
        open_retention(cfg, "unused", build_tokenizer(), 100, "limit")
    assert open_retention(load_config(None, []), "unused", build_tokenizer(), 100, "limit") is None


def _eval_record(acc: float, kl: float, keep: float) -> dict:
    rec = {"heldout_accuracy": acc, "heldout_reverse_kl": kl, "ood_accuracy": 0.0, "ood_reverse_kl": 3.0,
           "unseen_accuracy": 0.0, "unseen_reverse_kl": 4.0, "retention_sub_accuracy": keep,
           "retention_sub_reverse_kl": 1 - keep}
    rec.update({f"heldout_token_kl_{q}": kl * m for q, m in (("p50", 0.5), ("p95", 2), ("p99", 4), ("max", 9))})
    rec.update(heldout_rare_kl=kl * 5, heldout_rare_share=0.01)
    return rec


def test_report_carries_unseen_tail_and_retention(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", total_steps=2, show_progress=False)
    for step, (acc, kl, keep) in enumerate([(0.3, 1.0, 0.95), (0.9, 0.2, 0.7)]):
        log.eval(step, _eval_record(acc, kl, keep))
    log.close()
    plot_eval(tmp_path / "metrics.jsonl", tmp_path / "eval.png")
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before, after = _eval_record(0.3, 1.0, 0.95), _eval_record(0.9, 0.2, 0.7)
    summary = {"before": before, "after": after, "distill_wall_seconds": 1.0, "eval_wall_seconds": 1.0, "steps": 2,
               "student": "s", "retention": retention_summary(before, after, [ProbeSet("sub", [], 0.05)])}
    rep = build_report(summary, {"heldout": 1.0, "ood": 1.0, "unseen": 0.1})
    assert rep["unseen_teacher_accuracy"] == 0.1 and rep["unseen_reverse_kl_after"] == 4.0
    assert rep["heldout_token_kl_p99_before"] == 4.0 and rep["heldout_rare_kl_after"] == pytest.approx(1.0)
    assert rep["retention_flagged"] == ["sub"] and rep["retention"]["sub"]["accuracy_after"] == 0.7
    json.dumps(rep)
    table = format_table(rep)
    assert "unseen (no model trained) accuracy" in table and "retention sub accuracy" in table
    assert "DROPPED" in table and "RETENTION: sub exact match fell 0.250 (0.950 -> 0.700)" in table
    assert "per-token KL p99" in table


def test_geometric_schedule_reads_a_crossing_within_the_ratio():
    steps = quality.geometric_steps(300)
    assert steps[:10] == list(range(1, 11)) and steps[-1] < 300
    assert all(b <= max(a + 1, a * 1.2) for a, b in itertools.pairwise(steps))
    points = [{"step": s, "teacher_tokens": 100 * s, "heldout_accuracy": min(1.0, s / 200)} for s in [0, *steps, 300]]
    c = quality.crossing(points, 0.9)
    assert c["step"] == min(s for s in steps if s >= 180) and c["tokens"] / c["below"] <= 1.2
    assert quality.crossing(points, 1.01) is None


def test_ratio_reads_a_lower_bound_when_sft_never_gets_there():
    def method(tokens):
        pts = [{"step": 0, "teacher_tokens": 0, "heldout_accuracy": 0.1}, {"step": 9, "teacher_tokens": 4e6,
                                                                          "heldout_accuracy": 0.2}]
        return {"crossings": {"0": None if tokens is None else {"tokens": tokens, "below": tokens / 1.2}},
                "seeds": {"0": pts}}

    res = {"methods": {"sft": method(3e6), "on_policy": method(5e5)}}
    assert quality.ratio(res) == (6.0, "6.0x")
    res["methods"]["sft"] = method(None)
    value, text = quality.ratio(res)
    assert value == 8.0 and text.startswith(">= 8.0x")


def test_the_length_sweep_tabulates_and_plots_the_ratio_at_each_length(tmp_path):
    """What a sweep over lengths adds to one length's results: per length, sft's tokens, the best on-policy arm
    (the `on_policy*` arm that got there on the fewest) and the ratio; a length where sft never got there reads
    as a lower bound. The smoke in tests/test_working_run.py runs one length through real arms."""
    def method(tokens, most=4e6):
        pts = [{"step": 0, "teacher_tokens": 0, "heldout_accuracy": 0.1},
               {"step": 9, "teacher_tokens": most, "heldout_accuracy": 0.2}]
        return {"crossings": {"0": None if tokens is None else {"tokens": tokens, "below": tokens / 1.2}},
                "seeds": {"0": pts}}

    results = {
        "short": {"answer_tokens": 20.0, "methods": {"sft": method(2e5), "on_policy": method(2e5),
                                                     "on_policy_fkl": method(1e5)}},
        "long": {"answer_tokens": 60.0, "methods": {"sft": method(None, most=3e6), "on_policy": method(5e5),
                                                    "on_policy_fkl": method(None)}},
    }
    assert [quality.best_on_policy(r) for r in results.values()] == ["on_policy_fkl", "on_policy"]
    lines = quality.format_ratios(results).splitlines()
    assert len(lines) == 3
    assert lines[1].split()[:2] == ["short", "20.0"] and lines[1].endswith("on_policy_fkl: 0.100M  2.0x")
    assert lines[2].split()[:2] == ["long", "60.0"] and "not reached" in lines[2]
    assert lines[2].endswith("on_policy: 0.500M  >= 6.0x (sft did not reach it within 3.000M tokens)")
    quality.plot_ratios(results, tmp_path / "ratio.png")
    assert (tmp_path / "ratio.png").read_bytes()[:4] == b"\x89PNG"

"""Comparing numbers that come out of model forwards.

A forward over a batch of another shape (padding, another micro-batch size, another engine, another
thread count) takes another matmul/attention path: oneDNN picks kernels and blocking per CPU and per
shape, so fp32 results differ in the 6th-7th significant digit from one machine to the next. Tests
compare such numbers with a stated tolerance; exact equality is kept only where the computation is
bit-identical by construction (the same call on the same shapes, or a copy).
"""

from __future__ import annotations

from collections.abc import Sequence

from onpolicy.types import TeacherScores

# Two fp32 forwards of the same sequence in batches of different shapes: log-probs agree to a few
# 1e-7 (seen: -3.268855571746826 vs -3.2688543796539307); 1e-5 leaves a wide margin and still catches
# a wrong position or token (those differ by >= 1e-2 on the test models).
FP32_BATCH_TOL = 1e-5


def assert_scores_close(
    got: Sequence[TeacherScores], ref: Sequence[TeacherScores], tol: float = FP32_BATCH_TOL
) -> None:
    """Same number of scores, same lengths, log-probs within `tol`, same top-k ids with values within `tol`."""
    assert len(got) == len(ref), f"{len(got)} scores, expected {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref)):
        assert len(g.logprobs) == len(r.logprobs), f"sequence {i}: {len(g.logprobs)} vs {len(r.logprobs)} log-probs"
        for t, (a, b) in enumerate(zip(g.logprobs, r.logprobs)):
            assert abs(a - b) <= tol, f"sequence {i}, token {t}: {a} vs {b} (tolerance {tol})"
        assert (g.top_k is None) == (r.top_k is None), f"sequence {i}: top_k present on one side only"
        for t, (grow, rrow) in enumerate(zip(g.top_k or [], r.top_k or [])):
            assert [tok for tok, _ in grow] == [tok for tok, _ in rrow], f"sequence {i}, position {t}: top-k ids"
            for (_, a), (_, b) in zip(grow, rrow):
                assert abs(a - b) <= tol, f"sequence {i}, position {t}: top-k {a} vs {b} (tolerance {tol})"

"""The teacher's top-k in memory (`TopK` arrays) and on the wire (JSON rows, or the binary form of
`Accept: application/x-onpolicy-scores`): round trips, what a broken body says, content negotiation, the
answer checks on the arrays, and the wire-format benchmark as a smoke."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onpolicy.teacher.errors import TeacherResponseError
from onpolicy.teacher.validate import validate_scores
from onpolicy.types import (
    ScoreRequestItem,
    ScoreResponse,
    ScoreUsage,
    TeacherScores,
    TopK,
    accepts_binary_scores,
    binary_scores_form,
    decode_scores,
    encode_scores,
)

REPO = Path(__file__).resolve().parents[1]


def _response(k: int = 3) -> ScoreResponse:
    return ScoreResponse(
        scores=[TeacherScores(logprobs=[-0.5, -1.25], top_k=[[(7, -0.5), (3, -2.0), (0, -3.0)], [(9, -1.25)]]),
                TeacherScores(logprobs=[], top_k=[]),
                TeacherScores(logprobs=[-0.125], top_k=[[(15, -0.125), (1, -4.0), (2, -4.0)]])][: 3 if k else 0]
        or [TeacherScores(logprobs=[-1.0])], model="m", usage=ScoreUsage(tokens_scored=3))


def test_topk_reads_as_rows_and_keeps_arrays():
    top = TeacherScores(logprobs=[-0.5, -1.25], top_k=[[(7, -0.5), (3, -2.0)], [(9, -1.25)]]).top_k
    assert isinstance(top, TopK) and top.ids.dtype == np.int32 and top.logprobs.dtype == np.float32
    assert top.ids.tolist() == [[7, 3], [9, -1]] and top.logprobs[1, 1] == -np.inf  # a short row, padded
    assert len(top) == 2 and top.k == 2 and top[1] == [(9, -1.25)] and list(top) == top.rows()
    assert top == [[(7, -0.5), (3, -2.0)], [(9, -1.25)]] and top[1:].rows() == [[(9, -1.25)]]
    assert pickle.loads(pickle.dumps(top)) == top  # through Ray
    assert TeacherScores.model_validate_json(TeacherScores(logprobs=[-0.5, -1.25], top_k=top).model_dump_json()).top_k == top
    for bad, why in (([[(1.5, -1.0)]], "integers"), ([[(2**40, -1.0)]], "below 2\\*\\*31"), ("x", "list of rows"),
                     ([[(1, -1.0, 3)]], "pairs")):
        with pytest.raises(ValueError, match=why):
            TeacherScores(logprobs=[-1.0], top_k=bad)


@pytest.mark.parametrize("form, pair", [("exact", 8), ("compact", 5)])
@pytest.mark.parametrize("k", [3, 0])
def test_binary_round_trip(k, form, pair):
    """These values are exact in float16 too, and the padded slot (-1, -inf) comes back as it went."""
    resp = _response(k)
    body = encode_scores(resp, form)
    back = decode_scores(body)
    assert back == resp and back.model == "m" and back.usage.tokens_scored == 3
    assert [s.top_k is None for s in back.scores] == [s.top_k is None for s in resp.scores]
    if k:  # 8-byte prefix, float32 log-probs, (id, log-prob) pairs of 3 slots per token, the JSON trailer
        assert body[:4] == b"OPS1" and len(body) == 8 + 3 * (4 + pair * 3) + int.from_bytes(body[4:8], "little")
        assert back.scores[0].top_k.logprobs.flags.writeable  # torch reads them without a copy warning
        assert back.scores[0].top_k.ids[1].tolist() == [9, -1, -1]


def test_compact_form_keeps_ids_exactly_and_log_probs_within_float16_rounding():
    """Ids up to 2**24 - 2 come back exactly; a log-prob within half a float16 step (2**-11 of its size, or
    the subnormal step near 0); the sampled tokens' log-probs stay float32, bit for bit."""
    rng = np.random.default_rng(0)
    tokens, k = 200, 64
    lps = -np.concatenate([rng.exponential(3.0, (tokens, k - 2)), rng.uniform(0, 1e-6, (tokens, 1)),
                           rng.uniform(60, 90, (tokens, 1))], axis=1).astype(np.float32)
    ids = rng.integers(0, 2**24 - 1, (tokens, k))
    ids[0, :2] = [0, 2**24 - 2]
    sampled = lps[:, 0].astype(np.float64).tolist()
    resp = ScoreResponse(scores=[TeacherScores(logprobs=sampled, top_k=TopK(ids, lps))], model="m")
    back = decode_scores(encode_scores(resp, "compact")).scores[0]
    assert back.top_k.ids.tolist() == ids.tolist() and back.logprobs == np.float32(sampled).tolist()
    err = np.abs(back.top_k.logprobs.astype(np.float64) - lps)
    assert np.all(err <= np.maximum(np.abs(lps) * 2.0**-11, 2.0**-25))
    assert err.max() > 0  # lossy: not the exact form by another name
    with pytest.raises(ValueError, match="compact top-k holds ids in"):
        ids[3, 3] = 2**24 - 1
        encode_scores(ScoreResponse(scores=[TeacherScores(logprobs=sampled, top_k=TopK(ids, lps))], model="m"),
                      "compact")


@pytest.mark.parametrize("cut, message", [
    (lambda b: b"JSON" + b[4:], "not an application/x-onpolicy-scores body"),
    (lambda b: b[:-3], "unreadable trailer"),
    (lambda b: b[:8] + b[12:], "bytes, expected"),
    (lambda b: b[:4] + (9999).to_bytes(4, "little") + b[8:], "unreadable trailer"),
    (lambda b: b[:3], "not an application/x-onpolicy-scores body"),
])
def test_broken_binary_bodies_say_what_is_wrong(cut, message):
    with pytest.raises(ValueError, match=message):
        decode_scores(cut(encode_scores(_response())))


def test_what_the_binary_form_cannot_carry_is_refused():
    with pytest.raises(ValueError, match="every sequence or none"):
        encode_scores(ScoreResponse(scores=[TeacherScores(logprobs=[-1.0], top_k=[[(1, -1.0)]]),
                                            TeacherScores(logprobs=[-1.0])], model="m"))
    with pytest.raises(ValueError, match="hidden states"):
        encode_scores(ScoreResponse(scores=[TeacherScores(logprobs=[-1.0], hidden=[[[0.5]]])], model="m"))


def test_accept_header_negotiation():
    assert accepts_binary_scores("application/x-onpolicy-scores")
    assert accepts_binary_scores("application/json;q=0.5, application/x-onpolicy-scores;q=0.9")
    assert not accepts_binary_scores("application/x-onpolicy-scores;q=0")
    assert not accepts_binary_scores("application/json") and not accepts_binary_scores(None)
    assert not accepts_binary_scores("*/*")  # JSON stays the default
    assert binary_scores_form("application/x-onpolicy-scores") == "exact"
    assert binary_scores_form("application/x-onpolicy-scores; topk=compact, application/json;q=0.5") == "compact"
    assert binary_scores_form("application/x-onpolicy-scores;topk=compact;q=0") is None


@pytest.mark.parametrize("form", ["json", "exact", "compact"])
def test_answer_checks_apply_to_either_form(form):
    """validate_scores reads the arrays, so a bad answer is named the same whichever form it came in."""
    items = [ScoreRequestItem(prompt_ids=[1], completion_ids=[4, 5])]

    def check(top_k_rows, vocab=16):
        resp = ScoreResponse(scores=[TeacherScores(logprobs=[-1.0, -2.0], top_k=top_k_rows)], model="m")
        resp = decode_scores(encode_scores(resp, form)) if form != "json" else ScoreResponse.model_validate_json(
            resp.model_dump_json())
        validate_scores("t", items, resp.scores, 2, vocab_size=vocab)

    check([[(4, -1.0), (3, -2.0)], [(5, -2.0), (0, -3.0)]])  # fine
    cases = [([[(4, -1.0), (3, -2.0)], [(5, -2.0)]], "position 1: expected 2 top-k entries, got 1"),
             ([[(4, -1.0), (3, float("nan"))], [(5, -2.0), (0, -3.0)]], "position 0: top-k has a non-finite"),
             ([[(4, -1.0), (3, -2.0)], [(5, 0.5), (0, -3.0)]], "position 1: top-k has a non-finite or positive"),
             ([[(4, -1.0), (3, -2.0)], [(5, -2.0), (16, -3.0)]], "position 1: top-k token id 16 is outside")]
    for rows, message in cases:
        with pytest.raises(TeacherResponseError, match=message):
            check(rows)


def test_wire_format_bench_smoke():
    out = subprocess.run([sys.executable, "bench/wire_format.py", "--smoke"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "| 64 | JSON (lists) / binary |" in out and "load average" in out

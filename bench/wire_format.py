"""Bytes and encode + decode time of the teacher's scores on the wire: JSON against the binary form
(`Accept: application/x-onpolicy-scores`, onpolicy.types.encode_scores / decode_scores), per 1,000 scored
tokens, at top-k 16 and 64 (issue 27, item 3).

The answer measured is the issue's step: 64 sequences x 1,024 completion tokens, each token with its log-prob
and the teacher's top-k (ids in a 152,064 vocabulary, float32 log-probs as the engines produce them). Both forms
go from the in-memory `ScoreResponse` to bytes and back to a `ScoreResponse` with the same numbers:

- JSON, lists: the wire as it was, to the in-memory form as it was (top-k as lists of (id, logprob) pairs),
  with pydantic-core's own encoder and decoder (`model_dump_json`, `model_validate_json`): the fastest JSON
  path there is (the service's FastAPI route and httpx's `.json()` are slower), so the ratios are JSON's best.
- JSON, arrays: the same JSON to and from today's in-memory form (`TopK` arrays): what a client that asks
  for JSON (`wire_format="json"`) pays now.
- binary: `encode_scores` / `decode_scores`, exact (int32 ids, float32 log-probs).
- binary, compact: the same with `topk=compact` (3-byte ids, float16 log-probs; lossy within float16 rounding).

Each timing is the best of `--repeats` runs (the least disturbed by other work on a shared machine).

    .venv/bin/python bench/wire_format.py            # k = 16 and 64
    .venv/bin/python bench/wire_format.py --smoke    # 2 sequences x 8 tokens (the test suite)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from pydantic import BaseModel

from onpolicy.types import ScoreResponse, ScoreUsage, TeacherScores, TopK, decode_scores, encode_scores

VOCAB = 152_064


def response(sequences: int, tokens: int, k: int, seed: int = 0) -> ScoreResponse:
    """A teacher's answer: per token a log-prob and the top-k (distinct ids, descending float32 log-probs)."""
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(sequences):
        lps = np.sort(np.log(rng.dirichlet(np.full(k + 1, 0.3), size=tokens)[:, :k] + 1e-30), axis=1)[:, ::-1]
        lps = lps.astype(np.float32)
        ids = (rng.integers(0, VOCAB, (tokens, 1)) + np.arange(k) * 997) % VOCAB
        scores.append(TeacherScores(logprobs=lps[:, 0].astype(np.float64).tolist(), top_k=TopK(ids, lps)))
    return ScoreResponse(scores=scores, model="teacher", usage=ScoreUsage(tokens_scored=sequences * tokens))


class _ListScores(BaseModel):
    """TeacherScores as it was before `TopK`: the top-k as lists of (token_id, logprob) pairs."""

    logprobs: list[float]
    top_k: list[list[tuple[int, float]]] | None = None


class _ListResponse(BaseModel):
    scores: list[_ListScores]
    model: str
    usage: ScoreUsage


def best_seconds(fn, arg, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(sequences: int, tokens: int, k: int, repeats: int) -> dict:
    resp = response(sequences, tokens, k)
    as_lists = _ListResponse.model_validate_json(resp.model_dump_json())
    per = 1000.0 / (sequences * tokens)  # per 1,000 scored tokens
    out = {}
    for name, value, enc, dec in (
        ("JSON, lists", as_lists, lambda r: r.model_dump_json().encode(), _ListResponse.model_validate_json),
        ("JSON, arrays", resp, lambda r: r.model_dump_json().encode(), ScoreResponse.model_validate_json),
        ("binary", resp, encode_scores, decode_scores),
        ("binary, compact", resp, lambda r: encode_scores(r, "compact"), decode_scores),
    ):
        body = enc(value)
        back = dec(body)
        if name == "binary, compact":  # lossy: ids exact, log-probs within float16 rounding
            assert all(np.array_equal(a.top_k.ids, b.top_k.ids) and np.allclose(a.top_k.logprobs, b.top_k.logprobs,
                       rtol=2.0**-11, atol=2.0**-25) for a, b in zip(back.scores, value.scores)), name
        else:
            assert back == value, f"{name}: the round trip changed the scores"
        assert name != "binary" or ScoreResponse.model_validate_json(as_lists.model_dump_json()) == back
        out[name] = {"bytes": len(body) * per, "encode_ms": best_seconds(enc, value, repeats) * 1e3 * per,
                     "decode_ms": best_seconds(dec, body, repeats) * 1e3 * per}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.sequences, args.tokens, args.repeats = 2, 8, 1
    load = os.getloadavg()
    print(f"# load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs; "
          f"{args.sequences} sequences x {args.tokens} tokens; command: {' '.join(sys.argv)}")
    print("| k | format | bytes / 1k tokens | encode ms / 1k | decode ms / 1k | encode+decode ms / 1k |")
    print("|---|---|---|---|---|---|")
    for k in args.ks:
        m = measure(args.sequences, args.tokens, k, args.repeats)
        for name, r in m.items():
            print(f"| {k} | {name} | {r['bytes']:,.0f} | {r['encode_ms']:.3f} | {r['decode_ms']:.3f} | "
                  f"{r['encode_ms'] + r['decode_ms']:.3f} |")
        j = m["JSON, lists"]
        for name in ("binary", "binary, compact"):
            b = m[name]
            t_ratio = (j["encode_ms"] + j["decode_ms"]) / (b["encode_ms"] + b["decode_ms"])
            print(f"| {k} | JSON (lists) / {name} | {j['bytes'] / b['bytes']:.1f}x | "
                  f"{j['encode_ms'] / b['encode_ms']:.1f}x | {j['decode_ms'] / b['decode_ms']:.1f}x | {t_ratio:.1f}x |",
                  flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

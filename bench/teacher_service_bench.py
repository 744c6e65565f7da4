"""Scoring throughput of a running teacher under 1, 4 and 16 concurrent clients.

    python bench/teacher_service_bench.py --url http://127.0.0.1:8100 [--kind service|vllm]
        [--seconds 10] [--clients 1 4 16] [--sequences 32] [--top-k 0]

Every request carries the same fixed mix: `--sequences` addition-like prompts ("a+b=", toy
tokenizer ids, so any model with >= 16 token ids can score them) with 5-token completions.
Each client sends requests back to back for `--seconds`; throughput = completion tokens scored
per second over all clients.
- `--kind service`: our teacher service, `POST /v1/score`.
- `--kind vllm`: a vLLM OpenAI server, `POST /v1/completions` with token-id prompts, `echo`,
  `prompt_logprobs=top_k`, `max_tokens=1` (what the vLLM teacher adapter sends).
A bearer token, if needed, is read from the variable named by `--api-key-env`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

import httpx

COMPLETION_LEN = 5


def request_mix(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) pairs: "a+b=" and 5 digits of the answer (ids of the toy tokenizer)."""
    digit = {str(d): 4 + d for d in range(10)}  # toy tokenizer: <pad> <s> </s> <unk> 0-9 + =
    plus, eq, bos = 14, 15, 1
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        prompt = [bos] + [digit[c] for c in str(a)] + [plus] + [digit[c] for c in str(b)] + [eq]
        answer = str(a + b).zfill(COMPLETION_LEN)[-COMPLETION_LEN:]
        pairs.append((prompt, [digit[c] for c in answer]))
    return pairs


def make_payload(kind: str, pairs, top_k: int, model: str | None) -> tuple[str, dict]:
    if kind == "service":
        seqs = [{"prompt_ids": p, "completion_ids": c} for p, c in pairs]
        return "/v1/score", {"sequences": seqs, "top_k": top_k}
    return "/v1/completions", {
        "model": model,
        "prompt": [p + c for p, c in pairs],
        "echo": True,
        "prompt_logprobs": top_k,
        "max_tokens": 1,
        "temperature": 0.0,
    }


async def client_loop(http: httpx.AsyncClient, path: str, payload: dict, until: float, lat: list) -> int:
    done = 0
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        r = await http.post(path, json=payload)
        r.raise_for_status()
        lat.append(time.perf_counter() - t0)
        done += 1
    return done


async def measure(url: str, path: str, payload: dict, clients: int, seconds: float, headers: dict) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as http:
        (await http.post(path, json=payload)).raise_for_status()  # warm-up
        lat: list[float] = []
        t0 = time.perf_counter()
        counts = await asyncio.gather(
            *(client_loop(http, path, payload, t0 + seconds, lat) for _ in range(clients))
        )
        wall = time.perf_counter() - t0
    n_req = sum(counts)
    n_seq = len(payload.get("sequences") or payload.get("prompt"))
    return {
        "clients": clients,
        "requests": n_req,
        "tok_per_s": n_req * n_seq * COMPLETION_LEN / wall,
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "max_ms": 1000 * max(lat) if lat else float("nan"),
    }


async def amain(args: argparse.Namespace) -> None:
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    model = args.model
    if args.kind == "vllm" and model is None:
        async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=30) as http:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]
    path, payload = make_payload(args.kind, request_mix(args.sequences), args.top_k, model)
    print(
        f"{args.kind} at {args.url}: {args.sequences} sequences x {COMPLETION_LEN} completion tokens per "
        f"request, top_k={args.top_k}, {args.seconds:.0f}s per row"
    )
    print(f"{'clients':>8} {'requests':>9} {'tokens/s':>10} {'p50 ms':>9} {'max ms':>9}")
    for c in args.clients:
        row = await measure(args.url, path, payload, c, args.seconds, headers)
        print(
            f"{row['clients']:>8} {row['requests']:>9} {row['tok_per_s']:>10.0f} "
            f"{row['p50_ms']:>9.1f} {row['max_ms']:>9.1f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--kind", choices=["service", "vllm"], default="service")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--sequences", type=int, default=32, help="sequences per request")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--model", default=None, help="vLLM model name (default: the first of /v1/models)")
    p.add_argument("--api-key-env", default="ONPOLICY_TEACHER_API_KEY")
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()

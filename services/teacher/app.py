"""The teacher service: a FastAPI app over any local `Teacher` that scores and generates.

Endpoints (wire types from `onpolicy.types`):
- `POST /v1/score`: `ScoreRequest` -> `ScoreResponse` (`usage.tokens_scored` = completion
  tokens scored). Concurrent requests are merged into few engine calls by `ScoreBatcher`
  (see `batcher.py` for how). JSON by default; a request with `Accept: application/x-onpolicy-scores`
  gets the same answer as little-endian arrays (`onpolicy.types.encode_scores`: ~1/3.5 of the bytes at k = 64;
  with `; topk=compact`, the top-k as 3-byte ids and float16 log-probs, ~1/5.5).
- `POST /v1/generate`: `GenerateRequest` -> `GenerateResponse`: the teacher samples `n` completions
  per token-id prompt, grouped by prompt, each with the teacher's raw log-prob of every token
  (`usage`: prompt tokens, once per prompt, and tokens generated). Not merged with other requests:
  it runs alone on the engine thread, between merged score calls (`ScoreBatcher.run_exclusive`).
- `GET /v1/info`: `TeacherInfo` (model name, vocab size, tokenizer fingerprint, BOS/EOS, max top-k).
- `GET /healthz`: liveness, never needs the token. `GET /readyz`: the engine still scores (recent
  traffic, or a one-token probe: health.py), never needs the token; the probe compose and Kubernetes use.
- `GET /metrics`: Prometheus text from this app's own `CollectorRegistry` (several apps in one
  process, as in tests, do not share counters).

With `api_key` set, every endpoint but `/healthz` needs `Authorization: Bearer <key>`; the key
is compared in constant time and never logged. Requests are checked against the limits before
they reach the queue, so a bad request fails alone and fast: a body over `max_body_bytes`, too
many sequences or a sequence too long, top_k x completion tokens above `max_topk_entries` -> 413,
`top_k` above `max_top_k` (`--max-top-k`, at most the vocabulary) or a token id outside the vocabulary
-> 422. For generation: more than `max_sequences` prompts or completions
(prompts x n), `n` above `max_samples_per_prompt`, `max_new_tokens` above the server's, or a prompt
whose length plus `max_new_tokens` is above the longest sequence -> 413; an empty prompt or a token id
outside the vocabulary -> 422. The teacher raising `ValueError` about a request's content -> 422;
other engine failures -> 500; both with a one-line message (the stack goes to the server log only).

Overload is never a 5xx: when the queue (bounded in sequences, see `batcher.py`) has no room,
the answer is 429 with `Retry-After` (seconds), which our client honours. A request whose client
disconnected while it waited is dropped before the engine sees it
(`teacher_requests_dropped_total`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError
from starlette.types import Receive

from onpolicy.protocols import Teacher
from onpolicy.teacher.validate import validate_completions
from onpolicy.types import (
    SCORES_MEDIA_TYPE,
    GenerateRequest,
    GenerateResponse,
    GenerateUsage,
    ScoreRequest,
    ScoreResponse,
    ScoreUsage,
    TeacherInfo,
    binary_scores_form,
    check_top_k,
    encode_scores,
)
from services.body_limit import BodyLimit
from services.teacher.batcher import QueueFull, ScoreBatcher
from services.teacher.health import EngineHealth

log = logging.getLogger(__name__)
T = TypeVar("T")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
KNOWN_PATHS = frozenset({"/v1/score", "/v1/generate", "/v1/info", "/healthz", "/readyz", "/metrics"})
QUEUED_PATHS = frozenset({"/v1/score", "/v1/generate"})  # the ones that wait for the engine

DEFAULT_MAX_BODY_BYTES = 8 << 20
# JSON bytes budgeted per token id (up to 6 digits plus ", ", json.dumps' default separator) and
# per sequence (its keys and brackets), so the default body limit never refuses a request that
# the sequence and token limits allow.
_BYTES_PER_ID = 8
_BYTES_PER_SEQUENCE = 64
# Not an official status: nginx's "client closed request", for the request log and metrics only
# (nobody is left to read it).
CLIENT_CLOSED = 499

SCORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": f"The scores: JSON by default, or with `Accept: {SCORES_MEDIA_TYPE}` the binary form "
                         "(little-endian arrays, onpolicy.types.encode_scores; `; topk=compact`: the top-k as 3-byte "
                         "ids and float16 log-probs)",
          "content": {SCORES_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    413: {"description": "Body, sequence count or a sequence over the server's limits (named in the detail)"},
    422: {"description": "Invalid request: top_k, a token id, or content the teacher refused"},
    429: {"description": "Queue full: retry after the `Retry-After` header's seconds"},
}
GENERATE_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"description": "Body, prompt or completion count, n, max_new_tokens or a prompt + max_new_tokens "
                         "over the server's limits (named in the detail)"},
    422: {"description": "Invalid request: an empty prompt, a token id, or content the teacher refused"},
    429: {"description": "Queue full: retry after the `Retry-After` header's seconds"},
}
DEFAULT_MAX_NEW_TOKENS = 1024
DEFAULT_MAX_SAMPLES_PER_PROMPT = 16
# Top-k is what makes an answer large (each entry ~30 bytes of JSON): by default at most 256 per position and
# 4M entries per request (~120 MB), where k = a 150k vocabulary over 256 x 4096 tokens would be 1.5e11.
DEFAULT_MAX_TOP_K = 256
DEFAULT_MAX_TOPK_ENTRIES = 1 << 22


def queue_bound(max_queue: int | None, max_sequences: int, max_batch_sequences: int) -> int:
    """The queue bound in sequences: `max_queue`, or by default two full engine batches.

    Two batches keep the engine busy back to back (one gathers while one runs); a longer line
    adds waiting and memory, not throughput, so past it clients get 429 and come back later.
    Never below `max_sequences`, or a largest valid request could never be queued.
    """
    if max_queue is None:
        return max(2 * max_batch_sequences, max_sequences)
    if max_queue < max_sequences:
        raise ValueError(
            f"max_queue={max_queue} sequences is below max_sequences={max_sequences}: a request of "
            f"{max_sequences} sequences could never be queued; raise --max-queue or lower --max-sequences"
        )
    return max_queue


def body_limit(max_body_bytes: int | None, max_sequences: int, max_tokens_per_sequence: int) -> int:
    """The request body limit in bytes: `max_body_bytes`, or by default 8 MiB, raised to what
    `max_sequences` sequences of `max_tokens_per_sequence` ids need as JSON."""
    need = max_sequences * (max_tokens_per_sequence * _BYTES_PER_ID + _BYTES_PER_SEQUENCE) + 1024
    if max_body_bytes is None:
        return max(DEFAULT_MAX_BODY_BYTES, need)
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if max_body_bytes < need:
        log.warning(
            "max_body_bytes=%d is below the ~%d bytes that %d sequences of %d tokens take as JSON: "
            "requests that large will get 413", max_body_bytes, need, max_sequences, max_tokens_per_sequence,
        )
    return max_body_bytes


class _ClientGone(Exception):
    """The client disconnected before its request was answered."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise `_ClientGone`.

    The server does not cancel a handler whose client went away: it only answers the next
    `receive()` with `http.disconnect` (the body has been read, so nothing else can come), so a
    watcher waits on that while the request waits for the engine.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    # A watcher that failed (not a disconnect) says nothing about the client: keep waiting.
    if task not in done and watcher.exception() is None:
        task.cancel()  # the batcher drops the request if the engine has not taken it yet
        raise _ClientGone
    return await task


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:500]}"


def _busy(detail: str, retry_after_s: int) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=429, headers={"Retry-After": str(retry_after_s)})


class _Metrics:
    """The app's Prometheus series, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "teacher_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.sequences = Counter("teacher_sequences_scored", "Sequences scored", registry=r)
        self.tokens = Counter("teacher_tokens_scored", "Completion tokens scored", registry=r)
        self.batch_sequences = Histogram(
            "teacher_engine_batch_sequences",
            "Sequences per engine call (after merging requests)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.engine_seconds = Histogram("teacher_engine_seconds", "Duration of one engine call", registry=r)
        self.dropped = Counter(
            "teacher_requests_dropped",
            "Requests dropped before scoring because their client disconnected",
            registry=r,
        )
        self.queued = Gauge("teacher_queue_sequences", "Sequences waiting for the engine", registry=r)
        self.latency = Histogram(
            "teacher_request_seconds", "Request latency by endpoint", ["endpoint"], registry=r
        )
        self.completions = Counter("teacher_completions_generated", "Completions generated", registry=r)
        self.tokens_generated = Counter("teacher_tokens_generated", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter(
            "teacher_generate_prompt_tokens", "Prompt tokens of generation requests (once per prompt)",
            registry=r,
        )
        self.generate_seconds = Histogram(
            "teacher_generate_engine_seconds", "Duration of one engine generation call", registry=r
        )

    def on_batch(self, n_sequences: int, n_tokens: int, seconds: float) -> None:
        self.batch_sequences.observe(n_sequences)
        self.engine_seconds.observe(seconds)


def _check_request(req: ScoreRequest, info: TeacherInfo, max_sequences: int, max_tokens: int,
                   max_topk_entries: int = DEFAULT_MAX_TOPK_ENTRIES) -> None:
    """Raise HTTPException (413/422) naming the limit and the value received."""
    n = len(req.sequences)
    if n > max_sequences:
        raise HTTPException(
            413,
            f"too many sequences: got {n}, this server accepts at most {max_sequences} "
            "per request (split the batch)",
        )
    try:
        check_top_k(req.top_k, info.max_top_k, f"this server (--max-top-k {info.max_top_k})")
    except ValueError as err:
        raise HTTPException(422, str(err)) from None
    entries = req.top_k * sum(len(seq.completion_ids) for seq in req.sequences)
    if entries > max_topk_entries:
        raise HTTPException(
            413,
            f"top_k={req.top_k} over {entries // max(req.top_k, 1)} completion tokens is {entries} top-k entries, "
            f"above this server's budget of {max_topk_entries} per request (--max-topk-entries): send fewer "
            "sequences per request or a smaller top_k",
        )
    for i, seq in enumerate(req.sequences):
        length = len(seq.prompt_ids) + len(seq.completion_ids)
        if length > max_tokens:
            raise HTTPException(
                413,
                f"sequence {i} has {length} tokens (prompt + completion), above the "
                f"limit of {max_tokens} tokens per sequence",
            )
        bad = [t for t in (*seq.prompt_ids, *seq.completion_ids) if not 0 <= t < info.vocab_size]
        if bad:
            raise HTTPException(
                422, f"sequence {i} has token id {bad[0]} outside the vocabulary [0, {info.vocab_size})"
            )


def _check_generate(
    req: GenerateRequest, info: TeacherInfo, max_sequences: int, max_tokens: int, max_new_tokens: int,
    max_samples_per_prompt: int,
) -> None:
    """Raise HTTPException (413/422) naming the limit and the value received."""
    n_prompts, n_completions = len(req.prompts), len(req.prompts) * req.n
    if n_prompts > max_sequences:
        raise HTTPException(413, f"too many prompts: got {n_prompts}, this server accepts at most "
                                 f"{max_sequences} per request (split the batch)")
    if req.n > max_samples_per_prompt:
        raise HTTPException(413, f"n={req.n} completions per prompt is above this server's limit of "
                                 f"{max_samples_per_prompt} (--max-samples-per-prompt)")
    if n_completions > max_sequences:
        raise HTTPException(413, f"too many completions: {n_prompts} prompts x n={req.n} = {n_completions}, "
                                 f"this server makes at most {max_sequences} per request (send fewer "
                                 "prompts)")
    if req.max_new_tokens > max_new_tokens:
        raise HTTPException(413, f"max_new_tokens={req.max_new_tokens} is above this server's limit of "
                                 f"{max_new_tokens} (--max-new-tokens)")
    for i, prompt in enumerate(req.prompts):
        if not prompt:
            raise HTTPException(422, f"prompt {i} is empty: every prompt needs at least one token")
        if len(prompt) + req.max_new_tokens > max_tokens:
            raise HTTPException(
                413,
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={req.max_new_tokens} that is "
                f"{len(prompt) + req.max_new_tokens}, above the limit of {max_tokens} tokens per sequence",
            )
        bad = [t for t in prompt if not 0 <= t < info.vocab_size]
        if bad:
            raise HTTPException(
                422, f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {info.vocab_size})"
            )


def _engine_error(exc: Exception, what: str) -> HTTPException:
    """The HTTP error for an engine call that raised, with a one-line message (the stack goes to the log)."""
    # A ValueError is the teacher refusing this request's content (a prompt too long for
    # the engine, ...): the caller must change it, and a 4xx tells our client not to
    # retry. A pydantic ValidationError is a ValueError too, but from the engine's output.
    if isinstance(exc, ValueError) and not isinstance(exc, ValidationError):
        log.warning("teacher refused %s: %s", what, _one_line(exc))
        return HTTPException(422, f"teacher refused the request: {_one_line(exc)}")
    log.error("%s failed", what, exc_info=exc)
    return HTTPException(500, f"teacher engine failed: {_one_line(exc)}")


def create_app(
    teacher: Teacher,
    *,
    model_name: str,
    api_key: str | None = None,
    max_sequences: int = 256,
    max_tokens_per_sequence: int = 4096,
    max_batch_sequences: int = 512,
    batch_wait_ms: float = 2.0,
    max_queue: int | None = None,
    max_body_bytes: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_samples_per_prompt: int = DEFAULT_MAX_SAMPLES_PER_PROMPT,
    max_top_k: int = DEFAULT_MAX_TOP_K,
    max_topk_entries: int = DEFAULT_MAX_TOPK_ENTRIES,
) -> FastAPI:
    """The scoring and generation app over `teacher`; `model_name` is what `/v1/info` and responses report.

    `max_queue` (sequences waiting for the engine) and `max_body_bytes` default as `queue_bound`
    and `body_limit` say; `max_new_tokens` and `max_samples_per_prompt` bound `/v1/generate`;
    `max_top_k` (at most the engine's own) and `max_topk_entries` (top_k x completion tokens) bound a
    score request's top-k.
    """
    if min(max_new_tokens, max_samples_per_prompt, max_top_k, max_topk_entries) < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}), max_samples_per_prompt ({max_samples_per_prompt}), "
                         f"max_top_k ({max_top_k}) and max_topk_entries ({max_topk_entries}) must be >= 1")
    info = teacher.info()
    info = info.model_copy(update={"model": model_name, "max_top_k": min(info.max_top_k, max_top_k)})
    metrics = _Metrics()

    def on_batch(n_sequences: int, n_tokens: int, seconds: float) -> None:
        metrics.on_batch(n_sequences, n_tokens, seconds)
        health.note_ok()

    batcher = ScoreBatcher(
        teacher,
        max_batch_sequences=max_batch_sequences,
        batch_wait_ms=batch_wait_ms,
        max_queue=queue_bound(max_queue, max_sequences, max_batch_sequences),
        on_batch=on_batch,
        on_dropped=metrics.dropped.inc,
    )
    health = EngineHealth(batcher, token_id=info.bos_token_id if info.bos_token_id is not None else 0)
    metrics.queued.set_function(lambda: batcher.queued_sequences)
    expected_auth = f"Bearer {api_key}".encode() if api_key else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()
        batcher.close()

    app = FastAPI(title="onpolicy teacher", version="1", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.info = info
    # Added first, so it runs inside `auth_and_count`: no body is read before the token is
    # checked, and its 413s are counted.
    max_bytes = body_limit(max_body_bytes, max_sequences, max_tokens_per_sequence)
    app.add_middleware(BodyLimit, max_bytes=max_bytes, raise_with="--max-body-bytes")

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in KNOWN_PATHS else "other"
        t0 = time.perf_counter()
        if expected_auth is not None and path not in OPEN_PATHS:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected_auth):
                metrics.requests.labels(endpoint, "401").inc()
                why = "missing" if not given else "wrong"
                return JSONResponse(
                    {"detail": f"unauthorized: {why} bearer token (send 'Authorization: Bearer <key>')"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if path in QUEUED_PATHS and batcher.is_full():
            # No room for even one sequence: say so before reading and parsing the body.
            wait_s = batcher.retry_after_s()
            full = f"the teacher's queue is full ({batcher.max_queue} sequences)"
            response = _busy(f"server busy: {full}; retry in {wait_s} s", wait_s)
        else:
            response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        """Ready to score: the engine answered recently, or a one-token probe now (503 with the reason if not)."""
        problem = await health.check()
        if problem is not None:
            return JSONResponse({"ready": False, "reason": problem}, status_code=503)
        return {"ready": True, "model": info.model}

    @app.get("/v1/info", response_model=TeacherInfo)
    async def get_info() -> TeacherInfo:
        return info

    @app.post("/v1/score", response_model=ScoreResponse, responses=SCORE_RESPONSES)
    async def score(req: ScoreRequest, request: Request) -> Any:
        _check_request(req, info, max_sequences, max_tokens_per_sequence, max_topk_entries)
        try:
            scores = await _unless_disconnected(batcher.score(req.sequences, req.top_k), request.receive)
        except QueueFull as full:
            return _busy(str(full), full.retry_after_s)
        except _ClientGone:
            log.info("client went away before its %d sequences were answered", len(req.sequences))
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:  # noqa: BLE001 -- logged and answered as a 422 or 500
            raise _engine_error(exc, f"scoring {len(req.sequences)} sequences") from None
        tokens = sum(len(s.completion_ids) for s in req.sequences)
        metrics.sequences.inc(len(req.sequences))
        metrics.tokens.inc(tokens)
        resp = ScoreResponse(scores=scores, model=model_name, usage=ScoreUsage(tokens_scored=tokens))
        form = binary_scores_form(request.headers.get("accept"))
        if form is not None:  # arrays, not millions of printed numbers
            return Response(encode_scores(resp, form), media_type=SCORES_MEDIA_TYPE)
        return resp

    @app.post("/v1/generate", response_model=GenerateResponse, responses=GENERATE_ERRORS)
    async def generate(req: GenerateRequest, request: Request) -> Any:
        _check_generate(req, info, max_sequences, max_tokens_per_sequence, max_new_tokens,
                        max_samples_per_prompt)
        what = f"generating {req.n} completions for each of {len(req.prompts)} prompts"

        def run() -> tuple[list, float]:
            t0 = time.perf_counter()
            out = teacher.generate(req.prompts, n=req.n, max_new_tokens=req.max_new_tokens,
                                   temperature=req.temperature, top_p=req.top_p, seed=req.seed)
            return out, time.perf_counter() - t0

        try:
            work = batcher.run_exclusive(run, sequences=len(req.prompts) * req.n)
            completions, seconds = await _unless_disconnected(work, request.receive)
            # Our own engine's output, checked as a remote teacher's is: a broken one is a 500, not an answer.
            validate_completions("the teacher engine", req.prompts, req.n, completions, req.max_new_tokens,
                                 vocab_size=info.vocab_size)
        except QueueFull as full:
            return _busy(str(full), full.retry_after_s)
        except _ClientGone:
            log.info("client went away before its %d prompts were generated for", len(req.prompts))
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:  # noqa: BLE001 -- logged and answered as a 422 or 500
            raise _engine_error(exc, what) from None
        usage = GenerateUsage(prompt_tokens=sum(len(p) for p in req.prompts),
                              tokens_generated=sum(len(c.completion_ids) for c in completions))
        metrics.completions.inc(len(completions))
        metrics.tokens_generated.inc(usage.tokens_generated)
        metrics.prompt_tokens.inc(usage.prompt_tokens)
        metrics.generate_seconds.observe(seconds)
        return GenerateResponse(completions=completions, model=model_name, usage=usage)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

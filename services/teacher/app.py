"""The teacher scoring service: a FastAPI app over any local `Teacher`.

Endpoints (wire types from `onpolicy.types`):
- `POST /v1/score`: `ScoreRequest` -> `ScoreResponse` (`usage.tokens_scored` = completion
  tokens scored). Concurrent requests are merged into few engine calls by `ScoreBatcher`
  (see `batcher.py` for how).
- `GET /v1/info`: `TeacherInfo` (model name, vocab size, tokenizer fingerprint, BOS/EOS, max top-k).
- `GET /healthz`: liveness, never needs the token.
- `GET /metrics`: Prometheus text from this app's own `CollectorRegistry` (several apps in one
  process, as in tests, do not share counters).

With `api_key` set, every endpoint but `/healthz` needs `Authorization: Bearer <key>`; the key
is compared in constant time and never logged. Requests are checked against the limits before
they reach the queue, so a bad request fails alone and fast: too many sequences or a sequence
too long -> 413, `top_k` above the teacher's maximum or a token id outside the vocabulary -> 422.
Engine failures -> 500 with a one-line message (the stack goes to the server log only).
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from onpolicy.protocols import Teacher
from onpolicy.types import ScoreRequest, ScoreResponse, ScoreUsage, TeacherInfo, check_top_k
from services.teacher.batcher import ScoreBatcher

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz"})
KNOWN_PATHS = frozenset({"/v1/score", "/v1/info", "/healthz", "/metrics"})


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
        self.latency = Histogram(
            "teacher_request_seconds", "Request latency by endpoint", ["endpoint"], registry=r
        )

    def on_batch(self, n_sequences: int, n_tokens: int, seconds: float) -> None:
        self.batch_sequences.observe(n_sequences)
        self.engine_seconds.observe(seconds)


def _check_request(req: ScoreRequest, info: TeacherInfo, max_sequences: int, max_tokens: int) -> None:
    """Raise HTTPException (413/422) naming the limit and the value received."""
    n = len(req.sequences)
    if n > max_sequences:
        raise HTTPException(
            413,
            f"too many sequences: got {n}, this server accepts at most {max_sequences} "
            "per request (split the batch)",
        )
    try:
        check_top_k(req.top_k, info.max_top_k)
    except ValueError as err:
        raise HTTPException(422, str(err)) from None
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


def create_app(
    teacher: Teacher,
    *,
    model_name: str,
    api_key: str | None = None,
    max_sequences: int = 256,
    max_tokens_per_sequence: int = 4096,
    max_batch_sequences: int = 512,
    batch_wait_ms: float = 2.0,
) -> FastAPI:
    """The scoring app over `teacher`; `model_name` is what `/v1/info` and responses report."""
    info = teacher.info().model_copy(update={"model": model_name})
    metrics = _Metrics()
    batcher = ScoreBatcher(
        teacher,
        max_batch_sequences=max_batch_sequences,
        batch_wait_ms=batch_wait_ms,
        on_batch=metrics.on_batch,
    )
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
        response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", response_model=TeacherInfo)
    async def get_info() -> TeacherInfo:
        return info

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(req: ScoreRequest) -> ScoreResponse:
        _check_request(req, info, max_sequences, max_tokens_per_sequence)
        try:
            scores = await batcher.score(req.sequences, req.top_k)
        except Exception as exc:
            log.exception("scoring %d sequences failed", len(req.sequences))
            first_line = (str(exc).splitlines() or [""])[0][:500]
            raise HTTPException(500, f"teacher engine failed: {type(exc).__name__}: {first_line}") from None
        tokens = sum(len(s.completion_ids) for s in req.sequences)
        metrics.sequences.inc(len(req.sequences))
        metrics.tokens.inc(tokens)
        return ScoreResponse(scores=scores, model=model_name, usage=ScoreUsage(tokens_scored=tokens))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

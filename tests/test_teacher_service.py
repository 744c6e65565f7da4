"""The teacher scoring service: HTTP API over an HFTeacher (fast), batching, overload and abuse
(queue bound, body limit, disconnects, listen policy), and the real server with vLLM in a
subprocess (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from onpolicy.teacher.fingerprint import describe_model
from onpolicy.teacher.local.engines import HFTeacher
from onpolicy.toy.tokenizer import build_tokenizer
from onpolicy.types import (
    SCORES_MEDIA_TYPE,
    ScoreRequestItem,
    ScoreResponse,
    TeacherInfo,
    TeacherScores,
    decode_scores,
)
from services.teacher import ScoreBatcher, create_app
from services.teacher.app import DEFAULT_MAX_BODY_BYTES, body_limit, queue_bound
from services.teacher.batcher import MAX_RETRY_AFTER_S, estimate_retry_after_s
from tests.fakes.server import ServerThread
from tests.servers import REPO_ROOT, free_port, log_tail, start_teacher_server, stop_server, wait_healthy
from tests.tolerances import FP32_BATCH, assert_scores_close

KEY = "s3cret-token"
PAIRS = [("12+34=", "46"), ("7+8=", "15"), ("100+999=", "1099"), ("5+5=", "10"), ("0+0=", "")]


@pytest.fixture(scope="module")
def items() -> list[ScoreRequestItem]:
    tok = build_tokenizer()
    return [
        ScoreRequestItem(
            prompt_ids=tok.encode(p),
            completion_ids=tok.encode(c, add_special_tokens=False) + ([tok.eos_token_id] if c else []),
        )
        for p, c in PAIRS
    ]


@pytest.fixture(scope="module")
def hf_teacher(tiny_teacher_dir) -> HFTeacher:
    return HFTeacher(tiny_teacher_dir)


class RecordingTeacher:
    """A Teacher that delegates to another and records the size and top_k of every call."""

    def __init__(
        self, inner, fail_on_token: int | None = None, error: type[Exception] = RuntimeError
    ) -> None:
        self.inner = inner
        self.fail_on_token = fail_on_token
        self.error = error
        self.calls: list[tuple[int, int]] = []
        self.threads: set[int] = set()

    def info(self) -> TeacherInfo:
        return self.inner.info()

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        self.calls.append((len(items), top_k))
        self.threads.add(threading.get_ident())
        if self.fail_on_token is not None and any(self.fail_on_token in it.completion_ids for it in items):
            raise self.error(f"engine exploded on token {self.fail_on_token}\nsecond line of detail")
        return self.inner.score(items, top_k)


class GatedTeacher(RecordingTeacher):
    """A slow engine: each call records its sequences (`seen`), sets `started`, waits for `gate`
    (the test opens it), then sleeps `delay_s`. A closed gate holds the first call in the engine,
    so the queue behind it fills up however fast or slow this machine is."""

    def __init__(self, inner, delay_s: float = 0.05, gate_open: bool = False) -> None:
        super().__init__(inner)
        self.delay_s = delay_s
        self.gate = threading.Event()
        if gate_open:
            self.gate.set()
        self.started = threading.Event()
        self.seen: list[ScoreRequestItem] = []

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        self.seen.extend(items)
        self.started.set()
        if not self.gate.wait(120):
            raise RuntimeError("the test never opened the gate")
        time.sleep(self.delay_s)
        return super().score(items, top_k)


def wait_until(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll `condition()` (a thread-safe read) until true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.01)


async def async_wait_until(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


def metric(app, name: str, labels: dict[str, str] | None = None) -> float:
    return app.state.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def body(items: list[ScoreRequestItem], top_k: int = 0) -> dict:
    return {"sequences": [it.model_dump() for it in items], "top_k": top_k}


@pytest.fixture(scope="module")
def client(hf_teacher):
    with TestClient(create_app(hf_teacher, model_name="tiny-teacher")) as c:
        yield c


# -- scoring over HTTP ------------------------------------------------------------------------


def test_score_equals_direct_teacher_score(client, hf_teacher, items):
    r = client.post("/v1/score", json=body(items))
    assert r.status_code == 200, r.text
    resp = ScoreResponse.model_validate(r.json())
    assert resp.model == "tiny-teacher"
    # Exact: the app makes the same call on the same batch, and floats survive JSON.
    assert resp.scores == hf_teacher.score(items)
    assert resp.usage.tokens_scored == sum(len(it.completion_ids) for it in items)
    assert resp.scores[-1].logprobs == [] and all(s.top_k is None for s in resp.scores)


def test_top_k_returned(client, hf_teacher, items):
    resp = ScoreResponse.model_validate(client.post("/v1/score", json=body(items, top_k=3)).json())
    assert resp.scores == hf_teacher.score(items, top_k=3)
    for s, it in zip(resp.scores, items):
        assert len(s.top_k) == len(it.completion_ids)
        for row in s.top_k:
            assert len(row) == 3 and [lp for _, lp in row] == sorted((lp for _, lp in row), reverse=True)


@pytest.mark.parametrize("top_k", [0, 3])
def test_binary_scores_are_the_json_scores(client, hf_teacher, items, top_k):
    """`Accept: application/x-onpolicy-scores` gets the same answer as arrays; without it, JSON."""
    binary = client.post("/v1/score", json=body(items, top_k), headers={"Accept": f"{SCORES_MEDIA_TYPE}, */*;q=0.1"})
    assert binary.status_code == 200 and binary.headers["content-type"] == SCORES_MEDIA_TYPE
    plain = client.post("/v1/score", json=body(items, top_k), headers={"Accept": "application/json"})
    assert plain.headers["content-type"] == "application/json"
    got, ref = decode_scores(binary.content), ScoreResponse.model_validate(plain.json())
    assert got == ref and got.scores == hf_teacher.score(items, top_k)  # float32 values: exact both ways
    assert got.usage.tokens_scored == sum(len(it.completion_ids) for it in items)
    assert len(binary.content) < len(plain.content) / 2


def test_info_matches_describe_model(client, tiny_teacher_dir):
    info = TeacherInfo.model_validate(client.get("/v1/info").json())
    ref = describe_model(tiny_teacher_dir, max_top_k=16)
    assert info.model == "tiny-teacher"
    assert info.model_dump(exclude={"model"}) == ref.model_dump(exclude={"model"})
    assert info.vocab_size == 16 and info.eos_token_ids == [2] and info.bos_token_id == 1


def test_bearer_token(hf_teacher, items, caplog):
    with TestClient(create_app(hf_teacher, model_name="t", api_key=KEY)) as c:
        assert c.get("/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path in (("POST", "/v1/score"), ("GET", "/v1/info"), ("GET", "/metrics")):
                r = c.request(method, path, json=body(items[:1]), headers=headers)
                assert r.status_code == 401, (path, headers)
                assert "bearer token" in r.json()["detail"] and KEY not in r.text
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/v1/score", json=body(items[:1]), headers=ok).status_code == 200
        assert c.get("/v1/info", headers=ok).status_code == 200
        assert 'status="401"' in c.get("/metrics", headers=ok).text
    assert KEY not in caplog.text


def test_limits_and_bad_ids(hf_teacher, items):
    app = create_app(hf_teacher, model_name="t", max_sequences=2, max_tokens_per_sequence=8)
    with TestClient(app) as c:
        r = c.post("/v1/score", json=body(items[:3]))
        assert r.status_code == 413 and "got 3" in r.json()["detail"] and "at most 2" in r.json()["detail"]
        r = c.post("/v1/score", json=body([items[3], items[2]]))  # items[2] = 9 prompt + 5 completion
        assert r.status_code == 413
        assert "sequence 1 has 14 tokens" in r.json()["detail"] and "limit of 8" in r.json()["detail"]
        r = c.post("/v1/score", json=body(items[:1], top_k=17))
        assert (
            r.status_code == 422 and "top_k=17" in r.json()["detail"] and "max_top_k=16" in r.json()["detail"]
        )
        bad = ScoreRequestItem(prompt_ids=[1, 4], completion_ids=[5, 16])
        r = c.post("/v1/score", json=body([items[3], bad]))
        assert r.status_code == 422 and "sequence 1" in r.json()["detail"] and "16" in r.json()["detail"]
        r = c.post("/v1/score", json={"sequences": [{"prompt_ids": [-1], "completion_ids": []}]})
        assert r.status_code == 422 and "sequence 0" in r.json()["detail"]
        assert c.post("/v1/score", json={"sequences": []}).status_code == 422  # schema: min_length=1


def test_engine_error_is_500_without_stack(hf_teacher, items):
    teacher = RecordingTeacher(hf_teacher, fail_on_token=items[0].completion_ids[0])
    with TestClient(create_app(teacher, model_name="t")) as c:
        r = c.post("/v1/score", json=body(items[:1]))
        assert r.status_code == 500
        detail = r.json()["detail"]
        assert "engine exploded" in detail and "Traceback" not in r.text and "second line" not in r.text
        assert c.post("/v1/score", json=body(items[1:2])).status_code == 200  # still serving


def test_metrics_after_requests(hf_teacher, items):
    with TestClient(create_app(hf_teacher, model_name="t")) as c:
        c.post("/v1/score", json=body(items))
        c.post("/v1/score", json=body(items[:2], top_k=2))
        c.post("/v1/score", json=body(items, top_k=99))
        text = c.get("/metrics").text
    tokens = 2 * sum(len(it.completion_ids) for it in items[:2]) + sum(
        len(it.completion_ids) for it in items[2:]
    )
    assert 'teacher_requests_total{endpoint="/v1/score",status="200"} 2.0' in text
    assert 'teacher_requests_total{endpoint="/v1/score",status="422"} 1.0' in text
    assert "teacher_sequences_scored_total 7.0" in text
    assert f"teacher_tokens_scored_total {float(tokens)}" in text
    assert "teacher_engine_batch_sequences_count 2.0" in text
    assert 'teacher_request_seconds_count{endpoint="/v1/score"} 3.0' in text


def test_concurrent_http_requests_are_merged(hf_teacher, items):
    teacher = RecordingTeacher(hf_teacher)
    app = create_app(teacher, model_name="t", batch_wait_ms=200)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            rs = await asyncio.gather(*(ac.post("/v1/score", json=body([it])) for it in items))
        await app.state.batcher.stop()
        return rs

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    assert len(teacher.calls) < len(items)
    # Each request gets its own scores back; a merged batch has another shape than a single sequence,
    # so fp32 values agree within a tolerance, not bit for bit.
    for r, it in zip(rs, items):
        got = ScoreResponse.model_validate(r.json()).scores
        assert_scores_close(got, hf_teacher.score([it]), FP32_BATCH)


# -- the batcher without HTTP -----------------------------------------------------------------


def run_batcher(teacher, requests, **kwargs):
    """Submit all (items, top_k) requests concurrently to a fresh batcher; return the results."""

    async def go():
        batcher = ScoreBatcher(teacher, **kwargs)
        try:
            return await asyncio.gather(
                *(batcher.score(its, k) for its, k in requests), return_exceptions=True
            )
        finally:
            await batcher.stop()
            batcher.close()

    return asyncio.run(go())


def test_batcher_merges_by_top_k_and_returns_each_its_own(hf_teacher, items):
    teacher = RecordingTeacher(hf_teacher)
    requests = [(items[i : i + n], k) for i, n, k in [(0, 2, 0), (1, 3, 2), (2, 1, 0), (0, 5, 0), (3, 2, 2)]]
    results = run_batcher(teacher, requests, batch_wait_ms=50)
    assert sorted(teacher.calls) == [(5, 2), (8, 0)]  # one engine call per top_k
    assert len(teacher.threads) == 1
    for (its, k), got in zip(requests, results):
        assert_scores_close(got, hf_teacher.score(its, k), FP32_BATCH)


def test_batcher_respects_max_batch_sequences(hf_teacher, items):
    teacher = RecordingTeacher(hf_teacher)
    requests = [(items[:3], 0), (items[1:4], 0), (items[2:5], 0), (items[:1], 0), (items, 0)]
    results = run_batcher(teacher, requests, max_batch_sequences=4, batch_wait_ms=50)
    # A request that would overflow the batch waits for the next; one bigger than the cap runs alone.
    assert [n for n, _ in teacher.calls] == [3, 3, 4, 5]
    for (its, k), got in zip(requests, results):
        assert_scores_close(got, hf_teacher.score(its, k), FP32_BATCH)


def test_batcher_isolates_a_failing_request(hf_teacher, items):
    bad = ScoreRequestItem(prompt_ids=[1], completion_ids=[15])
    teacher = RecordingTeacher(hf_teacher, fail_on_token=15)
    results = run_batcher(teacher, [(items[:2], 0), ([bad], 0), (items[2:4], 0)], batch_wait_ms=50)
    assert isinstance(results[1], RuntimeError)
    assert_scores_close(results[0], hf_teacher.score(items[:2]), FP32_BATCH)
    assert_scores_close(results[2], hf_teacher.score(items[2:4]), FP32_BATCH)
    assert [n for n, _ in teacher.calls] == [5, 2, 1, 2]  # merged call failed, then each alone


# -- overload, abuse and input errors -----------------------------------------------------------


def test_retry_after_estimate():
    assert estimate_retry_after_s(0, 4, None) == 1  # no engine call timed yet
    assert estimate_retry_after_s(0, 4, 0.01) == 1  # never 0: "retry now" invites a stampede
    assert estimate_retry_after_s(16, 4, 2.0) == 10  # the running call + 4 batches of 2 s
    assert estimate_retry_after_s(5, 4, 1.5) == 5  # 3 calls x 1.5 s, rounded up
    assert estimate_retry_after_s(10**6, 1, 1.0) == MAX_RETRY_AFTER_S


def test_queue_and_body_defaults():
    assert queue_bound(None, 256, 512) == 1024  # two full engine batches
    assert queue_bound(None, 256, 64) == 256  # never below one largest request
    assert queue_bound(300, 256, 512) == 300
    with pytest.raises(ValueError, match="raise --max-queue or lower --max-sequences"):
        queue_bound(8, 16, 4)
    assert body_limit(None, 4, 16) == DEFAULT_MAX_BODY_BYTES == 8 << 20
    assert body_limit(1000, 4, 16) == 1000  # an explicit limit is the operator's call (with a warning)
    # The default takes a largest request, even with 6-digit ids and json.dumps' ", " separators.
    biggest = {"sequences": [{"prompt_ids": [151_643] * 4095, "completion_ids": [151_643]}] * 256, "top_k": 5}
    assert len(json.dumps(biggest).encode()) <= body_limit(None, 256, 4096)


def test_overload_is_429_with_retry_after_and_memory_stays_bounded(hf_teacher, items):
    """200 concurrent requests against a queue of 16 sequences and an engine held at its first
    call: exactly 16 + (that call's size) are admitted and scored, the rest get 429 at once."""
    teacher = GatedTeacher(hf_teacher, delay_s=0.05, gate_open=True)
    app = create_app(teacher, model_name="t", max_sequences=4, max_batch_sequences=4, max_queue=16)
    n, bound = 200, 16
    reqs = [items[i % 4] for i in range(n)]
    proc = psutil.Process()

    async def burst(url: str):
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as ac:
            assert (await ac.post("/v1/score", json=body(reqs[:1]))).status_code == 200  # warm up
            try:
                teacher.gate.clear()
                teacher.started.clear()
                teacher.seen.clear()
                rss_before = proc.memory_info().rss
                tasks = [asyncio.create_task(ac.post("/v1/score", json=body([it]))) for it in reqs]
                await async_wait_until(teacher.started.is_set, what="the first engine call")
                in_engine = len(teacher.seen)  # the first call's sequences; no other call starts while gated
                await async_wait_until(
                    lambda: sum(t.done() for t in tasks) == n - bound - in_engine, what="all refusals"
                )
                assert app.state.batcher.queued_sequences == bound
                teacher.gate.set()
                responses = await asyncio.gather(*tasks)
                return responses, in_engine, rss_before, proc.memory_info().rss
            finally:
                teacher.gate.set()  # a failed check must not leave the engine thread waiting

    with ServerThread(app) as srv:
        responses, in_engine, rss_before, rss_after = asyncio.run(burst(srv.url))
    app.state.batcher.close()

    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes  # overload is never a 5xx
    n_429 = codes.count(429)
    assert codes.count(200) == bound + in_engine and n_429 == n - bound - in_engine > 0
    for r, it in zip(responses, reqs):
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= MAX_RETRY_AFTER_S
            assert "busy" in r.json()["detail"]
        else:
            got = ScoreResponse.model_validate(r.json()).scores
            assert_scores_close(got, hf_teacher.score([it]), FP32_BATCH)
    assert len(teacher.seen) == bound + in_engine  # a refused request never reached the engine
    assert metric(app, "teacher_requests_total", {"endpoint": "/v1/score", "status": "429"}) == n_429
    growth_mb = (rss_after - rss_before) / 2**20
    print(f"\noverload: {n} requests, {n_429} x 429, {n - n_429} x 200, RSS growth {growth_mb:.1f} MB")
    # Generous: the point is "bounded", not a tight figure (client and server share this process).
    assert growth_mb < 200


def test_request_that_does_not_fit_is_429_while_smaller_ones_still_fit(hf_teacher, items):
    teacher = GatedTeacher(hf_teacher, delay_s=0)
    app = create_app(
        teacher, model_name="t", max_sequences=4, max_batch_sequences=4, max_queue=4, batch_wait_ms=0
    )

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            try:
                first = asyncio.create_task(ac.post("/v1/score", json=body(items[:1])))
                await async_wait_until(teacher.started.is_set, what="the first engine call")
                three = asyncio.create_task(ac.post("/v1/score", json=body(items[1:4])))
                await async_wait_until(lambda: app.state.batcher.queued_sequences == 3, what="3 queued")
                too_big = await ac.post("/v1/score", json=body(items[:2]))  # 3 + 2 > 4
                fits = asyncio.create_task(ac.post("/v1/score", json=body(items[3:4])))
                await async_wait_until(app.state.batcher.is_full, what="a full queue")
                full = await ac.post("/v1/score", json=body(items[:1]))  # refused before the body is read
                teacher.gate.set()
                rest = await asyncio.gather(first, three, fits)
            finally:
                teacher.gate.set()  # a failed check must not leave the engine thread waiting
        await app.state.batcher.stop()
        app.state.batcher.close()
        return too_big, full, rest

    too_big, full, rest = asyncio.run(go())
    assert [r.status_code for r in rest] == [200, 200, 200]
    for r in (too_big, full):
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["detail"]
    assert "no room for 2 more" in too_big.json()["detail"]
    assert app.state.batcher.queued_sequences == 0
    assert teacher.seen == items[:1] + items[1:4] + items[3:4]


def test_body_over_the_limit_is_413(hf_teacher, items):
    teacher = RecordingTeacher(hf_teacher)
    app = create_app(teacher, model_name="t", api_key=KEY, max_body_bytes=2048)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps(body(items * 40)).encode()
    small = json.dumps(body(items[:2])).encode()
    assert len(big) > 2048 > len(small)

    async def chunks(data: bytes):
        for i in range(0, len(data), 500):
            yield data[i : i + 500]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            no_token = await ac.post("/v1/score", content=big, headers={"Content-Type": "application/json"})
            declared = await ac.post("/v1/score", content=big, headers=auth)  # Content-Length
            chunked = await ac.post("/v1/score", content=chunks(big), headers=auth)  # no Content-Length
            chunked_ok = await ac.post("/v1/score", content=chunks(small), headers=auth)
        await app.state.batcher.stop()
        app.state.batcher.close()
        return no_token, declared, chunked, chunked_ok

    no_token, declared, chunked, chunked_ok = asyncio.run(go())
    assert no_token.status_code == 401  # the token is checked before any body is read
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        assert "at most 2048 bytes" in r.json()["detail"] and "--max-body-bytes" in r.json()["detail"]
    assert f"{len(big)} bytes" in declared.json()["detail"]
    assert chunked_ok.status_code == 200, chunked_ok.text
    assert teacher.calls == [(2, 0)]  # only the small one was scored
    assert metric(app, "teacher_requests_total", {"endpoint": "/v1/score", "status": "413"}) == 2


def _post_then_hang_up(port: int, payload: dict) -> socket.socket:
    """Send a complete score request on a raw connection; the caller closes it unanswered."""
    data = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def test_client_that_disconnects_before_its_turn_is_never_scored(hf_teacher, items):
    teacher = GatedTeacher(hf_teacher, delay_s=0)
    app = create_app(teacher, model_name="t", batch_wait_ms=0)
    gone = ScoreRequestItem(prompt_ids=[1, 5, 6, 7], completion_ids=[8, 9, 2])
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
        with ThreadPoolExecutor(1) as pool:
            try:
                first = pool.submit(client.post, "/v1/score", json=body(items[:1]))
                assert teacher.started.wait(60)  # items[0] is in the engine, held at the gate
                sock = _post_then_hang_up(srv.port, body([gone]))
                wait_until(lambda: app.state.batcher.queued_sequences == 1, what="the request to be queued")
                sock.close()
                closed = {"endpoint": "/v1/score", "status": "499"}
                wait_until(lambda: metric(app, "teacher_requests_total", closed) == 1, what="the hang-up")
                teacher.gate.set()
                assert first.result().status_code == 200
            finally:
                teacher.gate.set()  # a failed check must not leave the engine thread waiting
        assert client.post("/v1/score", json=body(items[1:2])).status_code == 200  # still serving
    app.state.batcher.close()
    assert gone not in teacher.seen and teacher.seen == items[:2]
    assert metric(app, "teacher_requests_dropped_total") == 1


def test_cancelled_handler_cancels_its_request(hf_teacher, items):
    """In process (ASGI), a cancelled request task is how a client going away looks."""
    teacher = GatedTeacher(hf_teacher, delay_s=0)
    app = create_app(teacher, model_name="t", batch_wait_ms=0)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            try:
                first = asyncio.create_task(ac.post("/v1/score", json=body(items[:1])))
                await async_wait_until(teacher.started.is_set, what="the first engine call")
                doomed = asyncio.create_task(ac.post("/v1/score", json=body(items[2:4])))
                await async_wait_until(lambda: app.state.batcher.queued_sequences == 2, what="2 queued")
                doomed.cancel()
                await asyncio.gather(doomed, return_exceptions=True)
                teacher.gate.set()
                r1 = await first
                r2 = await ac.post("/v1/score", json=body(items[1:2]))
            finally:
                teacher.gate.set()  # a failed check must not leave the engine thread waiting
        await app.state.batcher.stop()
        app.state.batcher.close()
        return r1, r2

    r1, r2 = asyncio.run(go())
    assert r1.status_code == r2.status_code == 200
    assert teacher.seen == items[:2]  # items[2:4] never reached the engine
    assert metric(app, "teacher_requests_dropped_total") == 1


def test_teacher_value_error_is_422_one_line_and_alone(hf_teacher, items):
    bad = ScoreRequestItem(prompt_ids=[1], completion_ids=[15])
    teacher = RecordingTeacher(hf_teacher, fail_on_token=15, error=ValueError)
    app = create_app(teacher, model_name="t", batch_wait_ms=200)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            bodies = [body([items[0]]), body([bad]), body([items[1]])]
            rs = await asyncio.gather(*(ac.post("/v1/score", json=b) for b in bodies))
        await app.state.batcher.stop()
        app.state.batcher.close()
        return rs

    good0, refused, good1 = asyncio.run(go())
    assert good0.status_code == good1.status_code == 200  # merged with the bad one, then retried alone
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "engine exploded" in detail and "ValueError" in detail and "\n" not in detail
    assert "second line" not in refused.text and "Traceback" not in refused.text


# -- who may listen where: the real entry points ------------------------------------------------


def _run_entry(module_args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", *module_args],
        check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    return done, time.monotonic() - t0


def test_non_loopback_without_key_is_refused_before_the_model_loads(tiny_teacher_dir, tmp_path):
    env = {**os.environ, "ONPOLICY_TEACHER_API_KEY": "", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("ONPOLICY_DEBUG", None)
    listen = ["--host", "0.0.0.0", "--port", str(free_port())]
    for args in (
        ["services.teacher", "--model", str(tiny_teacher_dir), *listen],
        # A folder that does not exist: were the model loaded first, this would fail on the folder.
        ["services.teacher", "--model", str(tmp_path / "missing"), *listen],
        ["onpolicy.cli", "serve", "teacher", "--model", str(tiny_teacher_dir), *listen],
    ):
        done, seconds = _run_entry(args, env)
        assert done.returncode == 2, done.stderr
        assert "error: refusing to serve the teacher service on 0.0.0.0" in done.stderr
        assert "$ONPOLICY_TEACHER_API_KEY" in done.stderr and "--insecure-no-auth" in done.stderr
        assert "Traceback" not in done.stderr and "missing" not in done.stderr
        assert seconds < 30, seconds  # no model load (generous: only Python's start-up is timed)


@pytest.mark.slow  # two servers start (transformers backend): ~10 s of CPU each
def test_non_loopback_starts_with_insecure_flag_or_with_a_key(tiny_teacher_dir):
    port_open, port_key = free_port(), free_port()
    wide = ["--host", "0.0.0.0"]
    insecure = start_teacher_server(
        tiny_teacher_dir, port_open, backend="hf", extra_env={"ONPOLICY_TEACHER_API_KEY": ""},
        extra_args=[*wide, "--port", str(port_open), "--insecure-no-auth"],
    )
    keyed = start_teacher_server(
        tiny_teacher_dir, port_key, backend="hf", extra_env={"ONPOLICY_TEACHER_API_KEY": KEY},
        extra_args=[*wide, "--port", str(port_key)],
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port_open}/healthz", timeout=300, proc=insecure)
        wait_healthy(f"http://127.0.0.1:{port_key}/healthz", timeout=300, proc=keyed)
        assert httpx.get(f"http://127.0.0.1:{port_open}/v1/info").status_code == 200
        warning = "INSECURE: the teacher service listens on 0.0.0.0 with no authentication"
        assert warning in log_tail(insecure, 100_000)
        assert httpx.get(f"http://127.0.0.1:{port_key}/v1/info").status_code == 401
        ok = httpx.get(f"http://127.0.0.1:{port_key}/v1/info", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        assert "INSECURE" not in log_tail(keyed, 100_000) and KEY not in log_tail(keyed, 100_000)
    finally:
        for proc in (insecure, keyed):
            stop_server(proc)
            os.unlink(proc.log_path)


# -- the real server: vLLM in a subprocess ----------------------------------------------------


@pytest.mark.slow
def test_real_server_with_vllm_auth_info_limits_and_metrics(teacher_service, hf_teacher, items):
    """The session's real service (vLLM in a subprocess, keyed): a request without the key is refused, its
    info is the model folder's, a sequence over the model's length is a 413 naming the limit, and its scoring
    is counted in /metrics. (Its scores against transformers: tests/test_teacher_numerics.py.)"""
    from conftest import TEACHER_SERVICE_KEY

    url = teacher_service.url
    auth = {"Authorization": f"Bearer {TEACHER_SERVICE_KEY}"}
    assert httpx.post(f"{url}/v1/score", json=body(items)).status_code == 401
    info = TeacherInfo.model_validate(httpx.get(f"{url}/v1/info", headers=auth).json())
    assert info.model_dump(exclude={"model"}) == hf_teacher.info().model_dump(exclude={"model"})
    r = httpx.post(f"{url}/v1/score", json=body(items, top_k=3), headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    assert len(ScoreResponse.model_validate(r.json()).scores) == len(items)
    binary = httpx.post(f"{url}/v1/score", json=body(items, top_k=3), headers={**auth, "Accept": SCORES_MEDIA_TYPE},
                        timeout=60)
    assert decode_scores(binary.content).scores == ScoreResponse.model_validate(r.json()).scores
    # Max model length is 64 (the tiny model): the server says so instead of failing.
    long = ScoreRequestItem(prompt_ids=[1] * 60, completion_ids=[4] * 10)
    r = httpx.post(f"{url}/v1/score", json=body([long]), headers=auth, timeout=60)
    assert r.status_code == 413 and "limit of 64" in r.json()["detail"]
    assert "teacher_tokens_scored_total" in httpx.get(f"{url}/metrics", headers=auth).text

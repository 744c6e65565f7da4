"""The teacher scoring service: HTTP API over an HFTeacher (fast), batching, and the real
server with vLLM in a subprocess (slow)."""

from __future__ import annotations

import asyncio
import os
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from onpolicy.teacher.fingerprint import describe_model
from onpolicy.teacher.local import HFTeacher
from onpolicy.toy.tokenizer import build_tokenizer
from onpolicy.types import ScoreRequestItem, ScoreResponse, TeacherInfo, TeacherScores
from services.teacher import ScoreBatcher, create_app
from tests.servers import free_port, start_teacher_server, stop_server, wait_healthy
from tests.tolerances import FP32_BATCH_TOL, assert_scores_close

TOL = 1e-4
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

    def __init__(self, inner, fail_on_token: int | None = None) -> None:
        self.inner = inner
        self.fail_on_token = fail_on_token
        self.calls: list[tuple[int, int]] = []
        self.threads: set[int] = set()

    def info(self) -> TeacherInfo:
        return self.inner.info()

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        self.calls.append((len(items), top_k))
        self.threads.add(threading.get_ident())
        if self.fail_on_token is not None and any(self.fail_on_token in it.completion_ids for it in items):
            raise RuntimeError(f"engine exploded on token {self.fail_on_token}\nsecond line of detail")
        return self.inner.score(items, top_k)


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
        assert_scores_close(got, hf_teacher.score([it]), tol=FP32_BATCH_TOL)


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
        assert_scores_close(got, hf_teacher.score(its, k), tol=FP32_BATCH_TOL)


def test_batcher_respects_max_batch_sequences(hf_teacher, items):
    teacher = RecordingTeacher(hf_teacher)
    requests = [(items[:3], 0), (items[1:4], 0), (items[2:5], 0), (items[:1], 0), (items, 0)]
    results = run_batcher(teacher, requests, max_batch_sequences=4, batch_wait_ms=50)
    # A request that would overflow the batch waits for the next; one bigger than the cap runs alone.
    assert [n for n, _ in teacher.calls] == [3, 3, 4, 5]
    for (its, k), got in zip(requests, results):
        assert_scores_close(got, hf_teacher.score(its, k), tol=FP32_BATCH_TOL)


def test_batcher_isolates_a_failing_request(hf_teacher, items):
    bad = ScoreRequestItem(prompt_ids=[1], completion_ids=[15])
    teacher = RecordingTeacher(hf_teacher, fail_on_token=15)
    results = run_batcher(teacher, [(items[:2], 0), ([bad], 0), (items[2:4], 0)], batch_wait_ms=50)
    assert isinstance(results[1], RuntimeError)
    assert_scores_close(results[0], hf_teacher.score(items[:2]), tol=FP32_BATCH_TOL)
    assert_scores_close(results[2], hf_teacher.score(items[2:4]), tol=FP32_BATCH_TOL)
    assert [n for n, _ in teacher.calls] == [5, 2, 1, 2]  # merged call failed, then each alone


# -- the real server: vLLM in a subprocess ----------------------------------------------------


@pytest.mark.slow
def test_real_server_with_vllm_matches_hf(tiny_teacher_dir, hf_teacher, items):
    port = free_port()
    proc = start_teacher_server(tiny_teacher_dir, port, extra_env={"ONPOLICY_TEACHER_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/healthz", timeout=300, proc=proc)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(f"{url}/v1/score", json=body(items)).status_code == 401
        info = TeacherInfo.model_validate(httpx.get(f"{url}/v1/info", headers=auth).json())
        assert info.model_dump(exclude={"model"}) == hf_teacher.info().model_dump(exclude={"model"})
        r = httpx.post(f"{url}/v1/score", json=body(items, top_k=3), headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        got = ScoreResponse.model_validate(r.json()).scores
        assert_scores_close(got, hf_teacher.score(items, top_k=3), tol=TOL)  # vLLM vs transformers
        # Max model length is 64 (the tiny model): the server says so instead of failing.
        long = ScoreRequestItem(prompt_ids=[1] * 60, completion_ids=[4] * 10)
        r = httpx.post(f"{url}/v1/score", json=body([long]), headers=auth, timeout=60)
        assert r.status_code == 413 and "limit of 64" in r.json()["detail"]
        assert "teacher_tokens_scored_total" in httpx.get(f"{url}/metrics", headers=auth).text
    finally:
        code = stop_server(proc)
    assert code is not None
    os.unlink(proc.log_path)  # kept for a look when the test fails

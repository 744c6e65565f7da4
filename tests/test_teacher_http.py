"""The remote-teacher HTTP layer: pure pieces, then real misbehaving servers on loopback."""

from __future__ import annotations

import random
import threading
import time

import pytest
from fakes.scripted import Script, fake_logprob, make_scripted_teacher_app
from fakes.server import ServerThread, free_port

from onpolicy.config import RemoteTeacherConfig
from onpolicy.protocols import Teacher
from onpolicy.teacher.clients.http import (
    CircuitBreaker,
    TeacherUsage,
    backoff_delay,
    parse_retry_after,
    percentile,
)
from onpolicy.teacher.clients.service import ServiceTeacher
from onpolicy.teacher.clients.sglang import SGLangTeacher
from onpolicy.teacher.clients.vllm_server import VLLMServerTeacher
from onpolicy.teacher.errors import TeacherRequestError, TeacherResponseError, TeacherUnavailable
from onpolicy.teacher.factory import open_teacher
from onpolicy.types import ScoreRequestItem
from tests.tolerances import FP32_BATCH, assert_scores_close

FAST = {"timeout_s": 2.0, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "breaker_failures": 100}


def items(n: int = 2, length: int = 5) -> list[ScoreRequestItem]:
    return [
        ScoreRequestItem(prompt_ids=[1, 4 + i], completion_ids=[5 + (i + j) % 8 for j in range(length)])
        for i in range(n)
    ]


def expected(item: ScoreRequestItem) -> list[float]:
    n_p = len(item.prompt_ids)
    return [fake_logprob(t, n_p + j) for j, t in enumerate(item.completion_ids)]


def same_scores(scores, batch) -> bool:
    """Each sequence has exactly the scripted log-probs (lengths checked, values within 1e-9)."""
    return [len(s.logprobs) for s in scores] == [len(i.completion_ids) for i in batch] and [
        v for s in scores for v in s.logprobs
    ] == pytest.approx([v for i in batch for v in expected(i)])


@pytest.fixture(params=["binary", "compact", "json"])
def wire(request) -> dict:
    """FAST, with the service client's wire format: every score test below runs in each form."""
    return {**FAST, "wire_format": request.param}


@pytest.fixture
def scripted():
    """(script, url): a scripted teacher service on a free port."""
    script = Script()
    with ServerThread(make_scripted_teacher_app(script)) as srv:
        yield script, srv.url


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_backoff_is_full_jitter_under_a_doubling_cap():
    rng = random.Random(0)
    for attempt in range(8):
        cap = min(2.0, 0.1 * 2**attempt)
        draws = [backoff_delay(attempt, 0.1, 2.0, rng) for _ in range(300)]
        assert all(0.0 <= d <= cap for d in draws)
        # Full jitter: spread over the whole [0, cap] range, not clustered at the cap.
        assert min(draws) < 0.1 * cap and max(draws) > 0.9 * cap
    assert backoff_delay(1000, 0.1, 2.0, rng) <= 2.0


def test_retry_after_parses_seconds_and_dates():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 100.0


def test_breaker_transitions_with_a_fake_clock():
    now = [0.0]
    seen: list[str] = []
    br = CircuitBreaker(failures=3, cooldown_s=10.0, clock=lambda: now[0], on_state_change=seen.append)
    br.record_failure(), br.record_failure()
    assert br.state == "closed" and br.allow()
    br.record_success()  # a success resets the consecutive count
    for _ in range(3):
        br.record_failure()
    assert br.state == "open" and not br.allow()
    assert br.seconds_until_probe() == pytest.approx(10.0)
    now[0] = 10.0
    assert br.allow() and br.state == "half_open"  # the probe
    assert not br.allow()  # only one probe at a time
    br.record_failure()  # the probe failed: open for another cool-down
    assert br.state == "open" and not br.allow()
    now[0] = 25.0
    assert br.allow()
    br.record_success()
    assert br.state == "closed" and br.allow()
    assert seen == ["open", "half_open", "open", "half_open", "closed"]
    assert br.times_opened == 2


def test_usage_reservoir_is_bounded_and_snapshot_has_percentiles():
    u = TeacherUsage(reservoir_size=10)
    for i in range(1000):
        u.record_latency(i / 1000)
    u.add(requests=3, retries=1, failures=1, tokens_scored=7)
    snap = u.snapshot()
    assert len(u._latencies) == 10
    assert (
        snap["requests"] == 3
        and snap["retries"] == 1
        and snap["failures"] == 1
        and snap["tokens_scored"] == 7
    )
    assert 0 <= snap["latency_p50_s"] <= snap["latency_p95_s"] <= 1


def test_config_requires_url_for_remote_kinds_and_factory_builds_each():
    with pytest.raises(ValueError, match=r"teacher.url \(or teacher.urls\) is required"):
        RemoteTeacherConfig(kind="vllm")
    for kind, cls in (("service", ServiceTeacher), ("vllm", VLLMServerTeacher), ("sglang", SGLangTeacher)):
        t = open_teacher(RemoteTeacherConfig(kind=kind, url="http://127.0.0.1:9"))
        assert isinstance(t, cls) and isinstance(t, Teacher)
        t.close()
    with pytest.raises(ValueError, match="OPD_NO_SUCH_KEY"):
        open_teacher(RemoteTeacherConfig(kind="service", url="http://x:1", api_key_env="OPD_NO_SUCH_KEY"))


# ---------------------------------------------------------------------------------------------
# Against real servers


def test_scores_and_usage_counters(scripted, wire):
    script, url = scripted
    batch = items(3)
    with ServiceTeacher(url, **wire) as t:
        out = t.score(batch)
        assert same_scores(out, batch)
        top = t.score(batch, top_k=3)
        assert all(len(row) == 3 for s in top for row in s.top_k)
        snap = t.usage()
    assert snap["requests"] == 2 and snap["retries"] == 0 and snap["failures"] == 0
    assert snap["tokens_scored"] == 2 * 15 and snap["latency_p50_s"] > 0 and snap["breaker"] == "closed"
    assert script.formats == {wire["wire_format"]: 2}  # what went over the wire


def test_binary_client_reads_a_server_that_answers_json(scripted):
    """A server that predates the binary form ignores the Accept header: the client reads its JSON."""
    script, url = scripted
    script.binary = False
    batch = items(2)
    with ServiceTeacher(url, **FAST) as t:
        assert t.wire_format == "binary"
        assert same_scores(t.score(batch), batch) and all(len(r) == 2 for s in t.score(batch, top_k=2) for r in s.top_k)
    assert script.formats == {"json": 2}


def test_large_batches_are_chunked_and_kept_in_order(scripted, wire):
    script, url = scripted
    batch = items(10)
    with ServiceTeacher(url, batch_size=3, max_in_flight=2, **wire) as t:
        out = t.score(batch)
    assert same_scores(out, batch)
    assert script.requests["score"] == 4


def test_5xx_then_success_is_retried(scripted, wire):
    script, url = scripted
    script.actions.extend([("status", 500), ("status", 503)])
    with ServiceTeacher(url, **wire) as t:
        out = t.score(items(1))
        snap = t.usage()
    assert out[0].logprobs == pytest.approx(expected(items(1)[0]))
    assert script.requests["score"] == 3
    assert snap["requests"] == 3 and snap["retries"] == 2 and snap["failures"] == 2
    # every attempt of the request carried one idempotency key; the next request has its own
    assert len(set(script.keys)) == 1 and script.keys[0] and len(script.keys[0]) == 32
    with ServiceTeacher(url, **wire) as t:
        t.score(items(1))
    assert len(script.keys) == 4 and script.keys[3] != script.keys[0]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_4xx_is_not_retried(scripted, status, wire):
    script, url = scripted
    script.actions.append(("status", status))
    with ServiceTeacher(url, **wire) as t, pytest.raises(TeacherRequestError) as err:
        t.score(items(1))
    assert script.requests["score"] == 1
    assert err.value.status == status and f"scripted {status}" in err.value.body


def test_429_is_retried_and_retry_after_honoured(scripted):
    script, url = scripted
    script.actions.append(("status", 429, {"Retry-After": "0.3"}))
    with ServiceTeacher(url, **FAST) as t:
        t0 = time.monotonic()
        t.score(items(1))
        assert time.monotonic() - t0 >= 0.3
    assert script.requests["score"] == 2


def test_retries_exhausted_raise_unavailable_when_not_waiting(scripted):
    script, url = scripted
    script.default = ("status", 502)
    with (
        ServiceTeacher(url, **{**FAST, "max_retries": 2, "wait_when_down": False}) as t,
        pytest.raises(TeacherUnavailable, match="3 attempts"),
    ):
        t.score(items(1))
    assert script.requests["score"] == 3


def test_slow_server_times_out_then_retry_succeeds(scripted):
    script, url = scripted
    script.actions.append(("sleep", 1.0))
    with ServiceTeacher(url, **{**FAST, "timeout_s": 0.3}) as t:
        out = t.score(items(1))
        snap = t.usage()
    assert out[0].logprobs == pytest.approx(expected(items(1)[0]))
    assert script.requests["score"] == 2 and snap["failures"] == 1


@pytest.mark.parametrize(
    "how, message",
    [
        ("short", "sequence 0: expected 5 log-probs, got 4"),
        ("nan", "sequence 0, token 0: log-prob is nan"),
        ("positive", "sequence 0, token 0: log-prob is 3.0"),
        ("missing", "scores.0.logprobs"),
        ("no_top_k", "sequence 0: asked for top-2, got no top_k"),
        ("topk_out_of_vocab", "sequence 0, position 0: top-k token id 99999 is outside the vocabulary [0, 16)"),
    ],
)
def test_malformed_answers_name_the_problem(scripted, how, message, wire):
    """The same checks whichever form the answer came in (validate_scores runs on the decoded arrays)."""
    script, url = scripted
    script.actions.append(how)
    if how == "missing" and wire["wire_format"] != "json":  # an array cannot lack a field: a truncated body
        message = "malformed application/x-onpolicy-scores body (binary scores:"
    with ServiceTeacher(url, **wire) as t, pytest.raises(TeacherResponseError) as err:
        if how == "topk_out_of_vocab":
            t.info()  # the vocabulary is known once the teacher has said it

        t.score(items(2), top_k=2 if how in ("no_top_k", "topk_out_of_vocab") else 0)
    assert message in str(err.value) and url in str(err.value) and "service teacher" in str(err.value)
    assert script.requests["score"] == 1  # a malformed answer is not retried


def test_bearer_token_is_sent():
    script = Script()
    with ServerThread(make_scripted_teacher_app(script, api_key="s3cret")) as srv:
        with ServiceTeacher(srv.url, api_key="s3cret", **FAST) as t:
            assert t.info().model == "scripted"
            t.score(items(1))
        with ServiceTeacher(srv.url, api_key="wrong", **FAST) as t, pytest.raises(TeacherRequestError) as err:
            t.info()
        assert err.value.status == 401


def test_down_then_up_opens_breaker_waits_and_scores_each_batch_once():
    script = Script()
    port = free_port()
    states: list[str] = []
    srv = ServerThread(make_scripted_teacher_app(script), port=port).start()
    t = ServiceTeacher(
        srv.url,
        timeout_s=1.0,
        max_retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        breaker_failures=2,
        breaker_cooldown_s=0.2,
        max_wait_s=20.0,
        on_state_change=states.append,
    )
    t.score(items(1))  # warm connection, then the teacher goes away
    srv.stop()
    batches = [items(2, length=3 + b) for b in range(3)]
    results: dict[int, list] = {}

    def run(b: int) -> None:
        results[b] = t.score(batches[b])

    threads = [threading.Thread(target=run, args=(b,)) for b in range(3)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 10
    while t.state == "closed" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert t.state in ("open", "half_open")  # degraded: calls wait instead of failing
    time.sleep(0.6)
    assert all(th.is_alive() for th in threads)
    srv = ServerThread(make_scripted_teacher_app(script), port=port).start()
    for th in threads:
        th.join(timeout=20)
    srv.stop()
    t.close()
    assert sorted(results) == [0, 1, 2]
    for b, batch in enumerate(batches):
        assert same_scores(results[b], batch)
        key = tuple((tuple(i.prompt_ids), tuple(i.completion_ids)) for i in batch)
        assert script.scored[key] == 1
    assert "open" in states and states[-1] == "closed"
    assert t.usage()["breaker_opened"] >= 1


def test_retries_below_breaker_failures_degrade_and_recover(scripted):
    """max_retries=2 < breaker_failures=5: spending the retries trips the breaker (degraded) and the call
    waits for the teacher instead of failing; the teacher comes back and the call returns its scores."""
    script, url = scripted
    script.default = ("status", 502)
    states: list[str] = []
    batch = items(1)
    result: dict = {}
    with ServiceTeacher(url, **{**FAST, "max_retries": 2, "breaker_failures": 5, "breaker_cooldown_s": 0.1,
                                "max_wait_s": 30.0}, on_state_change=states.append) as t:
        th = threading.Thread(target=lambda: result.update(scores=t.score(batch)))
        th.start()
        deadline = time.monotonic() + 10
        while "open" not in states and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert states[0] == "open" and th.is_alive()  # degraded after 3 attempts, still waiting
        script.default = "ok"  # the teacher answers again
        th.join(timeout=10)
    assert same_scores(result["scores"], batch)
    assert states[-1] == "closed" and script.requests["score"] >= 4


def test_breaker_open_too_long_raises_unavailable():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    states: list[str] = []
    t = ServiceTeacher(
        url,
        timeout_s=0.5,
        max_retries=5,
        backoff_base_s=0.01,
        breaker_failures=2,
        breaker_cooldown_s=0.1,
        max_wait_s=0.5,
        on_state_change=states.append,
    )
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailable, match="max_wait_s=0.5"):
        t.score(items(1))
    assert 0.4 < time.monotonic() - t0 < 5
    assert states[0] == "open"
    t.close()


def test_sglang_adapter_matches_hf_teacher(tiny_teacher_dir):
    from fakes.sglang import make_fake_sglang_app

    from onpolicy.teacher.local.engines import HFTeacher

    hf = HFTeacher(tiny_teacher_dir)
    batch = [
        ScoreRequestItem(prompt_ids=[1, 5, 6, 14], completion_ids=[7, 15, 8, 2]),
        ScoreRequestItem(prompt_ids=[1], completion_ids=[4, 4, 9]),
        ScoreRequestItem(prompt_ids=[1, 4], completion_ids=[]),
    ]
    app = make_fake_sglang_app(tiny_teacher_dir)
    with ServerThread(app) as srv, SGLangTeacher(srv.url, **FAST) as t:
        assert isinstance(t, Teacher) and t.info().model == str(tiny_teacher_dir)
        for k in (0, 3):
            got, ref = t.score(batch, top_k=k), hf.score(batch, top_k=k)
            assert_scores_close(got, ref, FP32_BATCH)  # the fake's model forward vs a padded batch
        assert app.state.requests == 2  # one batched /generate per call
        assert t.usage()["tokens_scored"] == 2 * 7


def test_check_teacher_against_a_service(tiny_model_dir, tiny_teacher_dir):
    from onpolicy.teacher.check import check_teacher
    from onpolicy.teacher.fingerprint import TeacherIncompatible, assert_compatible, describe_model

    good = describe_model(tiny_teacher_dir, max_top_k=16)
    with ServerThread(make_scripted_teacher_app(Script(), info=good)) as srv:
        report = check_teacher(srv.url, "service", tiny_model_dir, top_k=4)
        assert report.ok, report.render()
        assert [i.status for i in report.items] == ["pass"] * 6
        assert report.items[-1].message.startswith("token-level: the student's tokenizer")  # the mode it gets
        too_many = check_teacher(srv.url, "service", tiny_model_dir, top_k=32)
        assert not too_many.ok and "serves at most 16" in too_many.render()
    bad = good.model_copy(update={"tokenizer_fingerprint": "f" * 64, "eos_token_ids": [3]})
    with ServerThread(make_scripted_teacher_app(Script(), info=bad)) as srv:
        report = check_teacher(srv.url, "service", tiny_model_dir)
        by_name = {i.name: i for i in report.items}
        assert not report.ok and by_name["tokenizer"].status == "fail" and by_name["eos"].status == "fail"
        assert (
            "ffffffffffffffff" in by_name["tokenizer"].message
            and str(tiny_model_dir) in by_name["tokenizer"].message
        )
        with (
            ServiceTeacher(srv.url, **FAST) as t,
            pytest.raises(TeacherIncompatible, match="different tokenizers"),
        ):
            assert_compatible(t, tiny_model_dir)


def test_check_teacher_when_nothing_listens(tiny_model_dir):
    from onpolicy.teacher.check import check_teacher

    report = check_teacher(f"http://127.0.0.1:{free_port()}", "service", tiny_model_dir, timeout_s=2)
    assert not report.ok
    assert [i.status for i in report.items] == ["fail", "skip", "skip", "skip"]
    assert "cannot reach" in report.items[0].message and "Connect" in report.items[0].message

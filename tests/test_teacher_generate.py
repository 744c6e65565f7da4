"""Teachers that generate: every kind samples n completions per token-id prompt, grouped by prompt, each
ending on EOS or at the cap, with log-probs equal to the teacher's own scores of those tokens (fp32 rounding), and
reproducible with a seed.

- local: `HFTeacher` (fast) and `VLLMTeacher` in its Ray actor behind `ActorTeacher` (slow);
- our service: `POST /v1/generate` in process (auth, limits, the one engine thread, 429), then
  `ServiceTeacher.generate` over loopback, and a scripted service's broken answers;
- a REAL vLLM OpenAI server (slow), and a proxy in front of it that breaks its answers;
- SGLang: the fake (values from the tiny model; tempered output log-probs, as SGLang's default).

The vLLM engines are the session's (conftest.py): one Ray actor, one vLLM server.
"""

from __future__ import annotations

import asyncio
import math
import threading

import httpx
import pytest
from fakes.scripted import Script, make_scripted_teacher_app
from fakes.server import ServerThread, make_mangling_proxy_app
from fakes.sglang import make_fake_sglang_app
from fastapi.testclient import TestClient

from onpolicy.protocols import Teacher
from onpolicy.teacher.clients.service import ServiceTeacher
from onpolicy.teacher.clients.sglang import SGLangTeacher
from onpolicy.teacher.clients.vllm_server import VLLMServerTeacher
from onpolicy.teacher.errors import TeacherRequestError, TeacherResponseError
from onpolicy.teacher.local.engines import HFTeacher
from onpolicy.types import GeneratedCompletion, GenerateResponse, ScoreRequestItem
from services.teacher import create_app
from tests.tolerances import FP32_BATCH, FP32_KERNELS, assert_close

KEY = "gen-token"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [[1, 5, 6, 14], [1, 4], [1, 12, 11, 14, 10], [1, 4]]  # prompt 3 repeats prompt 1
MAX_NEW = 16


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from a second thread, and on a busy 2-core machine every parallel region
    waits for a descheduled thread (seen: the same HF generate calls in 0.4 s with one thread, 21 s with two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf(tiny_teacher_dir) -> HFTeacher:
    return HFTeacher(tiny_teacher_dir)


def items_of(completions: list[GeneratedCompletion], prompts: list[list[int]]) -> list[ScoreRequestItem]:
    return [
        ScoreRequestItem(prompt_ids=prompts[c.prompt_index], completion_ids=c.completion_ids)
        for c in completions
    ]


def check_completions(
    completions: list[GeneratedCompletion], prompts: list[list[int]], n: int, max_new: int, ref: Teacher
) -> None:
    """n per prompt in prompt order; each ends on EOS (stop) or at the cap (length), nothing after an EOS;
    log-probs within fp32 kernel rounding (tests/tolerances.py) of `ref`'s scores of the same tokens."""
    eos = set(ref.info().eos_token_ids)
    assert [c.prompt_index for c in completions] == [i for i in range(len(prompts)) for _ in range(n)]
    for c in completions:
        ids = c.completion_ids
        assert 1 <= len(ids) <= max_new and not eos & set(ids[:-1]), c
        assert (c.finish_reason == "stop") == (ids[-1] in eos), c
        assert c.finish_reason == "stop" or len(ids) == max_new, c
    for c, s in zip(completions, ref.score(items_of(completions, prompts))):
        assert len(c.logprobs) == len(s.logprobs)
        assert_close(c.logprobs, s.logprobs, FP32_KERNELS, "generation vs scoring log-probs")


def same_samples(a: list[GeneratedCompletion], b: list[GeneratedCompletion], exact: bool = False) -> bool:
    """The same completions, and log-probs within rounding of the same model's (an engine may batch the two
    calls' requests differently); `exact`: bit for bit (the same computation on the same shapes)."""
    same = [(c.prompt_index, c.completion_ids, c.finish_reason) for c in a] == [
        (c.prompt_index, c.completion_ids, c.finish_reason) for c in b]
    pairs = [(x, y) for ca, cb in zip(a, b) for x, y in zip(ca.logprobs, cb.logprobs)]
    return same and all(x == y if exact else FP32_BATCH.close(x, y) for x, y in pairs)


def check_greedy(teacher: Teacher, ref: Teacher) -> None:
    """Temperature 0: the n completions of a prompt are equal, every token the teacher's most likely."""
    out = teacher.generate(PROMPTS, n=2, max_new_tokens=8, temperature=0.0)
    assert [c.completion_ids for c in out[0::2]] == [c.completion_ids for c in out[1::2]]
    check_completions(out, PROMPTS, 2, 8, ref)
    for c, s in zip(out, ref.score(items_of(out, PROMPTS), top_k=1)):
        assert c.completion_ids == [row[0][0] for row in s.top_k]


# -- local teachers ---------------------------------------------------------------------------------


def test_hf_teacher_generates_what_it_scores(hf):
    assert isinstance(hf, Teacher)
    before = hf.usage()
    reasons: set[str] = set()
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        out = hf.generate(PROMPTS, n=3, max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p, seed=7)
        check_completions(out, PROMPTS, 3, MAX_NEW, hf)
        reasons |= {c.finish_reason for c in out}
        assert same_samples(
            out,
            hf.generate(PROMPTS, n=3, max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p, seed=7),
            exact=True,
        )
        other = hf.generate(
            PROMPTS, n=3, max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p, seed=8
        )
        assert [c.completion_ids for c in other] != [c.completion_ids for c in out]
    assert reasons == {"stop", "length"}
    check_greedy(hf, hf)
    used = hf.usage()
    assert used["prompt_tokens"] - before["prompt_tokens"] == 7 * sum(map(len, PROMPTS))  # 7 generate calls
    assert used["tokens_generated"] > before["tokens_generated"]
    assert hf.generate([], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        hf.generate([[1], []], max_new_tokens=4)


@pytest.fixture(scope="module")
def vllm_local(vllm_local_teacher):
    """The session's in-process vLLM teacher (teacher.backend=vllm) in its Ray actor."""
    return vllm_local_teacher


@pytest.mark.slow
def test_vllm_local_teacher_in_its_actor_generates_what_it_scores(vllm_local, hf):
    import ray

    from onpolicy.teacher.local.actor import ActorTeacher

    assert isinstance(vllm_local, ActorTeacher) and isinstance(vllm_local, Teacher)
    engine = ray.get(vllm_local.handle.__ray_call__.remote(lambda actor: type(actor.teacher).__name__))
    assert engine == "VLLMTeacher"  # VLLMTeacher._generate runs here, not the transformers one
    total, start = 0, vllm_local.usage()
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        out = vllm_local.generate(
            PROMPTS, n=3, max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p, seed=7
        )
        check_completions(out, PROMPTS, 3, MAX_NEW, vllm_local)  # its own scores
        check_completions(out, PROMPTS, 3, MAX_NEW, hf)  # and the reference's
        assert same_samples(
            out,
            vllm_local.generate(
                PROMPTS, n=3, max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p, seed=7
            ),
        )
        # Prompts 1 and 3 are equal, but each prompt samples with a seed of its own.
        assert [c.completion_ids for c in out[3:6]] != [c.completion_ids for c in out[9:12]]
        total += 2 * sum(len(c.completion_ids) for c in out)
    check_greedy(vllm_local, hf)
    usage = {k: v - start.get(k, 0) for k, v in vllm_local.usage().items() if isinstance(v, int | float)}
    assert usage["prompt_tokens"] == 5 * sum(map(len, PROMPTS)) and usage["tokens_generated"] > total


# -- our service: POST /v1/generate ----------------------------------------------------------------


def gen_body(prompts=PROMPTS, **kw) -> dict:
    return {"prompts": prompts, "max_new_tokens": MAX_NEW, **kw}


class EngineThreads:
    """A real teacher that notes which thread calls `score` and `generate`; `score` can be held at a gate."""

    def __init__(self, inner, gate_open: bool = True) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int]] = []
        self.gate, self.started = threading.Event(), threading.Event()
        if gate_open:
            self.gate.set()

    def info(self):
        return self.inner.info()

    def score(self, items, top_k=0):
        self.calls.append(("score", threading.get_ident()))
        self.started.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.inner.score(items, top_k)

    def generate(self, prompts, **kw):
        self.calls.append(("generate", threading.get_ident()))
        return self.inner.generate(prompts, **kw)


def test_service_generate_equals_the_teacher_and_needs_the_token(hf):
    with TestClient(create_app(hf, model_name="tiny-teacher", api_key=KEY)) as c:
        assert c.post("/v1/generate", json=gen_body()).status_code == 401
        assert (
            c.post("/v1/generate", json=gen_body(), headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        r = c.post("/v1/generate", json=gen_body(n=2, temperature=0.8, seed=3), headers=AUTH)
        assert r.status_code == 200, r.text
        resp = GenerateResponse.model_validate(r.json())
        assert resp.model == "tiny-teacher"
        assert same_samples(
            resp.completions, hf.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, temperature=0.8, seed=3)
        )
        check_completions(resp.completions, PROMPTS, 2, MAX_NEW, hf)
        assert resp.usage.prompt_tokens == sum(map(len, PROMPTS))
        assert resp.usage.tokens_generated == sum(len(x.completion_ids) for x in resp.completions)
        text = c.get("/metrics", headers=AUTH).text
    assert 'teacher_requests_total{endpoint="/v1/generate",status="200"} 1.0' in text
    assert 'teacher_requests_total{endpoint="/v1/generate",status="401"} 2.0' in text
    assert "teacher_completions_generated_total 8.0" in text
    assert f"teacher_tokens_generated_total {float(resp.usage.tokens_generated)}" in text
    assert f"teacher_generate_prompt_tokens_total {float(resp.usage.prompt_tokens)}" in text
    assert "teacher_generate_engine_seconds_count 1.0" in text


def test_service_generate_limits_fail_before_the_engine(hf):
    teacher = EngineThreads(hf)
    app = create_app(
        teacher,
        model_name="t",
        max_sequences=4,
        max_tokens_per_sequence=16,
        max_new_tokens=10,
        max_samples_per_prompt=3,
    )
    cases = [
        (gen_body([[1]] * 5, max_new_tokens=4), 413, "too many prompts: got 5"),
        (gen_body([[1]], n=4, max_new_tokens=4), 413, "--max-samples-per-prompt"),
        (gen_body([[1], [1, 4]], n=3, max_new_tokens=4), 413, "2 prompts x n=3 = 6"),
        (gen_body([[1]], max_new_tokens=11), 413, "--max-new-tokens"),
        (gen_body([[1, 4], [1] * 8], max_new_tokens=10), 413, "prompt 1 has 8 tokens"),
        (
            gen_body([[1, 4], [1, 16]], max_new_tokens=4),
            422,
            "prompt 1 has token id 16 outside the vocabulary",
        ),
        (gen_body([[1, 4], []], max_new_tokens=4), 422, "prompt 1 is empty"),
        (gen_body([[1]], n=0, max_new_tokens=4), 422, None),
        (gen_body([[1]], temperature=-1.0, max_new_tokens=4), 422, None),
        ({"prompts": [], "max_new_tokens": 4}, 422, None),
    ]
    with TestClient(app) as c:
        for body, status, detail in cases:
            r = c.post("/v1/generate", json=body)
            assert r.status_code == status, (body, r.text)
            if detail:
                assert detail in r.json()["detail"], r.json()
        assert teacher.calls == []  # none reached the engine
        assert c.post("/v1/generate", json=gen_body([[1, 4]], n=3, max_new_tokens=10)).status_code == 200


def test_generate_runs_on_the_scoring_engine_thread_and_is_429_when_the_queue_is_full(hf):
    teacher = EngineThreads(hf, gate_open=False)
    app = create_app(
        teacher, model_name="t", max_sequences=4, max_batch_sequences=4, max_queue=6, batch_wait_ms=0
    )
    score_body = {"sequences": [{"prompt_ids": [1, 4], "completion_ids": [5, 2]}] * 4, "top_k": 0}
    small = gen_body([[1, 4], [1, 5]], n=2, max_new_tokens=4, seed=1)  # 4 completions

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            held = asyncio.ensure_future(ac.post("/v1/score", json=score_body))  # holds the engine thread
            while not teacher.started.is_set():
                await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(ac.post("/v1/generate", json=small))
            while app.state.batcher.queued_sequences < 4:
                await asyncio.sleep(0.01)
            busy = await ac.post("/v1/generate", json=small)  # 4 more do not fit in 6
            teacher.gate.set()
            done = await asyncio.gather(held, queued)
        await app.state.batcher.stop()
        return busy, done

    busy, (scored, generated) = asyncio.run(go())
    assert (
        busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["detail"]
    )
    assert scored.status_code == 200 and generated.status_code == 200
    assert [kind for kind, _ in teacher.calls] == ["score", "generate"]  # one after the other...
    assert len({thread for _, thread in teacher.calls}) == 1  # ...on the one engine thread
    assert app.state.batcher.queued_sequences == 0


def test_service_teacher_generates_through_the_service_in_chunks(hf):
    with ServerThread(create_app(hf, model_name="tiny-teacher", api_key=KEY)) as srv:
        with ServiceTeacher(srv.url, api_key=KEY) as t:
            assert isinstance(t, Teacher)
            out = t.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.95, seed=11)
            # One request, the seed passed on as it is: exactly what the teacher gives in process.
            assert same_samples(
                out, hf.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.95, seed=11)
            )
            usage = t.usage()
            assert usage["requests"] == 1 and usage["prompt_tokens"] == sum(map(len, PROMPTS))
            assert usage["tokens_generated"] == sum(len(c.completion_ids) for c in out)
        with ServiceTeacher(srv.url, api_key=KEY, batch_size=4) as chunked:  # n=2: 2 prompts per request
            out = chunked.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, temperature=0.8, seed=11)
            check_completions(out, PROMPTS, 2, MAX_NEW, hf)
            assert chunked.usage()["requests"] == 2
            assert same_samples(
                out, chunked.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, temperature=0.8, seed=11)
            )
            with pytest.raises(TeacherRequestError) as err:  # the server's limit, not retried
                chunked.generate([[1, 4]], max_new_tokens=2000)
            assert err.value.status == 413 and "max_new_tokens" not in str(
                err.value
            )  # no upstream body echoed


@pytest.fixture(scope="module")
def scripted():
    script = Script()
    with ServerThread(make_scripted_teacher_app(script)) as srv:
        yield script, srv.url


@pytest.mark.parametrize(
    "how, message",
    [
        ("short", "3 tokens but 2 log-probs"),
        ("nan", "token 0: log-prob is nan"),
        ("positive", "token 0: log-prob is 2.5"),
        ("missing", "malformed GenerateResponse"),
        ("few", "with n=2, got 3 completions back"),
        ("unordered", "prompt_index is 1, expected 0"),
        ("out_of_vocab", "token id 99999 is outside the vocabulary"),
        ("too_long", "5 tokens, expected 1 to max_new_tokens=4"),
        ("bad_finish", "malformed GenerateResponse"),
    ],
)
def test_service_teacher_rejects_malformed_completions(scripted, how, message):
    script, url = scripted
    script.default = how
    before = script.requests["generate"]
    with ServiceTeacher(url) as t:
        t.info()  # the vocabulary is known: token ids are checked
        with pytest.raises(TeacherResponseError, match=message) as err:
            t.generate([[1, 4], [1, 5]], n=2, max_new_tokens=4)
    assert f"service teacher at {url}" in str(err.value)
    assert script.requests["generate"] == before + 1  # a malformed answer is not retried


# -- an external vLLM server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_url(vllm_server):
    return vllm_server.url


@pytest.mark.slow
def test_vllm_server_generates_log_probs_equal_to_hf(vllm_url, hf):
    with VLLMServerTeacher(vllm_url, timeout_s=60) as t:
        assert isinstance(t, Teacher)
        for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
            out = t.generate(
                PROMPTS, n=3, max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p, seed=5
            )
            check_completions(out, PROMPTS, 3, MAX_NEW, hf)
            assert same_samples(
                out,
                t.generate(
                    PROMPTS, n=3, max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p, seed=5
                ),
            )
            assert [c.completion_ids for c in out[3:6]] != [c.completion_ids for c in out[9:12]]
        requests = t.usage()["requests"]
        unseeded = t.generate(PROMPTS, n=3, max_new_tokens=MAX_NEW)  # one request for all prompts
        check_completions(unseeded, PROMPTS, 3, MAX_NEW, hf)
        assert t.usage()["requests"] == requests + 1
        check_greedy(t, hf)
        assert t.usage()["prompt_tokens"] == 6 * sum(map(len, PROMPTS))
        # vLLM stops a sequence at max_model_len (64) with "length", shorter than max_new_tokens...
        capped = t.generate([[1] * 60], max_new_tokens=10, temperature=0.0)[0]
        assert len(capped.completion_ids) <= 4 and (capped.finish_reason == "length") == (
            2 not in capped.completion_ids
        )
        with pytest.raises(TeacherRequestError) as err:  # ...and refuses a prompt longer than that: a 400
            t.generate([[1] * 70], max_new_tokens=2)
        assert err.value.status == 400 and err.value.body and err.value.body not in str(err.value)


def _generated(mangle):
    """`mangle` applied to generation answers only (they carry token ids; the vocabulary probes do not)."""
    return lambda body: mangle(body) if body["choices"][0].get("token_ids") is not None else body


def _first_choice(edit):
    def mangle(body):
        edit(body["choices"][0])
        return body

    return _generated(mangle)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mangle, message",
    [
        (_generated(lambda b: {**b, "choices": b["choices"][:-1]}), "got 5 choices"),
        (
            _first_choice(lambda c: c["logprobs"]["token_logprobs"].__setitem__(0, math.nan)),
            "log-prob is nan",
        ),
        (_first_choice(lambda c: c["logprobs"]["token_logprobs"].__setitem__(0, 0.5)), "log-prob is 0.5"),
        (_first_choice(lambda c: c["logprobs"]["token_logprobs"].pop()), "token ids but"),
        (_first_choice(lambda c: c.pop("token_ids")), "no token_ids"),
        (_first_choice(lambda c: c.__setitem__("logprobs", None)), "no logprobs.token_logprobs"),
        (_first_choice(lambda c: c.__setitem__("finish_reason", "abort")), "finish_reason is 'abort'"),
        (_first_choice(lambda c: c.__setitem__("finish_reason", "<b>upstream says</b>")), "an unknown value"),
        (_first_choice(lambda c: c.__setitem__("index", 9)), "indices are not 0..5"),
        (_first_choice(lambda c: c["token_ids"].__setitem__(0, 99_999)), "outside the vocabulary"),
    ],
)
def test_vllm_server_malformed_generation_is_a_response_error(vllm_url, mangle, message):
    with (
        ServerThread(make_mangling_proxy_app(vllm_url, "v1/completions", mangle)) as proxy,
        VLLMServerTeacher(proxy.url, timeout_s=60) as t,
    ):
        if "vocabulary" in message:
            t.vocab_size()  # known once probed (through the proxy: the probes take 1 token)
        with pytest.raises(TeacherResponseError, match=message) as err:
            t.generate([[1, 4], [1, 5], [1, 6]], n=2, max_new_tokens=4)
    assert "upstream says" not in str(err.value) and f"vllm teacher at {proxy.url}" in str(err.value)


# -- SGLang (the fake) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sglang(tiny_teacher_dir):
    app = make_fake_sglang_app(tiny_teacher_dir)
    with ServerThread(app) as srv:
        yield srv.url, app


def test_sglang_generates_raw_log_probs_whatever_the_temperature(sglang, hf):
    url, app = sglang
    with SGLangTeacher(url) as t:
        assert isinstance(t, Teacher)
        out = t.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, seed=3)
        check_completions(out, PROMPTS, 2, MAX_NEW, hf)
        sent = app.state.bodies[-1]  # one entry per sample, each with a seed of its own
        assert sent["input_ids"] == [p for p in PROMPTS for _ in range(2)] and sent["return_logprob"] is True
        assert len({p["sampling_seed"] for p in sent["sampling_params"]}) == 8
        assert same_samples(out, t.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, seed=3))

        out = t.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, temperature=0.7, top_p=0.9, seed=3)
        check_completions(out, PROMPTS, 2, MAX_NEW, hf)  # raw, while the server's own numbers are tempered:
        assert "logprob_start_len" in app.state.bodies[-1]  # the samples were scored again
        sampled = httpx.post(f"{url}/generate", json=app.state.bodies[-2]).json()
        server_lps = [e[0] for e in sampled[0]["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(server_lps, out[0].logprobs)) > 1e-2
        check_greedy(t, hf)
        usage = t.usage()
        assert usage["prompt_tokens"] == 4 * sum(map(len, PROMPTS)) and usage["tokens_generated"] > 0


ABORTED = {"type": "abort", "message": "upstream says"}


def _each_result(edit):
    def mangle(results):
        for r in results:
            edit(r)
        return results

    return mangle


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda rs: rs[:-1], "got 5 results"),
        (
            _each_result(lambda r: r["meta_info"].pop("output_token_logprobs")),
            "no meta_info.output_token_logprobs",
        ),
        (
            _each_result(lambda r: r["meta_info"]["output_token_logprobs"][0].__setitem__(0, math.nan)),
            "log-prob is nan",
        ),
        (
            _each_result(lambda r: r["meta_info"]["output_token_logprobs"][0].__setitem__(0, None)),
            "malformed output_token_logprobs entry",
        ),
        (
            _each_result(lambda r: r["meta_info"].__setitem__("finish_reason", ABORTED)),
            "finish_reason type is 'abort'",
        ),
        (_each_result(lambda r: r.__setitem__("output_ids", [7] + r["output_ids"])), "output_ids differ"),
        (
            _each_result(
                lambda r: (r["meta_info"]["output_token_logprobs"].clear(), r["output_ids"].clear())
            ),
            "0 tokens",
        ),
    ],
)
def test_sglang_malformed_generation_is_a_response_error(sglang, mangle, message):
    with (
        ServerThread(make_mangling_proxy_app(sglang[0], "generate", mangle)) as proxy,
        SGLangTeacher(proxy.url) as t,
        pytest.raises(TeacherResponseError, match=message) as err,
    ):
        t.generate([[1, 4], [1, 5], [1, 6]], n=2, max_new_tokens=4, seed=1)
    assert "upstream says" not in str(err.value) and f"sglang teacher at {proxy.url}" in str(err.value)


def test_sglang_output_ids_without_the_matched_stop_token_are_accepted(sglang, hf):
    def trim(results):
        for r in results:
            if r["meta_info"]["finish_reason"]["type"] == "stop":
                r["output_ids"] = r["output_ids"][:-1]  # as servers that trim the stop token send them
        return results

    with (
        ServerThread(make_mangling_proxy_app(sglang[0], "generate", trim)) as proxy,
        SGLangTeacher(proxy.url) as t,
    ):
        out = t.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, seed=4)
    check_completions(out, PROMPTS, 2, MAX_NEW, hf)
    assert any(c.finish_reason == "stop" for c in out)

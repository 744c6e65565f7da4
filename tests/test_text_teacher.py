"""A text-only teacher (`teacher.kind=openai`): the OpenAI-compatible adapter against a scripted server (what it
sends, retries, usage and cost, malformed answers), its samples re-tokenized for the student, and one real vLLM
OpenAI server (the session's, over the tiny teacher) asked through /v1/chat/completions for text only."""

from __future__ import annotations

import pytest
from fakes.openai_text import TextScript, make_openai_text_app
from fakes.server import ServerThread

from onpolicy.teacher.clients.openai_text import OpenAITextClient
from onpolicy.teacher.errors import TeacherError, TeacherResponseError
from onpolicy.teacher.retokenize import StudentText
from onpolicy.teacher.scoring import can_score
from onpolicy.teacher.text_only import TextTeacher
from onpolicy.toy.tokenizer import build_tokenizer
from onpolicy.types import Example, Rollout

FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_retries": 2}


@pytest.fixture
def served():
    script = TextScript()
    with ServerThread(make_openai_text_app(script, api_key="k")) as srv:
        yield script, srv.url


def _teacher(url: str, **kw) -> TextTeacher:
    tok = build_tokenizer()
    client = OpenAITextClient(url, api_key="k", **FAST, **kw)
    return TextTeacher(client, StudentText(tok, [tok.eos_token_id], chat=False))


def test_chat_sends_each_prompt_as_a_user_turn_asks_no_logprobs_and_retokenizes_for_the_student(served):
    script, url = served
    script.actions.extend([("status", 503)])  # a transient failure first: retried by the robust client
    teacher = _teacher(url, endpoint="chat", price_prompt_per_mtok=2.0, price_completion_per_mtok=10.0)
    tok = build_tokenizer()
    examples = [Example("57+68=", "521"), Example("5+7=", "21")]
    prompts = [list(tok(e.prompt)["input_ids"]) for e in examples]
    got = teacher.generate(prompts, examples=examples, n=2, max_new_tokens=8, temperature=0.7, seed=3)
    assert [c.prompt_index for c in got] == [0, 0, 1, 1]
    texts = [tok.decode(c.completion_ids, skip_special_tokens=True) for c in got]
    assert texts == ["86750", "86751", "750", "751"]  # the fake's reply: the prompt's digits reversed, then j
    assert all(c.completion_ids[-1] == tok.eos_token_id and c.finish_reason == "stop" for c in got)
    assert all(c.logprobs == [0.0] * len(c.completion_ids) for c in got)
    # one request per prompt (in parallel), the first one retried after the 503
    assert sorted(b["messages"][0]["content"] for b in script.bodies[1:]) == ["5+7=", "57+68="]
    for sent in script.bodies:
        assert len(sent["messages"]) == 1 and sent["messages"][0]["role"] == "user" and sent["n"] == 2
        assert not {"logprobs", "top_logprobs", "prompt_logprobs"} & set(sent)  # text only
        assert sent["model"] == "hosted-model" and sent["temperature"] == 0.7 and sent["max_tokens"] == 8
    usage = teacher.usage()
    assert usage["retries"] == 1 and usage["requests"] == 4  # GET /v1/models, two prompts, one retried
    assert usage["prompt_tokens"] == len("57+68=") + len("5+7=")
    assert usage["tokens_generated"] == sum(len(t) for t in texts)
    assert usage["cost"] == pytest.approx((usage["prompt_tokens"] * 2.0 + usage["tokens_generated"] * 10.0) / 1e6)


def test_completions_endpoint_batches_prompts_and_the_student_cap_cuts_long_texts(served):
    script, url = served
    script.reply = lambda prompt, j: "1234567890"  # longer than the student may sample
    teacher = _teacher(url, endpoint="completions")
    tok = build_tokenizer()
    got = teacher.generate([list(tok("1+2=")["input_ids"])] * 3, n=1, max_new_tokens=4, seed=0)
    assert len(script.bodies) == 1 and script.bodies[0]["prompt"] == ["1+2="] * 3  # one request, in order
    assert all(len(c.completion_ids) == 4 and c.finish_reason == "length" for c in got)
    assert "cost" not in teacher.usage()  # no price configured
    with pytest.raises(ValueError, match="teacher.endpoint=chat"):
        teacher.generate([[1, 5]], examples=[Example("x", None, messages=(("user", "hi"),))], max_new_tokens=4)


@pytest.mark.parametrize("action,says", [("few", "asked for 2 completions, got 1"),
                                         ("bad_finish", "content_filter"), ("no_text", "carries no text")])
def test_a_malformed_answer_is_refused_naming_what_is_wrong(served, action, says):
    script, url = served
    script.actions.append(action)
    with pytest.raises(TeacherResponseError, match=says):
        _teacher(url).generate([[1, 5, 6]], n=2, max_new_tokens=4)


def test_a_text_only_teacher_scores_nothing_and_says_why(served):
    _, url = served
    teacher = _teacher(url)
    assert not can_score(teacher) and teacher.max_top_k() == 0
    with pytest.raises(TeacherError, match="text only"):
        teacher.score_rollouts([Rollout(prompt_ids=[1], completion_ids=[2], sampler_logprobs=[-1.0],
                                        policy_version=0)])
    assert teacher.info().model == "hosted-model"


@pytest.mark.slow
def test_a_real_vllm_server_teaches_through_chat_completions_with_text_only(vllm_server, tiny_teacher_dir):
    """The session's vLLM server (its chat template renders a user turn as the toy's prompt text) as a hosted
    model: text back, re-tokenized; the same prompts sent to /v1/completions give the same greedy text."""
    tok = build_tokenizer()
    chat, plain = _teacher(vllm_server.url, endpoint="chat"), _teacher(vllm_server.url, endpoint="completions")
    examples = [Example("12+34=", "64"), Example("7+8=", "51")]
    prompts = [list(tok(e.prompt)["input_ids"]) for e in examples]
    by_chat = chat.generate(prompts, examples=examples, n=1, max_new_tokens=6, temperature=0.0)
    by_text = plain.generate(prompts, examples=examples, n=1, max_new_tokens=6, temperature=0.0)
    assert [c.completion_ids for c in by_chat] == [c.completion_ids for c in by_text]
    assert all(1 <= len(c.completion_ids) <= 6 for c in by_chat)
    usage = chat.usage()
    assert usage["requests"] == 3 and usage["prompt_tokens"] > 0 and usage["tokens_generated"] > 0  # + /v1/models
    assert str(tiny_teacher_dir) in chat.info().model


def test_teacher_check_of_a_text_only_endpoint_says_sequence_level(served):
    from onpolicy.teacher.check import check_teacher

    _, url = served
    report = check_teacher(url, "openai", "unused", api_key="k")
    assert report.ok, report.render()
    assert [it.name for it in report.items] == ["reachable", "text", "mode"]
    assert report.items[-1].message.startswith("sequence-level: text only")
    bad = check_teacher(url, "openai", "unused", api_key="wrong")
    assert not bad.ok and "401" in bad.render()

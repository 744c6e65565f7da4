"""A REAL vLLM OpenAI server as the teacher (the session's, conftest.py): what it says about itself, the
compatibility check, and errors. Its scores against transformers: tests/test_teacher_numerics.py."""

from __future__ import annotations

import json

import pytest
from fakes.server import ServerThread
from fakes.vllm import make_stripping_proxy_app

from onpolicy.teacher.check import check_teacher
from onpolicy.teacher.clients.vllm_server import VLLMServerTeacher, probe_fingerprint
from onpolicy.teacher.errors import TeacherRequestError
from onpolicy.teacher.fingerprint import TeacherIncompatible, assert_compatible, load_tokenizer
from onpolicy.types import ScoreRequestItem

pytestmark = pytest.mark.slow

MAX_LOGPROBS = 8  # the session server's --max-logprobs
BATCH = [
    ScoreRequestItem(prompt_ids=[1, 5, 6, 14], completion_ids=[7, 15, 8, 2]),
    ScoreRequestItem(prompt_ids=[1], completion_ids=[4, 4, 9, 13, 14, 5]),
    ScoreRequestItem(prompt_ids=[1, 4], completion_ids=[]),
    ScoreRequestItem(prompt_ids=[1, 12, 11, 14, 10, 15], completion_ids=[13]),
]


@pytest.fixture(scope="module")
def vllm_url(vllm_server):
    return vllm_server.url


@pytest.fixture(scope="module")
def variant_student(tmp_path_factory, tiny_model_factory):
    """A student whose tokenizer has three extra characters (ids 16..18) the teacher lacks."""
    out = tiny_model_factory(tmp_path_factory.mktemp("variant_student"), seed=0)
    path = out / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    for ch in "abc":
        vocab[ch] = len(vocab)
    path.write_text(json.dumps(data))
    assert len(load_tokenizer(out)) == 19
    return out


def test_info_probes_the_server(vllm_url, tiny_teacher_dir, tiny_model_dir):
    with VLLMServerTeacher(vllm_url) as t:
        info = t.info()
        assert info.model == str(tiny_teacher_dir)
        assert info.vocab_size == 16 and info.max_top_k == MAX_LOGPROBS and info.bos_token_id == 1
        assert info.tokenizer_fingerprint == probe_fingerprint(load_tokenizer(tiny_model_dir))
        assert t.stops_at(2, [1, 5]) and not t.stops_at(5, [1, 5])
        with pytest.raises(TeacherRequestError) as err:
            t.score(BATCH[:1], top_k=MAX_LOGPROBS + 1)  # above --max-logprobs: a 400, not retried
        assert err.value.status == 400 and t.usage()["retries"] == 0


def test_check_passes_for_the_matching_student(vllm_url, tiny_model_dir):
    report = check_teacher(vllm_url, "vllm", tiny_model_dir, top_k=4)
    assert report.ok, report.render()
    assert [i.name for i in report.items] == [
        "reachable",
        "logprobs",
        "top_k",
        "tokenizer",
        "vocabulary",
        "eos",
        "mode",
    ]
    with VLLMServerTeacher(vllm_url) as t:
        assert_compatible(t, tiny_model_dir)


def test_check_fails_for_too_large_top_k(vllm_url, tiny_model_dir):
    report = check_teacher(vllm_url, "vllm", tiny_model_dir, top_k=MAX_LOGPROBS + 2)
    assert not report.ok
    item = next(i for i in report.items if i.name == "top_k")
    assert (
        item.status == "fail"
        and f"at most {MAX_LOGPROBS}" in item.message
        and "--max-logprobs" in item.message
    )


def test_check_fails_for_a_student_with_another_tokenizer(vllm_url, variant_student, tiny_teacher_dir):
    report = check_teacher(vllm_url, "vllm", variant_student)
    assert not report.ok
    text = report.render()
    by_name = {i.name: i for i in report.items}
    assert by_name["tokenizer"].status == "fail" and by_name["vocabulary"].status == "fail"
    assert (
        str(variant_student) in by_name["tokenizer"].message
        and str(tiny_teacher_dir) in by_name["tokenizer"].message
    )
    assert "NOT OK" in text
    with VLLMServerTeacher(vllm_url) as t, pytest.raises(TeacherIncompatible, match="tokenize"):
        assert_compatible(t, variant_student)


def test_check_fails_when_log_probs_are_not_returned(vllm_url, tiny_model_dir):
    with ServerThread(make_stripping_proxy_app(vllm_url)) as proxy:
        report = check_teacher(proxy.url, "vllm", tiny_model_dir)
    item = next(i for i in report.items if i.name == "logprobs")
    assert item.status == "fail" and not report.ok
    assert "does not return log-probs" in item.message and "prompt_logprobs" in item.message

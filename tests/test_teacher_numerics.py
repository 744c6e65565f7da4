"""Every way onpolicy scores a sequence gives transformers' numbers: the in-process vLLM teacher in its Ray
actor, our teacher service (vLLM backend, over HTTP, in its binary and its JSON form), and an external vLLM
OpenAI server, each against the
plain transformers teacher (`HFTeacher`, in padded batches of 5), sequence log-probs and top-k alike, within
fp32 rounding of two kernel paths (tests/tolerances.py). The three engines are the session's (conftest.py).

(The student's own engine, sampler vs scorer vs transformers: tests/test_rollout_teacher.py; generation
log-probs: tests/test_teacher_generate.py.)"""

from __future__ import annotations

import random

import pytest

from onpolicy.protocols import Teacher
from onpolicy.teacher.clients.service import ServiceTeacher
from onpolicy.teacher.clients.vllm_server import VLLMServerTeacher
from onpolicy.teacher.fingerprint import check_compatible
from onpolicy.teacher.local.engines import HFTeacher
from onpolicy.types import ScoreRequestItem
from tests.tolerances import FP16_WIRE, FP32_KERNELS, assert_nested_close, assert_scores_close

pytestmark = pytest.mark.slow
TOP_K = 5  # within the session vLLM server's --max-logprobs 8


def sequences() -> list[ScoreRequestItem]:
    """Random token-id sequences of the toy vocabulary (ids 3..15 after BOS), 1-12 completion tokens, and
    the edge cases: an empty completion and a one-token prompt."""
    rng = random.Random(7)
    items = []
    for _ in range(9):
        prompt = [1] + [rng.randrange(3, 16) for _ in range(rng.randrange(1, 10))]
        completion = [rng.randrange(3, 16) for _ in range(rng.randrange(1, 12))] + [2]
        items.append(ScoreRequestItem(prompt_ids=prompt, completion_ids=completion))
    items.append(ScoreRequestItem(prompt_ids=[1, 4], completion_ids=[]))
    items.append(ScoreRequestItem(prompt_ids=[1], completion_ids=[4, 4, 9, 13, 14, 5]))
    return items


def test_every_teacher_kind_scores_like_transformers(vllm_local_teacher, teacher_service, vllm_server,
                                                     tiny_teacher_dir, tiny_model_dir):
    from conftest import TEACHER_SERVICE_KEY

    hf = HFTeacher(tiny_teacher_dir, batch_size=5)  # several padded batches
    items = sequences()
    with ServiceTeacher(teacher_service.url, api_key=TEACHER_SERVICE_KEY) as service, \
            ServiceTeacher(teacher_service.url, api_key=TEACHER_SERVICE_KEY, wire_format="json") as service_json, \
            ServiceTeacher(teacher_service.url, api_key=TEACHER_SERVICE_KEY, wire_format="compact") as compact, \
            VLLMServerTeacher(vllm_server.url, timeout_s=60) as server:
        assert service.wire_format == "binary"  # the default: top-k as arrays (types.encode_scores)
        ways = {"in-process vLLM": vllm_local_teacher, "our service": service, "our service, JSON": service_json,
                "our service, compact top-k": compact, "vLLM server": server}
        for name, teacher in ways.items():
            assert isinstance(teacher, Teacher), name
        # The tokenizer-level description agrees where it is read from the model folder (a vLLM server's
        # fingerprint is probed through /tokenize instead: tests/test_external_vllm.py).
        info = hf.info()
        assert info.max_top_k == 16 and info.eos_token_ids == [2]
        for teacher in (vllm_local_teacher, service):
            assert teacher.info().model_dump(exclude={"model"}) == info.model_dump(exclude={"model"})
        check_compatible(tiny_model_dir, vllm_local_teacher.info())
        scored = {name: 0 for name in ways}
        for k in (0, TOP_K):
            ref = hf.score(items, top_k=k)
            assert all((s.top_k is None) == (k == 0) for s in ref)
            for name, teacher in ways.items():
                before = teacher.usage().get("tokens_scored", 0)
                got = teacher.score(items, top_k=k)
                if teacher is compact:  # float16 top-k on the wire; the sampled tokens' log-probs stay float32
                    assert_scores_close(got, ref, FP16_WIRE)
                    assert_nested_close([s.logprobs for s in got], [s.logprobs for s in ref], FP32_KERNELS)
                else:
                    assert_scores_close(got, ref, FP32_KERNELS)
                scored[name] += teacher.usage().get("tokens_scored", 0) - before
        completion_tokens = sum(len(it.completion_ids) for it in items)
        assert scored["vLLM server"] == 2 * completion_tokens  # what the client reports it had scored
    # The teacher disagrees with the student (other weights): the comparisons above are not vacuous.
    student = HFTeacher(tiny_model_dir).score(items)
    assert max(abs(a - b) for s, r in zip(student, ref) for a, b in zip(s.logprobs, r.logprobs)) > 0.1

"""Real vLLM engines in Ray actors on a tiny random Llama: sampling, scoring, weight push, and a teacher of
another vocabulary refused.

Two rollout workers on the student are started once for the module, concurrently (an engine takes ~10-20 s
to start on two cores). The vLLM teacher's scores: tests/test_teacher_numerics.py.
"""

from __future__ import annotations

import math

import pytest

from onpolicy.config import ModelConfig, RunConfig
from onpolicy.rollout.pool import push_weights
from onpolicy.rollout.worker import make_rollout_workers
from onpolicy.teacher.fingerprint import TeacherIncompatible, check_compatible
from onpolicy.teacher.local.engines import HFTeacher
from onpolicy.toy import tokenizer as toy_tokenizer
from onpolicy.types import Rollout, ScoreRequestItem, WeightUpdate
from tests.tolerances import FP32_KERNELS, assert_nested_close

pytestmark = pytest.mark.slow

PROMPTS_TEXT = ["12+34=", "7+8=", "100+999="]
TOP_K = 4


@pytest.fixture(scope="module")
def prompts():
    tok = toy_tokenizer.build_tokenizer()
    return [tok.encode(t) for t in PROMPTS_TEXT]


@pytest.fixture(scope="module")
def workers(ray_session, tiny_model_dir):
    """Two rollout workers on the student."""
    workers = make_rollout_workers(2, str(tiny_model_dir), RunConfig(model=ModelConfig(student=str(tiny_model_dir))))
    yield workers
    for w in workers:
        ray_session.kill(w)


def hf_logprobs(model, items: list[ScoreRequestItem]) -> list[list[float]]:
    """Reference: transformers log-probs of each completion token, one unpadded sequence at a time."""
    import torch

    out = []
    with torch.no_grad():
        for it in items:
            ids = list(it.prompt_ids) + list(it.completion_ids)
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            n_p = len(it.prompt_ids)
            out.append([logp[n_p + t - 1, tok].item() for t, tok in enumerate(it.completion_ids)])
    return out


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max((abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)), default=0.0)


def as_items(rollouts: list[Rollout]) -> list[ScoreRequestItem]:
    return [ScoreRequestItem(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids) for r in rollouts]


def test_generate_shapes_versions_and_logprobs(ray_session, workers, prompts):
    eos = toy_tokenizer.build_tokenizer().eos_token_id
    for w in workers:
        assert ray_session.get(w.version.remote()) == 0
        rs = ray_session.get(
            w.generate.remote(prompts, n=3, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=11)
        )
        assert len(rs) == 3 * len(prompts)
        assert [r.prompt_index for r in rs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        for r in rs:
            assert r.prompt_ids == prompts[r.prompt_index]
            assert r.policy_version == 0
            assert 1 <= len(r.completion_ids) <= 8
            assert len(r.sampler_logprobs) == len(r.completion_ids)
            assert all(math.isfinite(lp) and lp <= 0.0 for lp in r.sampler_logprobs)
            if r.finish_reason == "stop":  # vLLM keeps the EOS it sampled
                assert r.completion_ids[-1] == eos
            else:
                assert len(r.completion_ids) == 8 and eos not in r.completion_ids
    # Seeded sampling is reproducible, and identical prompts still get different samples.
    again = ray_session.get(
        workers[1].generate.remote(prompts, n=3, max_new_tokens=8, temperature=1.0, seed=11)
    )
    assert [r.completion_ids for r in again] == [r.completion_ids for r in rs]
    same = ray_session.get(
        workers[0].generate.remote([prompts[0]] * 8, n=1, max_new_tokens=8, temperature=1.0, seed=3)
    )
    assert len({tuple(r.completion_ids) for r in same}) > 1


def test_sampler_logprobs_equal_scores_of_the_same_tokens(ray_session, workers, prompts, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    rs = ray_session.get(workers[0].generate.remote(prompts, n=4, max_new_tokens=10, temperature=1.0, seed=5))
    items = as_items(rs)
    sampler = [r.sampler_logprobs for r in rs]
    scored = ray_session.get(workers[1].score.remote(items))
    assert_nested_close(sampler, scored, FP32_KERNELS, "sampler vs scorer")
    reference = hf_logprobs(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), items)
    assert_nested_close(sampler, reference, FP32_KERNELS, "sampler vs transformers")


def test_teacher_with_other_vocab_is_refused(tiny_model_dir, tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(toy_tokenizer, "CHARS", toy_tokenizer.CHARS + list("-*x"))
    other = tiny_model_factory(tmp_path / "other_vocab_teacher", seed=2)
    monkeypatch.undo()
    info = HFTeacher(other).info()
    assert info.vocab_size == 19
    with pytest.raises(TeacherIncompatible) as err:
        check_compatible(tiny_model_dir, info)
    msg = str(err.value)
    assert str(tiny_model_dir) in msg and str(other) in msg
    assert "vocab size 16" in msg and "vocab size 19" in msg


def test_weight_push_reaches_every_worker(ray_session, workers, prompts, tiny_model_dir):
    """Last in the module: it leaves the workers at version 1."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    fixed = [
        ScoreRequestItem(prompt_ids=prompts[0], completion_ids=[5, 6, 2]),
        ScoreRequestItem(prompt_ids=prompts[2], completion_ids=[4, 4, 9, 13, 7, 2]),
    ]
    before = hf_logprobs(model, fixed)
    # A learner update: perturb every weight.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    after = hf_logprobs(model, fixed)
    assert max_abs_diff(before, after) > 1e-2

    update = WeightUpdate(version=1, tensors=[(n, t.detach().clone()) for n, t in model.state_dict().items()])
    assert push_weights(update, workers) == [1, 1]
    for w in workers:
        assert ray_session.get(w.version.remote()) == 1
        assert_nested_close(ray_session.get(w.score.remote(fixed)), after, FP32_KERNELS, "pushed engine vs model")
    rs = ray_session.get(workers[1].generate.remote(prompts, n=1, max_new_tokens=4, temperature=1.0, seed=1))
    assert {r.policy_version for r in rs} == {1}
    # Pushing an object-store reference works too (the driver puts once for many pushes).
    ref = ray_session.put(update.model_copy(update={"version": 2}))
    assert push_weights(ref, workers) == [2, 2]

"""Fast tests of the pure pieces: vLLM output conversion, seeds, tokenizer fingerprints.

The vLLM-shaped inputs are plain dataclasses with the fields vLLM's `CompletionOutput`,
`RequestOutput` and `Logprob` have (see the real-engine tests in test_rollout_teacher.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from onpolicy.engines.vllm import (
    completion_to_rollout,
    derive_seed,
    outputs_to_rollouts,
    prompt_logprobs_to_scores,
)
from onpolicy.model_dir import require_model_dir as check_model_dir
from onpolicy.teacher.fingerprint import (
    TeacherIncompatible,
    check_compatible,
    describe_model,
    load_tokenizer,
    tokenizer_fingerprint,
)
from onpolicy.toy import tokenizer as toy_tokenizer
from onpolicy.types import ScoreRequestItem


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class Completion:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:
    outputs: list[Completion] = field(default_factory=list)


def _completion(index, toks, lps, reason="stop"):
    return Completion(index, toks, [{t: Logprob(lp, 1)} for t, lp in zip(toks, lps)], reason)


def test_completion_to_rollout_keeps_eos_and_logprobs():
    c = _completion(0, [5, 6, 2], [-0.5, -1.0, -0.1])
    r = completion_to_rollout([1, 4], c, prompt_index=3, policy_version=7)
    assert r.prompt_ids == [1, 4] and r.completion_ids == [5, 6, 2]
    assert r.sampler_logprobs == [-0.5, -1.0, -0.1]
    assert (r.policy_version, r.prompt_index, r.finish_reason) == (7, 3, "stop")


def test_completion_to_rollout_rejects_bad_outputs():
    with pytest.raises(ValueError, match="logprobs=0"):
        completion_to_rollout([1], Completion(0, [5], None), prompt_index=0, policy_version=0)
    wrong_token = Completion(0, [5], [{6: Logprob(-1.0)}])
    with pytest.raises(ValueError, match="sampled token 5"):
        completion_to_rollout([1], wrong_token, prompt_index=0, policy_version=0)
    with pytest.raises(ValueError, match="finish_reason"):
        completion_to_rollout([1], _completion(0, [5], [-1.0], "abort"), prompt_index=0, policy_version=0)


def test_outputs_to_rollouts_groups_by_prompt_in_completion_order():
    outs = [
        RequestOutput([_completion(1, [7], [-2.0], "length"), _completion(0, [6, 2], [-1.0, -0.5])]),
        RequestOutput([_completion(0, [2], [-0.1]), _completion(1, [8, 9], [-1.5, -1.5], "length")]),
    ]
    rs = outputs_to_rollouts([[1, 4], [1, 5]], outs, policy_version=2)
    assert [r.prompt_index for r in rs] == [0, 0, 1, 1]
    assert [r.completion_ids for r in rs] == [[6, 2], [7], [2], [8, 9]]
    assert [r.finish_reason for r in rs] == ["stop", "length", "stop", "length"]
    assert all(r.policy_version == 2 for r in rs)
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        outputs_to_rollouts([[1], [1]], outs[:1], policy_version=0)


def test_prompt_logprobs_to_scores_picks_completion_positions_and_sorts_top_k():
    item = ScoreRequestItem(prompt_ids=[1, 4, 5], completion_ids=[6, 2])
    plp = [
        None,
        {4: Logprob(-3.0)},
        {5: Logprob(-2.0)},
        # position 3 scores token 6 (rank 3, outside the top-2) plus the top 2, unordered
        {6: Logprob(-2.5, 3), 9: Logprob(-0.7, 2), 8: Logprob(-0.4, 1)},
        # position 4 scores token 2, which is itself in the top 2: only 2 entries
        {10: Logprob(-1.2, 2), 2: Logprob(-0.3, 1)},
    ]
    s = prompt_logprobs_to_scores(item, plp, top_k=2)
    assert s.logprobs == [-2.5, -0.3]
    assert s.top_k == [[(8, -0.4), (9, -0.7)], [(2, -0.3), (10, -1.2)]]
    assert prompt_logprobs_to_scores(item, plp, top_k=0).top_k is None
    with pytest.raises(ValueError, match="max_logprobs"):
        prompt_logprobs_to_scores(item, plp, top_k=3)
    with pytest.raises(ValueError, match="expected 5"):
        prompt_logprobs_to_scores(item, plp[:4])


def test_prompt_logprobs_to_scores_empty_completion():
    item = ScoreRequestItem(prompt_ids=[1], completion_ids=[])
    assert prompt_logprobs_to_scores(item, None, top_k=3).model_dump(exclude_none=True) == {"logprobs": [], "top_k": []}


def test_derive_seed_differs_per_prompt_and_is_stable():
    seeds = [derive_seed(0, i) for i in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(3, 5) == derive_seed(3, 5) != derive_seed(5, 3)


def test_missing_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        check_model_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Two folders with the toy tokenizer, and one whose vocabulary has two extra characters."""
    a, b, other = (tmp_path_factory.mktemp(n) for n in ("tok_a", "tok_b", "tok_other"))
    toy_tokenizer.save_tokenizer(a)
    toy_tokenizer.save_tokenizer(b)
    mp = pytest.MonkeyPatch()
    mp.setattr(toy_tokenizer, "CHARS", toy_tokenizer.CHARS + ["-", "*"])
    toy_tokenizer.save_tokenizer(other)
    mp.undo()
    return a, b, other


def test_fingerprint_same_tokenizer_equal_different_vocab_differs(tokenizer_dirs):
    a, b, other = tokenizer_dirs
    fa, fb, fo = (tokenizer_fingerprint(load_tokenizer(p)) for p in (a, b, other))
    assert fa == fb
    assert fa != fo
    assert len(fa) == 64 and int(fa, 16) >= 0


def test_check_compatible_accepts_same_and_names_both_when_different(tokenizer_dirs):
    a, b, other = tokenizer_dirs
    assert check_compatible(a, b).vocab_size == 16
    with pytest.raises(TeacherIncompatible) as err:
        check_compatible(a, other)
    msg = str(err.value)
    assert str(a) in msg and str(other) in msg
    assert "vocab size 16" in msg and "vocab size 18" in msg
    fa = tokenizer_fingerprint(load_tokenizer(a))
    fo = tokenizer_fingerprint(load_tokenizer(other))
    assert fa[:16] in msg and fo[:16] in msg
    assert "uses the student's tokenizer" in msg
    assert isinstance(err.value, ValueError)


def test_check_compatible_refuses_a_different_eos(tokenizer_dirs):
    a, _, _ = tokenizer_dirs
    info = describe_model(a).model_copy(update={"model": "other-eos-teacher", "eos_token_ids": [3]})
    with pytest.raises(TeacherIncompatible, match="other-eos-teacher") as err:
        check_compatible(a, info)
    assert "EOS" in str(err.value) and str(a) in str(err.value)

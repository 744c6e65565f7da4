"""The tiny-model kit (onpolicy/kit): the spec's hash and shape rule, the lr it trains with, the batch
mask, and the build cache. Training itself is exercised by tests/test_toy.py and test_chat_example.py."""

from __future__ import annotations

import dataclasses
import math

import pytest

from onpolicy.kit.build import build_cached, is_current, read_build_info, save_random_model
from onpolicy.kit.spec import TINY_LLAMA, ModelSpec, hf_config, spec_hash
from onpolicy.kit.train import lr_for, make_batch, shuffled_epochs
from onpolicy.toy.models import STUDENT, TEACHER
from onpolicy.toy.tokenizer import build_tokenizer


def test_spec_hash_is_stable_and_covers_arch_shape_code_and_context():
    # The hashes the committed toy assets' build.json files record: a kit change that moves them makes
    # the prebuilt assets stale for every user.
    assert (TEACHER.spec_hash(), STUDENT.spec_hash()) == ("12a77e4612d438bb", "9ff582f49973f3ab")
    h = spec_hash(TINY_LLAMA, 1, task="x")
    assert h == spec_hash(dataclasses.replace(TINY_LLAMA), 1, task="x")
    others = [
        spec_hash(dataclasses.replace(TINY_LLAMA, arch="qwen2"), 1, task="x"),
        spec_hash(dataclasses.replace(TINY_LLAMA, kv_heads=1), 1, task="x"),
        spec_hash(dataclasses.replace(TINY_LLAMA, hidden=128), 1, task="x"),
        spec_hash(TINY_LLAMA, 2, task="x"),
        spec_hash(TINY_LLAMA, 1, task="y"),
    ]
    assert len({h, *others}) == 1 + len(others)


@pytest.mark.parametrize(("fields", "message"), [
    ({"hidden": 96, "heads": 2}, r"head_dim=48; vLLM's CPU attention needs head_dim in .*change hidden or heads"),
    ({"hidden": 100, "heads": 3}, r"hidden=100 / heads=3 gives head_dim=33\.3"),
    ({"hidden": 64, "heads": 2, "kv_heads": 3}, r"heads=2 must be a multiple of kv_heads=3"),
    ({"arch": "gpt2"}, r"arch='gpt2' is not one of \('llama', 'qwen2'\)"),
])
def test_shape_rule_refuses_what_vllm_cpu_or_transformers_would(fields, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY_LLAMA, **fields)


def test_hf_config_per_arch():
    tok = build_tokenizer()
    llama = hf_config(TINY_LLAMA, tok)
    assert (llama.model_type, llama.head_dim, llama.num_key_value_heads) == ("llama", 32, 2)
    assert llama.vocab_size == len(tok)
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (1, 2, 0)
    qwen2 = hf_config(dataclasses.replace(TINY_LLAMA, arch="qwen2", heads=2, kv_heads=1), tok)
    assert (qwen2.model_type, qwen2.num_attention_heads, qwen2.num_key_value_heads) == ("qwen2", 2, 1)
    assert llama.tie_word_embeddings is False and qwen2.tie_word_embeddings is False


def _committed_schedule(spec: ModelSpec, step: int) -> float:
    """The lr rule the committed toy assets were trained with, as it was written before the kit."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@pytest.mark.parametrize("spec", [TEACHER, STUDENT, dataclasses.replace(TINY_LLAMA, steps=3, warmup_steps=5)])
def test_lr_is_the_learner_schedule_and_reproduces_the_committed_one_exactly(spec):
    lrs = [lr_for(spec, s) for s in range(spec.steps)]
    assert lrs == [_committed_schedule(spec, s) for s in range(spec.steps)]  # ==, not approx: same weights
    if spec.steps > spec.warmup_steps:
        assert lrs[spec.warmup_steps] == pytest.approx(spec.lr) and spec.lr * 0.1 < lrs[-1] < spec.lr * 0.11


def test_batch_marks_the_positions_that_predict_completion_tokens():
    ids, attn, loss_mask = make_batch([([5, 6, 7], [8, 2]), ([5], [9, 9, 2])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 2], [5, 9, 9, 2, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # Logits at t predict token t+1: row 0's 8 and 2 are predicted at 2 and 3; row 1's at 0, 1 and 2.
    assert loss_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_shuffled_epochs_visit_every_pair_once_per_pass():
    pairs = [([i], [i]) for i in range(7)]
    it = shuffled_epochs(pairs, seed=3)
    first, second = [next(it) for _ in range(7)], [next(it) for _ in range(7)]
    assert sorted(first) == sorted(second) == pairs and first != second


def test_build_cache_reuses_copies_and_rebuilds(tmp_path):
    tok = build_tokenizer()
    made: list[str] = []

    def make(folder, seed=0):
        save_random_model(folder, TINY_LLAMA, tok, seed=seed)
        made.append(folder.name)
        return {"seed": seed}

    dest, logs = tmp_path / "out" / "tiny", []
    info = build_cached(dest, "tiny", "hash-a", make, log=logs.append)
    assert made == ["tiny.tmp"] and info["spec_hash"] == "hash-a" and info["seed"] == 0 and is_current(dest, "hash-a")
    assert not (tmp_path / "out" / "tiny.tmp").exists()
    weights = dest / "model.safetensors"
    before = weights.stat().st_mtime_ns

    assert build_cached(dest, "tiny", "hash-a", make, log=logs.append) == info  # current: reused as it is
    assert made == ["tiny.tmp"] and weights.stat().st_mtime_ns == before and "up to date" in logs[-1]

    # A prebuilt folder with the wanted hash is copied, not made.
    other = tmp_path / "other"
    build_cached(dest, "tiny", "hash-b", make, prebuilt=dest, log=logs.append)  # not current for hash-b: made
    assert made == ["tiny.tmp"] * 2 and read_build_info(dest)["spec_hash"] == "hash-b"
    build_cached(other, "tiny", "hash-b", make, prebuilt=dest, log=logs.append)
    assert made == ["tiny.tmp"] * 2 and "prebuilt copy" in logs[-1]
    assert (other / "model.safetensors").read_bytes() == weights.read_bytes()

    build_cached(dest, "tiny", "hash-b", lambda f: make(f, seed=1), force=True, log=logs.append)
    assert len(made) == 3 and read_build_info(dest)["seed"] == 1 and "--force" in logs[-1]

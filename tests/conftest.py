"""Shared fixtures: tiny random Llama models on disk and a Ray session.

- `build_tiny_model(out_dir, seed)`: a 2-layer Llama (hidden 64, ~60k parameters) over the toy
  character tokenizer, saved in Hugging Face format (weights, config, tokenizer). vLLM and
  transformers load it as they would a real model; it starts in a vLLM engine in ~20 s on CPU.
- `tiny_model_dir` (session): the student, seed 0. `tiny_teacher_dir` (session): same
  architecture and tokenizer, seed 1, so teacher and student disagree.
- `tiny_model_factory` (session): `build_tiny_model`, for variants.
- `ray_session` (session): a local Ray cluster (4 logical CPUs, no dashboard), shut down at
  the end. Each vLLM engine must live in its own actor (one engine per process).

Tests that start engines should share them through module- or session-scoped fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a seeded random tiny Llama + the toy tokenizer in `out_dir`; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onpolicy.toy.tokenizer import save_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(out)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # The default init (std 0.02) gives near-uniform outputs; widen it so log-probs vary.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny student model folder (seed 0)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_student"), seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A tiny teacher with the student's tokenizer and different weights (seed 1)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_teacher"), seed=1)


@pytest.fixture(scope="session")
def tiny_model_factory():
    """`build_tiny_model` itself, for tests that need a variant (another seed or tokenizer)."""
    return build_tiny_model


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster for the whole test session (yields the `ray` module)."""
    import ray

    # address "local": our own instance, never a cluster some `ray start` recorded in /tmp/ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()

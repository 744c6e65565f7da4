"""The residual stream after chosen decoder blocks of a transformers Llama/Qwen2 model, read with hooks.

Shared by the local teacher (it returns the mapped hidden states with its scores) and the learner (the
student's side of the hidden-state term), so "layer i" means one thing on both sides: the output of decoder
block i (0-based), before the final norm. `output_hidden_states=True` would not do: transformers puts the
final norm into the last entry for some models and versions and not for others.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch


def decoder_layers(model) -> list:
    """The decoder blocks of a causal LM, through a PEFT (LoRA) wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__} has no .model.layers: hidden states are read from Llama and "
                         "Qwen2 models only")
    return list(layers)


@contextmanager
def block_outputs(model, layers: list[int]) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward of `model` fills the yielded list with the output [B, T, H] of each block
    in `layers` (in that order; a layer may repeat). The tensors keep their graph (the learner backpropagates
    through them)."""
    blocks = decoder_layers(model)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"hidden-state layer(s) {bad} out of range: the model has {len(blocks)} decoder layers "
                         f"(0..{len(blocks) - 1})")
    seen: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def hook(index: int):
        def keep(_module, _inputs, output):
            seen[index] = output[0] if isinstance(output, tuple) else output
            if len(seen) == len(set(layers)):
                out[:] = [seen[i] for i in layers]
        return keep

    handles = [blocks[i].register_forward_hook(hook(i)) for i in sorted(set(layers))]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()

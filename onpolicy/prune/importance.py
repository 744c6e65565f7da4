"""Which heads, MLP channels and embedding channels matter: activation statistics on calibration sequences.

Minitron's importance scores (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"), each a mean over the N real tokens of the calibration batch (mask m_bt):

    head i of a layer:      F_i = (1/N) sum_{b,t} m_bt || a^{(i)}_bt ||_2    (head i's attention output, the
                                                                              o_proj input, over head_dim)
    MLP channel j:          F_j = (1/N) sum_{b,t} m_bt | z_btj |               (z = act(gate) * up, the
                                                                              down_proj input)
    embedding channel c:    F_c = (1/N) sum_{b,t} m_bt sum_n | LN_n(x)_btc |   (every RMSNorm's output n:
                                                                              both per block, and the final)

Minitron found a mean over the sequence and an L2 norm over the batch slightly better than one mean over all
tokens; with calibration batches of a few hundred short prompts the two rank channels alike, and one mean is
one formula to check. Heads and MLP channels are ranked within their layer; embedding channels once, for the
whole residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onpolicy.engines.hidden_states import decoder_layers


def head_scores(attn_out_BTD: torch.Tensor, mask_BT: torch.Tensor, heads: int) -> torch.Tensor:
    """sum_{b,t} m_bt ||a^{(i)}_bt||_2 for each head i (the sum; divide by N for F_i). `attn_out_BTD`: the
    heads' outputs side by side (D = heads x head_dim), as o_proj reads them."""
    B, T, D = attn_out_BTD.shape
    norms_BTH = attn_out_BTD.reshape(B, T, heads, D // heads).norm(dim=-1)
    return (norms_BTH * mask_BT[..., None]).sum(dim=(0, 1))


def channel_scores(x_BTC: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """sum_{b,t} m_bt |x_btc| for each channel c (the sum; divide by N for F_c)."""
    return (x_BTC.abs() * mask_BT[..., None]).sum(dim=(0, 1))


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring indices, in increasing index order (so keeping all of them changes nothing);
    ties go to the lower index."""
    order = torch.argsort(-scores.double(), stable=True)
    return sorted(int(i) for i in order[:k])


@dataclass
class Importance:
    heads_LH: torch.Tensor  # F_i per layer and query head
    mlp_LI: torch.Tensor  # F_j per layer and MLP channel
    hidden_C: torch.Tensor  # F_c per embedding channel
    tokens: int  # N


@torch.no_grad()
def collect_importance(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Importance:
    """Run `model` over `batches` of (input_ids_BT, mask_BT) (mask: 1 on real tokens, right-padded) and
    read the scores above off hooks on o_proj's and down_proj's inputs and the RMSNorms' outputs."""
    layers = decoder_layers(model)
    heads = int(model.config.num_attention_heads)
    n_layers = len(layers)
    sums = {"heads": [0.0] * n_layers, "mlp": [0.0] * n_layers, "hidden": 0.0}
    current: dict[str, torch.Tensor] = {}

    def on_input(kind: str, index: int):
        def hook(_module, inputs):
            x = inputs[0].double()
            m = current["mask"].to(x)
            sums[kind][index] = sums[kind][index] + (head_scores(x, m, heads) if kind == "heads" else
                                                     channel_scores(x, m))
        return hook

    def on_norm(_module, _inputs, output):
        sums["hidden"] = sums["hidden"] + channel_scores(output.double(), current["mask"].to(torch.float64))

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_input("heads", i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_input("mlp", i)))
        handles.append(layer.input_layernorm.register_forward_hook(on_norm))
        handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    handles.append(model.model.norm.register_forward_hook(on_norm))
    tokens = 0
    try:
        for ids_BT, mask_BT in batches:
            current["mask"] = mask_BT.float()
            model(input_ids=ids_BT, attention_mask=mask_BT.long(), use_cache=False)
            tokens += int(mask_BT.sum())
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise ValueError("the calibration batches hold no tokens to measure importance on")
    return Importance(torch.stack(sums["heads"]) / tokens, torch.stack(sums["mlp"]) / tokens,
                      sums["hidden"] / tokens, tokens)


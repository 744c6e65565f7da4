"""A transformers causal LM's output head, applied a chunk of positions at a time.

Why: the head turns each position's hidden state (H floats) into V logits, and with a 152k vocabulary
B x T x V float32 logits are gigabytes (2 x 2,048 positions: 2.5 GB, and as much again for each
log-softmax, gather or mask over them). Only positions that predict a completion token are ever read,
and each needs nothing from the others, so the learner and the transformers teacher run the model up
to its last hidden state, pick those positions, and apply the head to `chunk_tokens` of them at a time:
memory follows the chunk, not B x T x V.

`output_head` refuses a model that transforms its logits after the head (soft-capping, a logit scale),
which the head alone would silently skip; those models score through the model's own logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Positions per chunk when nothing else is said: 512 x 152k float32 logits are 0.3 GB per tensor; large
# enough that a chunk's head matmul runs at full speed on a CPU or a GPU.
DEFAULT_CHUNK_TOKENS = 512

# Config fields of transformers models whose forward changes the logits after the head.
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


class HeadUnsupported(ValueError):
    """The model's logits are more than its head's output; use the model's own forward instead."""


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps the last hidden state to logits (`lm_head`), or `HeadUnsupported`."""
    config = getattr(model, "config", None)
    extra = [name for name in _AFTER_HEAD if getattr(config, name, None) not in (None, 1, 1.0)]
    if extra:
        raise HeadUnsupported(
            f"{type(model).__name__} changes its logits after the output head ({', '.join(extra)}), so they cannot "
            "be computed a chunk at a time from its hidden states"
        )
    head = model.get_output_embeddings()
    if head is None:
        raise HeadUnsupported(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    return head


def chunk_slices(n: int, chunk_tokens: int) -> list[slice]:
    """[0, n) in consecutive slices of at most `chunk_tokens` (0: one slice; n = 0: none)."""
    step = chunk_tokens if chunk_tokens > 0 else max(n, 1)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def final_hidden(model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """The last hidden state [B, T, H] (what the head reads), from the model's own forward.

    Through the model's own forward, not its decoder alone, so whatever wraps it runs (FSDP's hooks gather
    sharded weights, a PEFT wrapper routes to its adapters); `logits_to_keep=1` has the head run on one
    position, and a hook on the decoder reads its output (`output_hidden_states` would keep every layer's,
    and whether its last entry is before or after the final norm varies between transformers models)."""
    seen: list = []
    handle = model.get_decoder().register_forward_hook(lambda _m, _i, out: seen.append(
        out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]))
    try:
        model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen[-1]


def ranked_topk(logp_NV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, ids) of the k most likely tokens per row in the contract's order: most likely first, ties
    by lower token id (`onpolicy.types.rank_top_k`)."""
    vals_NK, idx_NK = logp_NV.topk(k, dim=-1)
    idx_NK, order = idx_NK.sort(dim=-1)  # by id, then stable by value: equal values stay in id order
    vals_NK = vals_NK.gather(-1, order)
    vals_NK, order = vals_NK.sort(dim=-1, descending=True, stable=True)
    return vals_NK, idx_NK.gather(-1, order)


def logprobs_from_logits(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(log p(target) float32, top-k log-probs float32 or None, top-k ids int32 or None), all on the CPU."""
    import torch

    logp = torch.log_softmax(logits_NV.float(), dim=-1)
    lp_N = logp.gather(-1, targets_N.to(logp.device)[:, None])[:, 0].cpu()
    if not top_k:
        return lp_N, None, None
    vals, ids = ranked_topk(logp, top_k)
    return lp_N, vals.cpu(), ids.to(torch.int32).cpu()


def head_logprobs(
    head: torch.nn.Module, hidden_NH: torch.Tensor, targets_N: torch.Tensor, *, chunk_tokens: int,
    top_k: int = 0, autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`logprobs_from_logits` of N positions' hidden states, the head applied `chunk_tokens` positions at a
    time (no gradient)."""
    import torch

    parts = []
    with torch.no_grad():
        for sl in chunk_slices(hidden_NH.shape[0], chunk_tokens):
            with torch.autocast(hidden_NH.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = head(hidden_NH[sl])
            parts.append(logprobs_from_logits(logits, targets_N[sl], top_k))
            del logits
    if not parts:
        empty = torch.empty(0, top_k)
        return torch.empty(0), (empty if top_k else None), (empty.to(torch.int32) if top_k else None)
    lp = torch.cat([p[0] for p in parts])
    return lp, (torch.cat([p[1] for p in parts]) if top_k else None), (torch.cat([p[2] for p in parts]) if top_k else None)

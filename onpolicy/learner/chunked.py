"""A micro-batch's loss with the output head applied a chunk of completion positions at a time.

Why: the unchunked path materialises float32 logits for every position of the micro-batch (B x T x V),
then a log-softmax and each loss's own V-wide intermediates over all of them; with a 152k vocabulary
and 2 x 2,048 tokens that peaked at 13 GiB. Only positions that predict a completion token enter a loss,
every registered loss is a weighted sum over positions (`objectives.py`), so this runs the model to its
last hidden state, keeps the N completion positions, and computes head + loss `chunk_tokens` positions
at a time: the largest tensors are chunk x V.

How (as Liger's fused linear cross-entropy does): `_ChunkedHeadLoss` takes each chunk's gradient with
respect to its hidden states and the head's parameters inside the forward (`torch.autograd.grad` on the
chunk), frees the chunk's logits and keeps only those gradients (N x H, and the head's size); backward
scales them by the incoming gradient. Nothing is recomputed: the FLOPs of the unchunked path, minus the
prompt positions it wasted.

`chunk_tokens = 0` is the unchunked path, kept as the reference the float64 tests compare against and
for models whose logits are more than the head's output (`engines.hf_head.output_head` refuses those).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from onpolicy.engines.hf_head import chunk_slices, final_hidden, output_head
from onpolicy.learner.batch import LearnBatch, TokenBatch, token_batch
from onpolicy.learner.losses import upcast
from onpolicy.learner.objectives import LossInputs, Objective


@dataclass
class LossResult:
    loss: torch.Tensor  # differentiable scalar: sum_n w_n loss_n over the micro-batch
    learner_logprobs_BT: torch.Tensor  # log pi(target), detached, 0 where no completion token is predicted
    metrics: dict[str, float]  # the objective's per-position metrics, token means over completion tokens


class _Sums:
    """Token-weighted sums of an objective's per-position metrics, over chunks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, metrics_N: dict[str, torch.Tensor], mask_N: torch.Tensor) -> None:
        self.tokens += float(mask_N.sum())
        for name, v in metrics_N.items():
            self.sums[name] = self.sums.get(name, 0.0) + float((v.detach() * mask_N).sum())

    def means(self) -> dict[str, float]:
        return {name: total / max(self.tokens, 1.0) for name, total in self.sums.items()}


def _position_loss(
    objective: Objective, cfg: Any, tokens: TokenBatch, logits_NV: torch.Tensor, sums: _Sums
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_n w_n loss_n, log pi(target)_N) of positions `tokens` from their logits."""
    logits_NV = upcast(logits_NV)
    lp_N = torch.log_softmax(logits_NV, dim=-1).gather(-1, tokens.targets_N[:, None])[:, 0]
    loss_N, metrics_N = objective.fn(LossInputs(tokens, logits_NV, lp_N), cfg)
    sums.add(metrics_N, tokens.mask_N)
    return (loss_N * tokens.weights_N.to(loss_N.dtype)).sum(), lp_N


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss = sum over chunks c of chunk_loss(hidden[c], head parameters); gradients taken per chunk in forward."""

    @staticmethod
    def forward(ctx, hidden_NH: torch.Tensor, run: Callable, *params: torch.Tensor) -> torch.Tensor:
        # `run(h_cH, params, sl)` -> the chunk's weighted loss; ctx.needs_input_grad says what to differentiate.
        need_h, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        grad_h = torch.zeros_like(hidden_NH) if need_h else None
        grad_p = [torch.zeros_like(p) if need else None for p, need in zip(params, need_p)]
        total = torch.zeros((), dtype=torch.float64, device=hidden_NH.device)
        for sl in chunk_slices(hidden_NH.shape[0], run.chunk_tokens):
            with torch.enable_grad():
                h = hidden_NH[sl].detach().requires_grad_(need_h)
                leaves = [p.detach().requires_grad_(need) for p, need in zip(params, need_p)]
                loss = run(h, leaves, sl)
            wrt = [t for t in (h, *leaves) if t.requires_grad]
            if wrt:
                grads = iter(torch.autograd.grad(loss, wrt, allow_unused=True))
                if need_h:
                    grad_h[sl] = next(grads)
                for acc, need in zip(grad_p, need_p):
                    g = next(grads) if need else None
                    if g is not None:
                        acc += g
            total += loss.detach().double()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, *grad_p)))
        ctx.has = [g is not None for g in (grad_h, *grad_p)]
        return total.to(hidden_NH.dtype if hidden_NH.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        scaled = [g * grad_out.to(g.dtype) if has else None for g, has in zip(saved, ctx.has)]
        return scaled[0], None, *scaled[1:]


class _ChunkRunner:
    """One chunk's forward: the head (under autocast when the student is bf16/fp16), then the objective."""

    def __init__(self, head: torch.nn.Module, names: list[str], objective: Objective, cfg: Any,
                 tokens: TokenBatch, lp_N: torch.Tensor, sums: _Sums, chunk_tokens: int,
                 autocast_dtype: torch.dtype | None):
        self.head, self.names, self.objective, self.cfg = head, names, objective, cfg
        self.tokens, self.lp_N, self.sums, self.chunk_tokens = tokens, lp_N, sums, chunk_tokens
        self.autocast_dtype = autocast_dtype

    def __call__(self, h_cH: torch.Tensor, params: list[torch.Tensor], sl: slice) -> torch.Tensor:
        on = self.autocast_dtype is not None
        with torch.autocast(h_cH.device.type, dtype=self.autocast_dtype, enabled=on):
            logits = torch.func.functional_call(self.head, dict(zip(self.names, params)), (h_cH,))
        loss, lp = _position_loss(self.objective, self.cfg, self.tokens.part(sl), logits, self.sums)
        self.lp_N[sl] = lp.detach()
        return loss


def micro_batch_loss(
    model: torch.nn.Module, mb: LearnBatch, objective: Objective, cfg: Any, normalizer: float, *,
    chunk_tokens: int, autocast_dtype: torch.dtype | None = None,
) -> LossResult:
    """The objective's loss over `mb` (divided by the whole batch's `normalizer`), the learner's log-probs of
    the sampled tokens and the objective's metrics; `chunk_tokens` 0: the unchunked path."""
    sums = _Sums()
    device_type = mb.input_ids_BT.device.type
    autocast = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    lp_BT = torch.zeros(mb.mask_BT.shape, dtype=torch.float32, device=mb.mask_BT.device)
    if chunk_tokens == 0:
        tokens = token_batch(mb, cfg.normalize, normalizer, every_position=True)
        with autocast:
            logits_BTV = model(input_ids=mb.input_ids_BT, attention_mask=mb.attention_mask_BT, use_cache=False).logits
        loss, lp_N = _position_loss(objective, cfg, tokens, logits_BTV.reshape(len(tokens), -1), sums)
    else:
        head = output_head(model)
        tokens = token_batch(mb, cfg.normalize, normalizer)
        with autocast:
            hidden_NH = final_hidden(model, mb.input_ids_BT, mb.attention_mask_BT)[tokens.rows_N, tokens.cols_N]
        named = list(head.named_parameters())
        lp_N = torch.zeros(len(tokens), dtype=hidden_NH.dtype if hidden_NH.dtype == torch.float64 else torch.float32,
                           device=hidden_NH.device)
        run = _ChunkRunner(head, [n for n, _ in named], objective, cfg, tokens, lp_N, sums, chunk_tokens,
                           autocast_dtype)
        loss = _ChunkedHeadLoss.apply(hidden_NH, run, *(p for _, p in named))
    lp_BT = lp_BT.to(lp_N.dtype)
    lp_BT[tokens.rows_N, tokens.cols_N] = lp_N.detach()
    lp_BT = lp_BT * mb.mask_BT.to(lp_BT.dtype)
    return LossResult(loss, lp_BT, sums.means())

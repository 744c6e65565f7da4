"""The hidden-state term (`loss.hidden`): the student's residual stream pulled towards the teacher's.

On the student's own samples, at every position that predicts a completion token (mask m_t), for each mapped
pair (student layer s_l -> teacher layer t_l), l = 1..L:

    cosine (DistilBERT, Sanh et al. 2019):  ell_{t,l} = 1 - cos(W_l h^S_{s_l,t}, h^T_{t_l,t})
    mse    (FitNets, Romero et al. 2015):   ell_{t,l} = (1/H_T) || W_l h^S_{s_l,t} - h^T_{t_l,t} ||^2

    L_hidden = weight * sum_t m_t (1/L) sum_l ell_{t,l} / N

W_l is the identity where the widths agree, else a learned H_S -> H_T linear map (FitNets' regressor), trained
with the student by the same optimiser and kept only in checkpoints (never in the exported student). N is the
whole batch's completion-token count, so micro-batches add up to the batch's term. Kept apart from the output
losses (objectives.py) so a chunked output loss leaves it alone: it reads hidden states, not logits.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch

from onpolicy.engines.hidden_states import block_outputs
from onpolicy.model_dir import model_hidden_size

if TYPE_CHECKING:
    from collections.abc import Iterator

    from onpolicy.config import HiddenStateConfig, RunConfig


def hidden_state_loss(
    student_BTLH: torch.Tensor, teacher_BTLH: torch.Tensor, mask_BT: torch.Tensor, kind: str, normalizer: float
) -> torch.Tensor:
    """sum_t m_t mean_l ell_{t,l} / normalizer, with the student's states already projected to the teacher's
    width (module doc). Computed in float32 or whatever dtype the inputs share."""
    if student_BTLH.shape != teacher_BTLH.shape:
        raise ValueError(f"student hidden states {tuple(student_BTLH.shape)} and teacher's "
                         f"{tuple(teacher_BTLH.shape)} differ in shape (project the student's first)")
    if kind == "cosine":
        per_BTL = 1.0 - torch.nn.functional.cosine_similarity(student_BTLH, teacher_BTLH, dim=-1, eps=1e-8)
    elif kind == "mse":
        per_BTL = (student_BTLH - teacher_BTLH).pow(2).mean(dim=-1)
    else:
        raise ValueError(f"unknown loss.hidden.kind {kind!r} (expected 'cosine' or 'mse')")
    return (per_BTL.mean(dim=-1) * mask_BT).sum() / normalizer


class HiddenTerm(torch.nn.Module):
    """The term's state: which layers, how to compare, and the projections W_l (none where widths agree)."""

    def __init__(self, cfg: HiddenStateConfig, student_width: int, teacher_width: int):
        super().__init__()
        self.cfg = cfg
        self.student_layers = cfg.student_layers()
        self.projections = torch.nn.ModuleList(
            [torch.nn.Linear(student_width, teacher_width, bias=False) for _ in self.student_layers]
        ) if student_width != teacher_width else None

    @classmethod
    def for_run(cls, cfg: RunConfig, model) -> HiddenTerm | None:
        """The term `cfg.loss.hidden` asks for (None: no term); widths from the student and the local teacher."""
        hidden = getattr(cfg.loss, "hidden", None)
        if hidden is None:
            return None
        teacher_width = model_hidden_size(cfg.teacher.model)  # a local teacher: the config refuses others
        if teacher_width is None:
            raise ValueError(f"loss.hidden: the teacher folder {cfg.teacher.model} does not say its hidden_size")
        return cls(hidden, int(model.config.hidden_size), teacher_width)

    @contextmanager
    def capture(self, model) -> Iterator[list[torch.Tensor]]:
        with block_outputs(model, self.student_layers) as states:
            yield states

    def loss(self, student_states: list[torch.Tensor], teacher_BTLH: torch.Tensor, mask_BT: torch.Tensor,
             normalizer: float) -> torch.Tensor:
        """weight * L_hidden for one micro-batch (`student_states`: [B, T, H_S] per mapped layer)."""
        dtype = torch.promote_types(student_states[0].dtype, torch.float32)  # at least float32 (bf16 forwards)
        if self.projections is not None:
            dtype = torch.promote_types(dtype, self.projections[0].weight.dtype)
            student_states = [w.to(dtype)(h.to(dtype)) for w, h in zip(self.projections, student_states)]
        student_BTLH = torch.stack([h.to(dtype) for h in student_states], dim=2)
        return self.cfg.weight * hidden_state_loss(student_BTLH, teacher_BTLH.to(dtype), mask_BT.to(dtype),
                                                   self.cfg.kind, normalizer)


def capture(term: HiddenTerm | None, model):
    """`term.capture(model)`, or a context yielding nothing to capture when there is no term."""
    return nullcontext([]) if term is None else term.capture(model)

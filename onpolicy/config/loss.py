"""The `loss` section: one member per loss, with its own fields and three facts about it.

The facts are class attributes, read by everything else instead of lists restating them:
- `default_lr`: the peak learning rate when `optim.lr` is unset;
- `needs_topk`: the teacher must return its top-k at every position (`teacher.top_k > 0`);
- `samples`: who samples the completions: the student (on-policy), the teacher, or `mixed` (GKD's `lmbda`).
The loss registry (onpolicy/learner/objectives.py) takes them from here: the config is the lowest layer,
and the CLI, the control API and the config's own checks need them without importing the learner.

A new loss is a member here (listed in `LossConfig`) and its function, registered with
`@register_objective("my_loss")` in onpolicy/learner/objectives.py.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from onpolicy.config.base import Kinds, Section

Samples = Literal["student", "teacher", "mixed"]


class LossBase(Section):
    default_lr: ClassVar[float] = 1e-3
    needs_topk: ClassVar[bool] = False
    samples: ClassVar[Samples] = "student"

    normalize: Literal["token", "sequence"] = Field(
        "token", description="Average the loss over all tokens, or per sequence then over sequences."
    )
    mask_truncated: bool = Field(
        False,
        description="Leave completions that hit rollout.max_new_tokens without a stop token out of the loss "
        "(they are still counted in truncated_frac).",
    )


class HiddenStateConfig(Section):
    """A hidden-state term added to an on-policy loss (DistilBERT's cosine term; FitNets' projection where the
    widths differ): docs/students.md. Needs a local teacher with `backend: hf` (it returns the hidden states)."""

    weight: float = Field(1.0, gt=0.0, le=1000.0, description="Weight of the hidden-state term in the loss.")
    layers: dict[int, int] = Field(
        min_length=1, max_length=64,
        description="Student layer -> teacher layer (0-based decoder blocks; the residual stream after the block), "
        "e.g. {0: 1, 1: 3} for a student cut from every other layer of a 4-layer teacher.",
    )
    kind: Literal["cosine", "mse"] = Field(
        "cosine", description="`cosine`: 1 - cos(W h_s, h_t) (DistilBERT); `mse`: mean squared error per channel "
        "(FitNets)."
    )

    @field_validator("layers")
    @classmethod
    def _non_negative(cls, layers: dict[int, int]) -> dict[int, int]:
        bad = {s: t for s, t in layers.items() if s < 0 or t < 0}
        if bad:
            raise ValueError(f"loss.hidden.layers has negative layer indices {bad}: layers count from 0")
        return layers

    def student_layers(self) -> list[int]:
        return sorted(self.layers)

    def teacher_layers(self) -> list[int]:
        """The teacher layers in the order of `student_layers()` (the order the teacher returns them in)."""
        return [self.layers[s] for s in self.student_layers()]


class _OnPolicyLoss(LossBase):
    hidden: HiddenStateConfig | None = Field(
        None, description="Add a hidden-state term on the student's samples (local `hf` teacher only; null: none)."
    )


class ReverseKLLossConfig(_OnPolicyLoss):
    """Sampled per-token reverse KL on the student's samples, with an importance ratio (DESIGN.md, the maths)."""

    # Policy-gradient steps: 1e-3 collapses it on the toy (docs/losses.md).
    default_lr: ClassVar[float] = 3e-4

    kind: Literal["reverse_kl"] = Field(
        "reverse_kl", description="`reverse_kl`: sampled per-token reverse KL with importance ratio."
    )
    kl_coef: float = Field(1.0, gt=0.0, le=100.0, description="Scale c of the advantage A_t = -c r_t.")
    baseline: Literal["none", "center", "whiten"] = Field(
        "whiten",
        description="Subtract the batch mean of A_t (`center`), and divide by its std (`whiten`), over the whole "
        "batch: less variance, steps of one size whatever the teacher's log-prob range.",
    )
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="Discount of future per-token KL (0: per-token).")
    ratio_max: float = Field(
        10.0, gt=1.0, le=1e6, description="Importance ratios above this are masked out (and counted)."
    )


class TopKReverseKLLossConfig(_OnPolicyLoss):
    needs_topk: ClassVar[bool] = True

    kind: Literal["topk_reverse_kl"] = Field(
        "topk_reverse_kl",
        description="`topk_reverse_kl`: reverse KL over the teacher's top-k plus a tail bucket, on the student's "
        "samples (exact when top_k is the vocabulary).",
    )


class JSDLossConfig(_OnPolicyLoss):
    needs_topk: ClassVar[bool] = True

    kind: Literal["jsd"] = Field(
        "jsd", description="`jsd`: generalised JSD over the teacher's top-k plus a tail bucket, on the student's "
        "samples."
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD beta: 0 = forward KL, 1 = reverse KL.")


class GKDLossConfig(JSDLossConfig):
    samples: ClassVar[Samples] = "mixed"

    kind: Literal["gkd"] = Field(  # type: ignore[assignment]  # a member of its own, JSD's fields
        "gkd", description="`gkd`: `jsd` on a batch the student sampled with probability `lmbda`, else on one the "
        "teacher sampled (Agarwal et al. 2023)."
    )
    lmbda: float = Field(
        0.5, ge=0.0, le=1.0, description="Probability that a batch is student-sampled (else teacher-sampled)."
    )

    @field_validator("hidden")
    @classmethod
    def _no_hidden(cls, hidden: HiddenStateConfig | None) -> HiddenStateConfig | None:
        if hidden is not None:  # its teacher-sampled batches come with no hidden states
            raise ValueError("loss.hidden applies to losses on the student's own samples (reverse_kl, "
                             "topk_reverse_kl, jsd), not gkd: its teacher-sampled batches carry no hidden states")
        return hidden


class SFTLossConfig(LossBase):
    samples: ClassVar[Samples] = "teacher"

    kind: Literal["sft"] = Field(
        "sft", description="`sft`: sequence-level KD, cross-entropy on the teacher's samples (Kim & Rush)."
    )


class SoftTargetsLossConfig(LossBase):
    needs_topk: ClassVar[bool] = True
    samples: ClassVar[Samples] = "teacher"

    kind: Literal["soft_targets"] = Field(
        "soft_targets",
        description="`soft_targets`: on the teacher's samples, T^2-scaled KL at temperature T over the top-k "
        "plus (1-alpha) cross-entropy (Hinton et al. 2015).",
    )
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="Distillation temperature T.")
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="Weight of the soft (KL) term; 1 - alpha on the hard labels."
    )


LossConfig = Annotated[
    ReverseKLLossConfig | TopKReverseKLLossConfig | JSDLossConfig | GKDLossConfig | SFTLossConfig
    | SoftTargetsLossConfig,
    Field(discriminator="kind"),
]
LOSS_KINDS = Kinds.of("loss", LossConfig, default="reverse_kl")

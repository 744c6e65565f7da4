"""The teacher's side of a training step and of an evaluation: score the student's sampled tokens.

One function, used by the sampler (training: log-probs, plus top-k rows for a loss that needs them)
and by held-out evaluation (log-probs only), so both ask the teacher the same question.

A teacher with another tokenizer (`spans.SpanTeacher`) scores the rollouts themselves: it needs their text
(the examples, for conversations) and the sampler's log-probs to spread each span's KL over the student's
tokens. A text-only teacher (`text_only.TextTeacher`) scores nothing (`can_score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from onpolicy.protocols import Teacher
from onpolicy.types import Example, GeneratedCompletion, Rollout, ScoreRequestItem, TeacherScores


@runtime_checkable
class RolloutScorer(Protocol):
    """A teacher that scores rollouts (not token ids) and samples from examples: another tokenizer, or none."""

    mode: str  # `span` or `sequence` (modes.py)

    def score_rollouts(self, rollouts: list[Rollout], examples: Sequence[Example | None] | None = None,
                       top_k: int = 0) -> list[TeacherScores]: ...

    def generate(self, prompts: list[list[int]], *, examples: Sequence[Example | None] | None = None,
                 **sample: Any) -> list[GeneratedCompletion]: ...


def can_score(teacher: Teacher) -> bool:
    """False for a text-only teacher (sequence-level: it returns no log-probs)."""
    return getattr(teacher, "mode", "token") != "sequence"


def score_rollouts(teacher: Teacher, rollouts: list[Rollout], top_k: int = 0,
                   examples: Sequence[Example | None] | None = None) -> list[TeacherScores]:
    """Per-token teacher log-probs of each rollout's completion (and top-k rows when `top_k` > 0); `examples`
    (one per rollout, optional) give a teacher with another tokenizer the conversation to render."""
    if isinstance(teacher, RolloutScorer):
        return teacher.score_rollouts(rollouts, examples, top_k)
    items = [ScoreRequestItem(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids) for r in rollouts]
    return teacher.score(items, top_k=top_k)


def generate(teacher: Teacher, prompts: list[list[int]], examples: Sequence[Example | None] | None,
             **sample: Any) -> list[GeneratedCompletion]:
    """The teacher's completions of `prompts` in the student's tokens (`examples` for one that works on text)."""
    if isinstance(teacher, RolloutScorer):
        return teacher.generate(prompts, examples=examples, **sample)
    return teacher.generate(prompts, **sample)

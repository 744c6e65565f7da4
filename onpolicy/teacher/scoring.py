"""The teacher's side of a training step and of an evaluation: score the student's sampled tokens.

One function, used by the sampler (training: log-probs, plus top-k rows for a loss that needs them)
and by held-out evaluation (log-probs only), so both ask the teacher the same question.
"""

from __future__ import annotations

from onpolicy.protocols import Teacher
from onpolicy.types import Rollout, ScoreRequestItem, TeacherScores


def score_rollouts(teacher: Teacher, rollouts: list[Rollout], top_k: int = 0) -> list[TeacherScores]:
    """Per-token teacher log-probs of each rollout's completion (and top-k rows when `top_k` > 0)."""
    items = [ScoreRequestItem(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids) for r in rollouts]
    return teacher.score(items, top_k=top_k)

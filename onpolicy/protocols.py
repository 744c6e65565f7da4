"""Protocols at the boundaries inside a run. Implementations live next to their role
(`rollout/`, `teacher/`, `learner/`); the driver only talks to these shapes."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from onpolicy.types import Rollout, ScoreRequestItem, TeacherInfo, TeacherScores, WeightUpdate


@runtime_checkable
class Teacher(Protocol):
    """Scores token sequences: per-token log-probs of the completion, optionally top-k."""

    def info(self) -> TeacherInfo: ...

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]: ...


@runtime_checkable
class WeightSink(Protocol):
    """Something that serves the student and can take new weights (a rollout engine)."""

    def load_weights(self, update: WeightUpdate) -> int:
        """Load the weights, drop cached state that depends on them, return the new version."""
        ...


@runtime_checkable
class RolloutEngine(WeightSink, Protocol):
    """Samples completions from the current student and records sampler log-probs."""

    version: int

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Rollout]: ...

    def score(self, items: list[ScoreRequestItem]) -> list[list[float]]:
        """Log-probs the engine assigns to each completion token (checks the weight push)."""
        ...

"""The `Teacher` protocol: what the driver, evaluation and the teacher service need from a teacher,
whatever its kind (local engine, our service, external vLLM or SGLang; see `teacher/factory.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from onpolicy.types import ScoreRequestItem, TeacherInfo, TeacherScores


@runtime_checkable
class Teacher(Protocol):
    """Scores token sequences: per-token log-probs of the completion, optionally top-k."""

    def info(self) -> TeacherInfo: ...

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]: ...

    def max_top_k(self) -> int:
        """The most top-k entries per position this teacher returns."""
        ...

    def usage(self) -> dict[str, Any]:
        """Counters since the teacher was opened (requests, tokens scored, retries, latency, ...)."""
        ...

    def compatibility(self, student_path: str | Path) -> list[tuple[str, str, str]]:
        """(check, pass|fail|warn|skip, message) of this teacher against a student folder (tokenizer, EOS)."""
        ...

    def close(self) -> None:
        """Release what the teacher holds (an actor, connections). Safe to call twice."""
        ...

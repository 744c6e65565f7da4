"""The `Teacher` protocol: what the driver, evaluation and the teacher service need from a teacher,
whatever its kind (local engine, our service, external vLLM or SGLang; see `teacher/factory.py`): it
scores the student's tokens (on-policy methods) and samples completions of its own (off-policy methods:
sequence-level KD, soft targets on teacher samples, GKD's teacher-sampled batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from onpolicy.types import GeneratedCompletion, ScoreRequestItem, TeacherInfo, TeacherScores


@runtime_checkable
class Teacher(Protocol):
    """Scores token sequences (per-token log-probs of the completion, optionally top-k) and samples
    completions of token-id prompts."""

    def info(self) -> TeacherInfo: ...

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]: ...

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GeneratedCompletion]:
        """`n` sampled completions per prompt, grouped by prompt in prompt order (`prompt_index` indexes
        `prompts`). Each ends on EOS (`stop`, the EOS id included) or after `max_new_tokens` (`length`);
        `logprobs[t]` is the teacher's raw log-prob of token t, whatever `temperature` and `top_p` are.
        Temperature 0 is greedy (the n completions are then equal); `seed` makes the call reproducible."""
        ...

    def max_top_k(self) -> int:
        """The most top-k entries per position this teacher returns."""
        ...

    def usage(self) -> dict[str, Any]:
        """Counters since the teacher was opened (requests, tokens scored, tokens generated, prompt tokens of
        generation calls, retries, latency, ...)."""
        ...

    def compatibility(self, student_path: str | Path) -> list[tuple[str, str, str]]:
        """(check, pass|fail|warn|skip, message) of this teacher against a student folder (tokenizer, EOS)."""
        ...

    def close(self) -> None:
        """Release what the teacher holds (an actor, connections). Safe to call twice."""
        ...

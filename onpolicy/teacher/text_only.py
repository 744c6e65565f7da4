"""A text-only teacher in the student's tokens: sequence-level KD (Kim & Rush), the seed's fallback when the
teacher returns nothing but text.

It samples completions of each prompt (the example's conversation, or its text as one user turn) through
`OpenAITextClient`; each text comes back as the student's tokens (`retokenize.StudentText`) and the `sft` loss
trains the student on them. It scores nothing: a loss that needs the teacher's log-probs is refused before the
run starts (config/run.py), and held-out evaluation reports accuracy only (no reverse KL).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onpolicy.teacher.clients.openai_text import OpenAITextClient
from onpolicy.teacher.errors import TeacherError
from onpolicy.teacher.fingerprint import CheckResult
from onpolicy.teacher.retokenize import StudentText
from onpolicy.types import Example, GeneratedCompletion, Rollout, ScoreRequestItem, TeacherInfo, TeacherScores

TEXT_ONLY = "text-only"  # the fingerprint a text-only teacher reports: it has no tokenizer to compare


class TextTeacher:
    """`Teacher` over a text-only endpoint: generates (in the student's tokens), never scores."""

    mode = "sequence"

    def __init__(self, client: OpenAITextClient, student: StudentText) -> None:
        self.client, self.student = client, student

    def info(self) -> TeacherInfo:
        return TeacherInfo(model=self.client.model_name(), vocab_size=0, tokenizer_fingerprint=TEXT_ONLY,
                           eos_token_ids=[], max_top_k=0)

    def max_top_k(self) -> int:
        return 0

    def compatibility(self, student_path: str | Path) -> list[CheckResult]:
        return [("tokenizer", "pass", "text only: its samples are re-tokenized for the student")]

    def usage(self) -> dict[str, Any]:
        return self.client.usage()

    def close(self) -> None:
        self.client.close()

    def _no_scores(self) -> TeacherError:
        return TeacherError(f"{self.client.source} returns text only: it scores nothing (sequence-level KD trains "
                            "on its samples: loss.kind=sft)")

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        raise self._no_scores()

    def score_rollouts(self, rollouts: list[Rollout], examples: Sequence[Example | None] | None = None,
                       top_k: int = 0) -> list[TeacherScores]:
        raise self._no_scores()

    def generate(self, prompts: list[list[int]], *, examples: Sequence[Example | None] | None = None, n: int = 1,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[GeneratedCompletion]:
        """`n` completions per prompt in the student's tokens, grouped by prompt; `logprobs` are 0 (none known)."""
        examples = list(examples) if examples is not None else [None] * len(prompts)
        texts = [self.student.prompt(p, ex) for p, ex in zip(prompts, examples)]
        out = []
        for c in self.client.generate_text(texts, n=n, max_tokens=max_new_tokens, temperature=temperature,
                                           top_p=top_p, seed=seed):
            ids, finish = self.student.completion(c.text, c.stopped, max_new_tokens)
            out.append(GeneratedCompletion(prompt_index=c.prompt_index, completion_ids=ids, logprobs=[0.0] * len(ids),
                                           finish_reason=finish))
        return out

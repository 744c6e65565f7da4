"""A teacher with another tokenizer, seen through the student's tokens: cross-tokenizer on-policy distillation.

For each rollout the teacher gets the same text in its own tokens: the prompt as the student was given it
(a conversation rendered with the *teacher's* chat template, or the plain text) and the completion's text
re-tokenized, plus its own end token when the student stopped. It scores that (any teacher that scores token
ids: local, our service, vLLM, SGLang, managed), and `alignment.py` turns its per-token log-probs into one
value per student token over the spans where both tokenizations share a boundary at both ends, so the sampled
reverse KL per span is exact and the learner, its importance ratio and every metric work unchanged.

What is not done, and why:
- no top-k: the teacher's top-k is over its own vocabulary and next *teacher* token, while the student's
  distribution is over its tokens; a full-distribution loss would need the teacher's probability of every
  student token continuing the text, which no scoring API returns. GOLD compares the two distributions sorted
  by probability (ULD), which ignores which token is which: on the toy's digits a confidently wrong digit
  scores like a confidently right one. The preflight refuses those losses with this reason (modes.py).
- the completion is re-tokenized apart from the prompt, so a teacher token never straddles the boundary (the
  teacher's tokenization of prompt + completion at once may merge across it; the toy BPE teacher is trained on
  this split).

Usage adds the alignment coverage: the share of student tokens inside exact spans (`span_coverage`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onpolicy.chat import render_ids
from onpolicy.protocols import Teacher
from onpolicy.teacher.alignment import Alignment, align, student_targets
from onpolicy.teacher.errors import TeacherError
from onpolicy.teacher.fingerprint import CheckResult
from onpolicy.teacher.retokenize import StudentText, end_id, utf8
from onpolicy.teacher.token_bytes import pieces_of, token_byte_table
from onpolicy.types import Example, GeneratedCompletion, Rollout, ScoreRequestItem, TeacherInfo, TeacherScores


@dataclass(frozen=True)
class SpanPlan:
    """What the teacher is asked for one rollout, and how its answer maps back."""

    item: ScoreRequestItem | None  # None: nothing to score (an empty text)
    alignment: Alignment


class SpanTeacher:
    """`Teacher` in the student's tokens over a teacher (`inner`) with tokenizer `teacher_tokenizer`."""

    mode = "span"

    def __init__(self, inner: Teacher, student: StudentText, teacher_tokenizer: Any, *, chat: bool) -> None:
        self.inner, self.student, self.t_tok = inner, student, teacher_tokenizer
        self.t_table = token_byte_table(teacher_tokenizer)
        self.t_end = end_id(teacher_tokenizer, chat)
        self._lock = threading.Lock()
        self._tokens = self._covered = self._sequences = 0

    # ---- the Teacher protocol, by delegation -------------------------------------------------
    def info(self) -> TeacherInfo:
        return self.inner.info()

    def max_top_k(self) -> int:
        return 0  # its top-k would be over another vocabulary (module docstring)

    def compatibility(self, student_path: str | Path) -> list[CheckResult]:
        return [("tokenizer", "pass", "another tokenizer than the student's: span-aligned on byte offsets")]

    def usage(self) -> dict[str, Any]:
        with self._lock:
            mine = {"span_sequences": self._sequences, "span_student_tokens": self._tokens,
                    "span_covered_tokens": self._covered,
                    "span_coverage": self._covered / self._tokens if self._tokens else None}
        return {**self.inner.usage(), **mine}

    def close(self) -> None:
        self.inner.close()

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        raise TeacherError("a teacher with another tokenizer scores rollouts (their text and the sampler's "
                           "log-probs), not token ids: use onpolicy.teacher.scoring.score_rollouts")

    # ---- scoring -----------------------------------------------------------------------------
    def teacher_prompt(self, prompt_ids: Sequence[int], example: Example | None) -> list[int]:
        """The prompt in the teacher's tokens: a conversation rendered with its own template, or the text."""
        prompt = self.student.prompt(prompt_ids, example)
        if isinstance(prompt, list):
            return render_ids(self.t_tok, prompt)
        return [int(i) for i in self.t_tok(prompt)["input_ids"]]

    def plan(self, rollout: Rollout, example: Example | None) -> SpanPlan:
        ids = list(rollout.completion_ids)
        stopped = rollout.finish_reason == "stop" and bool(ids) and ids[-1] in self.student.stop_ids
        s_pieces = self.student.pieces(ids[:-1] if stopped else ids)
        text = utf8(s_pieces)
        t_body = [int(i) for i in self.t_tok(text, add_special_tokens=False)["input_ids"]] if text else []
        alignment = align(s_pieces, pieces_of(self.t_table, t_body), eos=stopped)
        completion = t_body + ([self.t_end] if stopped else [])
        if not completion:
            return SpanPlan(None, alignment)
        return SpanPlan(ScoreRequestItem(prompt_ids=self.teacher_prompt(rollout.prompt_ids, example),
                                         completion_ids=completion), alignment)

    def score_rollouts(self, rollouts: list[Rollout], examples: Sequence[Example | None] | None = None,
                       top_k: int = 0) -> list[TeacherScores]:
        """One teacher log-prob per student token of each rollout (`alignment.student_targets`)."""
        if top_k:
            raise ValueError("a teacher with another tokenizer returns no top-k over the student's vocabulary: use "
                             "loss.kind=reverse_kl (exact per span) or sft")
        examples = list(examples) if examples is not None else [None] * len(rollouts)
        plans = [self.plan(r, ex) for r, ex in zip(rollouts, examples)]
        asked = [p.item for p in plans if p.item is not None]
        answers = iter(self.inner.score(asked) if asked else [])
        out = []
        for r, p in zip(rollouts, plans):
            teacher_lps = next(answers).logprobs if p.item is not None else []
            out.append(TeacherScores(logprobs=student_targets(p.alignment, r.sampler_logprobs, teacher_lps)))
        with self._lock:
            self._sequences += len(plans)
            self._tokens += sum(p.alignment.student_tokens for p in plans)
            self._covered += sum(p.alignment.covered for p in plans)
        return out

    # ---- generation (sequence-level losses on its samples) ----------------------------------
    def generate(self, prompts: list[list[int]], *, examples: Sequence[Example | None] | None = None, n: int = 1,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[GeneratedCompletion]:
        """The teacher samples in its tokens; each completion's text comes back as the student's tokens (with no
        log-probs: they are the teacher's, of other tokens; the sequence-level loss does not read them)."""
        examples = list(examples) if examples is not None else [None] * len(prompts)
        t_prompts = [self.teacher_prompt(p, ex) for p, ex in zip(prompts, examples)]
        out = []
        for c in self.inner.generate(t_prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed):
            stopped = c.finish_reason == "stop"
            body = c.completion_ids[:-1] if stopped and c.completion_ids else c.completion_ids
            ids, finish = self.student.completion(utf8(pieces_of(self.t_table, body)), stopped, max_new_tokens)
            out.append(GeneratedCompletion(prompt_index=c.prompt_index, completion_ids=ids, logprobs=[0.0] * len(ids),
                                           finish_reason=finish))
        return out

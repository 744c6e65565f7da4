"""The teachers of a run, each in its mode, and the routing of every sequence to its own teacher.

`open_teachers` starts what `modes.plan_teachers` decided (checked before any engine starts): a teacher of the
student's tokenizer as it is (`factory.open_teacher`), one of another tokenizer behind `SpanTeacher`, a
text-only endpoint behind `TextTeacher`, the `self` teacher as a local teacher over the starting student's
folder. `TeacherSet` holds them by name. It is a `Teacher` itself (the first teacher's answers: what code
that knows one teacher asks), and routes: `score_rollouts` and `generate` take one teacher name per sequence
(its data source's, `data.sources[].teacher`), ask each teacher for its own sequences, and put the answers
back in order. Teachers are never ensembled: each sequence has exactly one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onpolicy.protocols import Teacher
from onpolicy.teacher.fingerprint import CheckResult, assert_compatible, load_tokenizer
from onpolicy.teacher.modes import TeacherPlan
from onpolicy.teacher.retokenize import StudentText
from onpolicy.teacher.scoring import generate, score_rollouts
from onpolicy.types import Example, GeneratedCompletion, Rollout, ScoreRequestItem, TeacherInfo, TeacherScores

if TYPE_CHECKING:
    from onpolicy.config import ResourcesConfig, TeacherConfig


class TeacherSet:
    """Named teachers (`members`, in config order) with their plans; a `Teacher` that answers as the first."""

    def __init__(self, members: dict[str, Teacher], plans: dict[str, TeacherPlan]) -> None:
        if not members:
            raise ValueError("a run needs at least one teacher")
        self.members, self.plans = members, plans
        self.default = next(iter(members))

    def member(self, name: str) -> Teacher:
        if name not in self.members:
            raise KeyError(f"no teacher named {name!r} (the run's teachers: {', '.join(self.members)})")
        return self.members[name]

    @property
    def first(self) -> Teacher:
        return self.members[self.default]

    @property
    def mode(self) -> str:
        """The first teacher's mode (scoring.py asks it: `score_rollouts` here routes by name)."""
        return getattr(self.first, "mode", "token")

    # ---- the Teacher protocol: the first teacher ----------------------------------------------
    def info(self) -> TeacherInfo:
        return self.first.info()

    def max_top_k(self) -> int:
        return self.first.max_top_k()

    def compatibility(self, student_path: str | Path) -> list[CheckResult]:
        return self.first.compatibility(student_path)

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        return self.first.score(items, top_k=top_k)

    def generate(self, prompts: list[list[int]], *, examples: Sequence[Example | None] | None = None,
                 **sample: Any) -> list[GeneratedCompletion]:
        return self.generate_routed(prompts, examples, None, **sample)

    def usage(self) -> dict[str, Any]:
        """One teacher: its counters. Several: each one's, prefixed with its name (`toy_requests`, ...)."""
        if len(self.members) == 1:
            return self.first.usage()
        return {f"{name}_{k}": v for name, t in self.members.items() for k, v in t.usage().items()}

    def close(self) -> None:
        for t in self.members.values():
            t.close()

    # ---- routing -------------------------------------------------------------------------------
    def _groups(self, names: Sequence[str] | None, n: int) -> dict[str, list[int]]:
        names = list(names) if names is not None else [self.default] * n
        if len(names) != n:
            raise ValueError(f"{n} sequences but {len(names)} teacher names")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        for name in groups:
            self.member(name)  # an unknown name fails before anything is asked
        return groups

    def score_rollouts(self, rollouts: list[Rollout], examples: Sequence[Example | None] | None = None,
                       top_k: int | dict[str, int] = 0, names: Sequence[str] | None = None) -> list[TeacherScores]:
        """Each rollout scored by the teacher `names[i]` names (default: the first teacher), with the top-k
        `top_k` gives (one for all, or one per teacher name)."""
        out: list[TeacherScores | None] = [None] * len(rollouts)
        for name, idx in self._groups(names, len(rollouts)).items():
            k = top_k.get(name, 0) if isinstance(top_k, dict) else top_k
            part = score_rollouts(self.members[name], [rollouts[i] for i in idx], top_k=k,
                                  examples=None if examples is None else [examples[i] for i in idx])
            for i, s in zip(idx, part):
                out[i] = s
        return out  # type: ignore[return-value]  # every index was filled

    def generate_routed(self, prompts: list[list[int]], examples: Sequence[Example | None] | None = None,
                        names: Sequence[str] | None = None, **sample: Any) -> list[GeneratedCompletion]:
        """Each prompt's completions sampled by its teacher, grouped by prompt in prompt order (`prompt_index`
        indexes `prompts`)."""
        by_prompt: dict[int, list[GeneratedCompletion]] = {}
        for name, idx in self._groups(names, len(prompts)).items():
            part = generate(self.members[name], [prompts[i] for i in idx],
                            None if examples is None else [examples[i] for i in idx], **sample)
            for c in part:
                by_prompt.setdefault(idx[c.prompt_index], []).append(
                    c.model_copy(update={"prompt_index": idx[c.prompt_index]}))
        return [c for i in range(len(prompts)) for c in by_prompt.get(i, [])]


def open_member(tc: TeacherConfig, plan: TeacherPlan, *, student_path: str, student: StudentText, chat: bool,
                open_one: Callable[..., Teacher], on_state_change: Callable[[str], None] | None = None) -> Teacher:
    """One teacher in its mode. `open_one(tc, student=...)` opens a teacher section (factory.open_teacher with
    the run's resources and callbacks); `on_state_change` hears a text-only endpoint's breaker."""
    if plan.mode == "sequence":
        from onpolicy.teacher.clients.openai_text import OpenAITextClient
        from onpolicy.teacher.factory import endpoint_client_kwargs
        from onpolicy.teacher.text_only import TextTeacher

        client_kw, retry_kw = endpoint_client_kwargs(tc)
        client = OpenAITextClient(tc.url or tc.endpoints()[0], endpoint=tc.endpoint, model=tc.served_name,
                                  price_prompt_per_mtok=tc.price_prompt_per_mtok,
                                  price_completion_per_mtok=tc.price_completion_per_mtok,
                                  on_state_change=on_state_change, **client_kw, **retry_kw)
        return TextTeacher(client, student)
    if plan.mode == "token":
        return open_one(tc, student=student_path)
    from onpolicy.teacher.spans import SpanTeacher

    inner = open_one(tc, student=None)  # another tokenizer: its ids are checked against its own folder below
    try:
        if not plan.local:
            assert_compatible(inner, plan.tokenizer)  # the server serves the tokenizer teacher.tokenizer names
        return SpanTeacher(inner, student, load_tokenizer(plan.tokenizer), chat=chat)
    except BaseException:
        inner.close()
        raise


def open_teachers(teachers: list[TeacherConfig], plans: list[TeacherPlan], *, student_path: str, student_tokenizer: Any,
                  stop_ids: Sequence[int], chat: bool, seed: int = 0, resources: ResourcesConfig | None = None,
                  **open_kw: Any) -> TeacherSet:
    """Every teacher of the run, each in its planned mode; what was opened is closed if one fails."""
    from onpolicy.teacher.factory import open_teacher

    student = StudentText(student_tokenizer, stop_ids, chat=chat)

    def open_one(tc: TeacherConfig, student: str | None) -> Teacher:
        return open_teacher(tc, student=student, seed=seed, resources=resources, **open_kw)

    members: dict[str, Teacher] = {}
    try:
        for tc, plan in zip(teachers, plans):
            members[tc.name] = open_member(tc, plan, student_path=student_path, student=student, chat=chat,
                                           open_one=open_one, on_state_change=open_kw.get("on_state_change"))
    except BaseException:
        for t in members.values():
            t.close()
        raise
    return TeacherSet(members, {p.name: p for p in plans})

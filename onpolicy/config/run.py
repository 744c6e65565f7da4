"""`RunConfig`: everything one distillation run needs, and the checks that span sections."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, model_serializer, model_validator

from onpolicy.config.base import Kinds, Section, path_marker
from onpolicy.config.data import DATA_KINDS, AdditionDataConfig, DataConfig
from onpolicy.config.loss import LOSS_KINDS, LossConfig, ReverseKLLossConfig
from onpolicy.config.sections import (
    CheckpointConfig,
    EvalConfig,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ResourcesConfig,
    RolloutConfig,
    ScheduleConfig,
)
from onpolicy.config.teacher import SELF, TEACHER_KINDS, LocalTeacherConfig, TeacherConfig, TextTeacherConfig

# The sections that are unions by kind, by name.
KINDED: dict[str, Kinds] = {k.section: k for k in (TEACHER_KINDS, LOSS_KINDS, DATA_KINDS)}


class RunConfig(Section):
    """Everything one distillation run needs."""

    name: str = Field("run", min_length=1, max_length=128, description="Human-readable run name.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for prompts, sampling and init.")
    output_dir: str = Field("runs/run", description="Where metrics, checkpoints and the student go.",
                            json_schema_extra=path_marker("output"))
    model: ModelConfig = ModelConfig()
    teacher: TeacherConfig = LocalTeacherConfig()
    teachers: list[TeacherConfig] | None = Field(
        None, min_length=1, max_length=16,
        description="Several named teachers instead of `teacher` (each one a `teacher` section with its `name`; "
        "`{name: self}` is the frozen starting student); data.task=mixture routes each source to one of them.",
    )
    data: DataConfig = AdditionDataConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = ReverseKLLossConfig()
    optim: OptimConfig = OptimConfig()
    learner: LearnerConfig = LearnerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resources: ResourcesConfig = ResourcesConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_serializer(mode="wrap")
    def _without_unused_teacher(self, handler: Any) -> Any:
        """With `teachers`, the `teacher` section is unused: left out, so a dumped config loads back."""
        data = handler(self)
        if self.teachers and isinstance(data, dict):
            data.pop("teacher", None)
        return data

    def teacher_list(self) -> list[TeacherConfig]:
        """The run's teachers: `teachers`, or the one `teacher`."""
        return list(self.teachers) if self.teachers else [self.teacher]

    def threads(self) -> dict[str, int]:
        """`resources.threads` for this run on this machine (rollout / teacher / learner)."""
        return self.resources.threads(os.cpu_count() or 1, self.rollout.num_workers, self.schedule.max_staleness > 0)

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        """A section written without its kind (`teacher: {model: ...}`, as configs did before sections were
        unions) is of the default kind."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "teacher" in data:
            data["teacher"] = _self_named(data["teacher"])
        for name, kinds in KINDED.items():
            section = data.get(name)
            if isinstance(section, dict) and kinds.field not in section:
                data[name] = {kinds.field: kinds.default, **section}
        if isinstance(data.get("teachers"), list):  # each entry is a `teacher` section
            data["teachers"] = [{"kind": TEACHER_KINDS.default, **t} if isinstance(t, dict) else t
                                for t in map(_self_named, data["teachers"])]
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.optim.lr is None:  # after validation lr is always a number
            self.optim.lr = self.loss.default_lr
        self._check_teachers()
        if self.loss.needs_topk and any(t.top_k == 0 for t in self.teacher_list()):
            raise ValueError(f"loss.kind={self.loss.kind} needs the teacher's top-k: set teacher.top_k > 0")
        hidden = getattr(self.loss, "hidden", None)
        if hidden is not None:
            self._check_hidden()
        if self.model.dtype == "float16" and not self.optim.loss_scaling:
            raise ValueError("model.dtype=float16 needs loss scaling (its gradients underflow without it): set "
                             "optim.loss_scaling=true, or use model.dtype=bfloat16")
        return self

    def _check_hidden(self) -> None:
        """loss.hidden needs hidden states only a local transformers teacher returns, and one learner rank."""
        if self.teachers:
            raise ValueError("loss.hidden maps the student's layers onto one teacher's: use one `teacher`, not "
                             "`teachers`, or remove loss.hidden")
        if self.teacher.kind != "local":
            raise ValueError(f"loss.hidden needs the teacher's hidden states, and a remote teacher "
                             f"(teacher.kind={self.teacher.kind}) answers log-probs only: use teacher.kind=local "
                             "with backend hf, or remove loss.hidden")
        if self.teacher.backend != "hf":
            raise ValueError("loss.hidden needs the teacher's hidden states, which vLLM does not return: set "
                             "teacher.backend=hf, or remove loss.hidden")
        if self.learner.num_ranks > 1:
            raise ValueError("loss.hidden trains its projection on one learner rank: set learner.num_ranks=1, "
                             "or remove loss.hidden")

    def _check_teachers(self) -> None:
        """Names unique and `self` only for the frozen student; every source names a teacher of the run; a
        text-only teacher only with a loss that trains on teacher samples (it can score nothing)."""
        if self.teachers and "teacher" in self.model_fields_set:
            raise ValueError("set `teacher` (one teacher) or `teachers` (several, by name), not both")
        teachers = self.teacher_list()
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: each teacher needs its own name (got {names})")
        for t in teachers:
            if (t.name == SELF) != (t.kind == SELF):
                raise ValueError(f"teacher {t.name!r} (kind={t.kind}): the name `self` is kept for the frozen copy of "
                                 "the starting student (kind=self): rename the teacher, or drop its kind and fields")
            if isinstance(t, TextTeacherConfig) and (self.loss.samples != "teacher" or self.loss.needs_topk):
                raise ValueError(
                    f"teacher {t.name!r} (kind=openai) returns text only: it can score neither the student's tokens "
                    f"nor their text, so it cannot teach loss.kind={self.loss.kind}; use loss.kind=sft (sequence-level "
                    "KD on its samples), or a teacher that returns log-probs")
        sources = getattr(self.data, "sources", None)
        if sources is None:
            if len(teachers) > 1:
                raise ValueError(f"{len(teachers)} teachers ({', '.join(names)}) but one prompt source: set "
                                 "data.task=mixture with data.sources naming the teacher of each")
            return
        for src in sources:
            if src.teacher not in names:
                raise ValueError(f"data.sources: source {src.name!r} goes to teacher {src.teacher!r}, which the run "
                                 f"does not have (its teachers: {', '.join(names)}); name one of them")


def _self_named(section: Any) -> Any:
    """A teacher section named `self` without a kind is the frozen starting student (kind=self), and one of kind
    `self` without a name is named `self`."""
    if not isinstance(section, dict):
        return section
    if section.get("name") == SELF and "kind" not in section:
        return {**section, "kind": SELF}
    if section.get("kind") == SELF and "name" not in section:
        return {**section, "name": SELF}
    return section

"""`RunConfig`: everything one distillation run needs, and the checks that span sections."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, model_validator

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
from onpolicy.config.teacher import TEACHER_KINDS, LocalTeacherConfig, TeacherConfig

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
        for name, kinds in KINDED.items():
            section = data.get(name)
            if isinstance(section, dict) and kinds.field not in section:
                data[name] = {kinds.field: kinds.default, **section}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.optim.lr is None:  # after validation lr is always a number
            self.optim.lr = self.loss.default_lr
        if self.loss.needs_topk and self.teacher.top_k == 0:
            raise ValueError(f"loss.kind={self.loss.kind} needs the teacher's top-k: set teacher.top_k > 0")
        if self.model.dtype == "float16" and not self.optim.loss_scaling:
            raise ValueError("model.dtype=float16 needs loss scaling (its gradients underflow without it): set "
                             "optim.loss_scaling=true, or use model.dtype=bfloat16")
        return self

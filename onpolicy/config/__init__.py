"""The run configuration: one pydantic tree, loaded from YAML with `key.sub=value` overrides.

Every field has a docstring (its `description`) and bounds. Unknown fields are errors, so a typo fails
before anything starts, naming the field. The `teacher`, `loss` and `data` sections are unions of
members, one per kind (`teacher.kind`, `loss.kind`, `data.task`), each with only its own fields, so a
field of another kind is an error naming the kinds it belongs to. The resolved config is written next
to every run (`config.yaml` in the run directory).

| module       | what                                                                              |
|--------------|-----------------------------------------------------------------------------------|
| `teacher.py` | local and remote teachers; `REMOTE_DIALECTS`, the one table of remote dialects    |
| `loss.py`    | one member per loss, with its default lr, `needs_topk` and who samples            |
| `data.py`    | one member per prompt source                                                      |
| `sections.py`| the sections of one shape (model, rollout, optim, schedule, eval, resources, ...) |
| `run.py`     | `RunConfig` and its cross-section checks; `KINDED`, the kinded sections by name   |
| `load.py`    | YAML + overrides (the rule for changing a kind), error wording, dump              |
"""

from onpolicy.config.base import Kinds, Section
from onpolicy.config.data import (
    DATA_KINDS,
    AdditionDataConfig,
    DataConfig,
    DatasetDataConfig,
    JsonlDataConfig,
    MixtureDataConfig,
    SourceConfig,
    WorkingDataConfig,
)
from onpolicy.config.load import (
    ConfigError,
    apply_overrides,
    config_error_items,
    config_from_dict,
    drop_inapplicable,
    dump_config,
    load_config,
    parse_override,
)
from onpolicy.config.loss import (
    LOSS_KINDS,
    GKDLossConfig,
    HiddenStateConfig,
    JSDLossConfig,
    LossBase,
    LossConfig,
    ReverseKLLossConfig,
    Samples,
    SFTLossConfig,
    SoftTargetsLossConfig,
    TopKReverseKLLossConfig,
)
from onpolicy.config.run import KINDED, RunConfig
from onpolicy.config.sections import (
    CheckpointConfig,
    EvalConfig,
    LearnerConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ResourcesConfig,
    RetentionProbe,
    RolloutConfig,
    ScheduleConfig,
)
from onpolicy.config.teacher import (
    REMOTE_DIALECTS,
    SELF,
    TEACHER_KINDS,
    Dialect,
    EndpointTeacherBase,
    LocalTeacherConfig,
    ManagedTeacherConfig,
    RemoteTeacherConfig,
    SelfTeacherConfig,
    TeacherConfig,
    TextTeacherConfig,
)

__all__ = [
    "DATA_KINDS", "KINDED", "LOSS_KINDS", "REMOTE_DIALECTS", "SELF", "TEACHER_KINDS", "AdditionDataConfig",
    "CheckpointConfig", "ConfigError", "DataConfig", "DatasetDataConfig", "Dialect", "EndpointTeacherBase",
    "EvalConfig", "GKDLossConfig", "HiddenStateConfig", "JSDLossConfig", "JsonlDataConfig", "Kinds",
    "LearnerConfig", "LocalTeacherConfig", "LoggingConfig", "LoraConfig", "LossBase", "LossConfig",
    "ManagedTeacherConfig", "MixtureDataConfig", "ModelConfig", "OptimConfig", "RemoteTeacherConfig",
    "ResourcesConfig", "RetentionProbe", "ReverseKLLossConfig", "RolloutConfig", "RunConfig", "SFTLossConfig",
    "Samples", "ScheduleConfig", "Section", "SelfTeacherConfig", "SoftTargetsLossConfig", "SourceConfig",
    "TeacherConfig", "TextTeacherConfig", "TopKReverseKLLossConfig", "WorkingDataConfig", "apply_overrides",
    "config_error_items", "config_from_dict", "drop_inapplicable", "dump_config", "load_config",
    "parse_override",
]

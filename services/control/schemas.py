"""Request and response bodies of the control API (the OpenAPI schema at /docs comes from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from onpolicy.config import REMOTE_DIALECTS
from onpolicy.status import RunStatus


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateRun(_Body):
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="A RunConfig as a dict (see configs/). `output_dir` is ignored: the server puts each run "
        "under its runs root.",
    )
    name: str | None = Field(None, min_length=1, max_length=128, description="Overrides config.name.")
    teacher_id: str | None = Field(
        None, max_length=64,
        description="Id of an attached teacher (POST /v1/teachers): fills teacher.kind/url/api_key_env.",
    )


class ResumeRun(_Body):
    steps: int | None = Field(
        None, ge=1, le=10_000_000,
        description="Override schedule.steps for the resumed run (e.g. to finish sooner); default: keep.",
    )


class TeacherRef(BaseModel):
    kind: str
    url: str | None = None
    teacher_id: str | None = None


class StatusChange(BaseModel):
    status: RunStatus
    reason: str | None = None
    step: int
    time: float
    kind: Literal["status", "fault"] = Field(
        "status", description="`status`: the run changed status; `fault`: an actor died and was brought back "
        "(`reason` says which and how; the run's status is unchanged).")


class RunView(BaseModel):
    id: str
    name: str
    status: RunStatus
    reason: str | None = None
    step: int
    steps: int = Field(description="schedule.steps of the run's config.")
    policy_version: int | None = None
    latest_metrics: dict[str, Any] | None = None
    teacher: TeacherRef
    output_dir: str
    created: float
    updated: float
    started: float | None = None
    ended: float | None = None
    observed: float | None = Field(
        None, description="When the control plane last compared this record with the run's files and driver "
        "(Unix time; null: not yet, e.g. right after an API restart). Fields may lag the run by the time since.")
    history: list[StatusChange] | None = None


class RunList(BaseModel):
    runs: list[RunView] = Field(description="Newest first.")
    next: str | None = Field(None, description="Pass as `before` for the next (older) page; null: no more runs.")


class MetricsView(BaseModel):
    run_id: str
    records: list[dict[str, Any]]


class Artifact(BaseModel):
    name: str
    kind: Literal["checkpoint", "student", "config", "metrics", "summary", "status"]
    path: str
    bytes: int
    download: str | None = None


class ArtifactList(BaseModel):
    run_id: str
    artifacts: list[Artifact]


class AttachTeacher(_Body):
    url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://",
                     description="Base URL of the teacher, e.g. http://teacher:8100.")
    kind: Literal[tuple(REMOTE_DIALECTS)] = Field(  # type: ignore[valid-type]  # the config's remote dialects
        "service", description="The endpoint's dialect. " + "; ".join(f"`{k}`: {d.about}" for k, d in REMOTE_DIALECTS.items()))
    api_key_env: str | None = Field(None, min_length=1, max_length=128,
                                    description="Env var (on the API and the cluster) holding its bearer token.")
    student: str | None = Field(None, min_length=1, max_length=4096,
                                description="Student model folder to check the teacher against (tokenizer, EOS). "
                                "Without it only reachability is checked.")


class CheckItemView(BaseModel):
    name: str
    status: str
    message: str


class TeacherView(BaseModel):
    id: str
    url: str
    kind: str
    api_key_env: str | None = None
    student: str | None = None
    ok: bool
    checks: list[CheckItemView]
    report: str
    created: float


class TeacherList(BaseModel):
    teachers: list[TeacherView]


class Problem(BaseModel):
    detail: Any

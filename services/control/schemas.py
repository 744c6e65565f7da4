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


class Replicas(_Body):
    min: int = Field(1, ge=1, le=64, description="Replicas kept when idle.")
    max: int = Field(1, ge=1, le=64, description="Most replicas under load (Serve adds them by ongoing requests).")


class DeployTeacher(_Body):
    """A managed teacher: our scoring service deployed on the cluster's Ray Serve, shared by the runs that name
    it (`teacher_id` in POST /v1/runs, or `teacher: {kind: managed, id: ...}` in a config)."""

    model: str = Field(min_length=1, max_length=4096, description="Teacher model folder (under the models root).")
    backend: Literal["vllm", "hf"] = Field("hf", description="Scoring engine of each replica.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32")
    max_top_k: int = Field(256, ge=1, le=4096, description="Most top-k entries per position a request may ask for.")
    replicas: Replicas = Field(default_factory=Replicas)
    num_cpus: float = Field(1.0, gt=0.0, le=256.0, description="CPUs per replica (Ray resources).")
    num_gpus: float = Field(0.0, ge=0.0, le=16.0, description="GPUs per replica (Ray resources).")
    target_ongoing_requests: float = Field(
        2.0, gt=0.0, le=1024.0, description="Serve autoscaling: ongoing requests per replica it aims for.")
    per_run_in_flight: int = Field(
        8, ge=1, le=1024, description="Most requests one run has in flight on a replica (beyond: 429, retried).")
    upscale_delay_s: float = Field(10.0, ge=0.0, le=3600.0, description="Load held this long before a replica is added.")
    downscale_delay_s: float = Field(60.0, ge=0.0, le=3600.0, description="Idle this long before one is removed.")
    api_key_env: str | None = Field(None, min_length=1, max_length=128,
                                    description="Env var on the cluster's nodes holding the bearer token replicas "
                                    "require (runs name the same one); null: the proxy is cluster-internal.")


class ManagedView(BaseModel):
    status: str = Field(description="Serve's application status: DEPLOYING, RUNNING, UNHEALTHY, DELETING, ...")
    message: str = ""
    replicas: dict[str, int] = Field(description="Replicas by Serve state (RUNNING, STARTING, STOPPING, ...).")
    replicas_min: int
    replicas_max: int
    in_flight: int = Field(description="Requests in the replicas now (as they last reported).")
    queued_sequences: int = Field(description="Sequences waiting for an engine, summed over replicas.")
    runs: dict[str, dict[str, float]] = Field(
        description="Per run (its run id, or host-pid outside the control plane): requests, tokens_scored, "
        "refused (429s of the per-run bound), repeats (answers to a request already counted: a retry after a "
        "replica answered and died), seconds (summed latency), mean_latency_s, max_in_flight, last_seen.")
    spec: dict[str, Any]


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
    managed: ManagedView | None = Field(None, description="Kind `managed` only: replicas, load and usage.")


class TeacherList(BaseModel):
    teachers: list[TeacherView]


class Problem(BaseModel):
    detail: Any

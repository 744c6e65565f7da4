"""The `teacher` section: a local model the run starts itself, a frozen copy of the starting student (`self`),
a remote endpoint in one of the scoring dialects, or a text-only endpoint (`openai`: sequence-level KD).

Each member takes only its own fields (a local teacher: model, backend, dtype, top_k), so
`teacher.url` on a local teacher is an error naming the kinds it belongs to. Every member has a `name`: a run
with several teachers lists them in `teachers:` and routes each data source to one by name (config/run.py).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal, NamedTuple

from pydantic import Field, model_validator

from onpolicy.config.base import Kinds, Section, path_marker


class Dialect(NamedTuple):
    adapter: str  # "module:Class" of its `RemoteTeacher` subclass
    about: str  # what speaks it, for the schema and --help


# The remote dialects: `teacher.kind` -> the adapter that speaks it. A new dialect is its adapter file plus
# one row here; the config, the CLI, the control API and `teacher check` read the kinds from this table. The
# adapter is named by its import path, not imported (as vLLM's model registry does): the config is the
# lowest layer and never imports a client; onpolicy/teacher/factory.py imports it.
REMOTE_DIALECTS: dict[str, Dialect] = {
    "service": Dialect("onpolicy.teacher.clients.service:ServiceTeacher", "our teacher service (services/teacher)"),
    "vllm": Dialect("onpolicy.teacher.clients.vllm_server:VLLMServerTeacher", "an external vLLM OpenAI-compatible server"),
    "sglang": Dialect("onpolicy.teacher.clients.sglang:SGLangTeacher", "an external SGLang server"),
}


SELF = "self"  # the name (and kind) of the teacher that is a frozen copy of the starting student


class _TeacherBase(Section):
    name: str = Field(
        "teacher", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
        description="The teacher's name: data sources name the teacher they go to (data.sources[].teacher), and "
        "metrics of a run with several teachers carry it. `self` is the frozen copy of the starting student.",
    )
    top_k: int = Field(
        0, ge=0, le=4096, description="Ask the teacher for its k most likely tokens per position (0: none)."
    )

    def endpoints(self) -> list[str]:
        """The remote teacher's URLs: its replicas, or the one URL (empty for a local teacher)."""
        return []


class LocalTeacherConfig(_TeacherBase):
    """A teacher model the run loads itself, in a Ray actor beside the student's engines."""

    kind: Literal["local"] = Field("local", description="`local`: an in-process model owned by the run.")
    model: str = Field("toy/teacher", description="Teacher model folder (weights + tokenizer).",
                       json_schema_extra=path_marker("models"))
    backend: Literal["vllm", "hf"] = Field(
        "hf",
        description="Local scoring engine. `hf`: one transformers forward over prompt + completion, log-probs and "
        "top-k taken from the logits (measured 2x faster than vLLM here); `vllm`: vLLM's prompt_logprobs (a "
        "Python dict per position, prompt positions included).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Teacher dtype.")


class SelfTeacherConfig(_TeacherBase):
    """A frozen copy of the student as the run starts (`model.student`), loaded like a local teacher: it keeps
    what the student knew on the prompts routed to it while other teachers teach the rest (Thinking Machines'
    continual-learning recipe)."""

    kind: Literal["self"] = Field("self", description="`self`: a frozen copy of the starting student.")
    backend: Literal["vllm", "hf"] = Field("hf", description="Local scoring engine (as for teacher.kind=local).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Teacher dtype.")


class EndpointTeacherBase(_TeacherBase):
    """A teacher behind HTTP: one URL, or the replicas of one teacher, reached through a robust client
    (retries with backoff, a circuit breaker, a bound on requests in flight)."""

    url: str | None = Field(None, description="Base URL of the teacher, e.g. http://teacher:8000.")
    urls: list[str] | None = Field(
        None, min_length=1, max_length=64,
        description="Base URLs of several replicas of one remote teacher (instead of `url`): each request goes to "
        "the replica with the fewest in flight; a replica that fails is skipped while the others serve.",
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable that holds the teacher's bearer token "
        "(the key itself is never stored in the config).",
    )
    connect_to: dict[str, str] | None = Field(
        None, max_length=64,
        description="Host name -> IP address to connect to instead of resolving the name (the Host header and TLS "
        "name stay the URL's). The control API sets it to the address it vetted, so a name that resolves "
        "elsewhere later is not followed; null: resolve as usual.",
    )
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="Per-request timeout.")
    max_retries: int = Field(
        4, ge=0, le=100, description="Retries of a failed request (connection errors, timeouts, 5xx, 429); "
        "once spent, the teacher counts as down: the run is degraded and waits up to max_wait_s."
    )
    backoff_base_s: float = Field(
        0.5, gt=0.0, le=60.0, description="First retry waits up to this; the cap doubles each retry (full jitter)."
    )
    backoff_max_s: float = Field(30.0, gt=0.0, le=600.0, description="Longest wait between two retries.")
    max_in_flight: int = Field(4, ge=1, le=1024, description="Most requests in flight to the teacher.")
    breaker_failures: int = Field(
        5, ge=1, le=1000, description="Consecutive failed requests that open the circuit breaker (degraded)."
    )
    breaker_cooldown_s: float = Field(
        5.0, gt=0.0, le=3600.0, description="While the breaker is open, probe the teacher this often."
    )
    max_wait_s: float = Field(
        600.0, gt=0.0, le=86400.0,
        description="How long a call waits for an unavailable teacher (breaker open) before the run fails.",
    )

    @model_validator(mode="after")
    def _check_urls(self) -> EndpointTeacherBase:
        if not self.url and not self.urls:
            raise ValueError(f"teacher.url (or teacher.urls) is required when teacher.kind={self.kind}")
        if self.urls and self.url:
            raise ValueError("set teacher.url (one teacher) or teacher.urls (replicas of one teacher), not both")
        for where, url in [("teacher.url", self.url)] + [(f"teacher.urls[{i}]", u) for i, u in enumerate(self.urls or [])]:
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"{where} must start with http:// or https:// (got {url!r})")
        if self.urls and len(set(self.urls)) != len(self.urls):
            raise ValueError("teacher.urls lists a replica twice")
        for host, address in (self.connect_to or {}).items():
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"teacher.connect_to.{host} must be an IP address (got {address!r})") from None
        return self

    def endpoints(self) -> list[str]:
        return list(self.urls) if self.urls else ([self.url] if self.url else [])


class RemoteTeacherConfig(EndpointTeacherBase):
    """An endpoint that scores token ids (per-token log-probs, top-k) and samples, in one of the dialects."""

    kind: Literal[tuple(REMOTE_DIALECTS)] = Field(  # type: ignore[valid-type]  # the dialects above
        description="The endpoint's dialect. " + "; ".join(f"`{k}`: {d.about}" for k, d in REMOTE_DIALECTS.items()),
    )
    tokenizer: str | None = Field(
        None,
        description="A folder holding the teacher's own tokenizer (tokenizer.json and its config), when it is not "
        "the student's: the run then re-tokenizes each completion's text with it and distills span-aligned "
        "(docs/teachers.md). null: the teacher must use the student's tokenizer (checked when reached).",
        json_schema_extra=path_marker("models"),
    )
    wire_format: Literal["binary", "compact", "json"] = Field(
        "binary", description="kind=service only: how scores travel. `binary`: little-endian arrays, exact; "
        "`compact`: the top-k as 3-byte ids and float16 log-probs (5 bytes a pair instead of 8; a log-prob comes "
        "back within 2**-11 of its size; the sampled tokens' log-probs stay float32); `json`: JSON.",
    )

    @model_validator(mode="after")
    def _wire_format_is_the_services(self) -> RemoteTeacherConfig:
        if self.wire_format != "binary" and self.kind != "service":
            raise ValueError(f"teacher.wire_format={self.wire_format} is for teacher.kind=service (our teacher "
                             f"service); a {self.kind} server answers JSON: remove teacher.wire_format")
        return self


class TextTeacherConfig(EndpointTeacherBase):
    """An OpenAI-compatible endpoint that only returns text (a hosted model): it teaches by sequence-level KD,
    cross-entropy on its samples re-tokenized for the student (loss.kind=sft)."""

    kind: Literal["openai"] = Field(
        "openai", description="`openai`: an OpenAI-compatible /v1/chat/completions or /v1/completions endpoint "
        "that returns text only (sequence-level KD)."
    )
    endpoint: Literal["chat", "completions"] = Field(
        "chat",
        description="`chat`: POST /v1/chat/completions with the prompt as messages (a plain-text prompt is one user "
        "turn); `completions`: POST /v1/completions with the prompt text (plain-text data only).",
    )
    served_name: str | None = Field(
        None, max_length=256, description="The `model` of each request (null: the first of GET /v1/models)."
    )
    price_prompt_per_mtok: float | None = Field(
        None, ge=0.0, le=1e6, description="Price of a million prompt tokens, for the run's cost (null: not counted)."
    )
    price_completion_per_mtok: float | None = Field(
        None, ge=0.0, le=1e6, description="Price of a million completion tokens, for the run's cost."
    )

    @model_validator(mode="after")
    def _no_top_k(self) -> TextTeacherConfig:
        if self.top_k:
            raise ValueError("teacher.top_k: a text-only teacher (teacher.kind=openai) returns no log-probs: set "
                             "teacher.top_k=0 and loss.kind=sft")
        return self


class ManagedTeacherConfig(_TeacherBase):
    """A managed teacher: our scoring service deployed on the cluster's Ray Serve (`POST /v1/teachers`) and
    shared by the runs that name it; reached through Serve's HTTP proxy with the remote client's retries."""

    kind: Literal["managed"] = Field("managed", description="`managed`: a teacher deployed with POST /v1/teachers.")
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                    description="The managed teacher's id (GET /v1/teachers lists them).")
    serve_url: str | None = Field(
        None, pattern=r"^https?://",
        description="Base URL of the cluster's Serve HTTP proxy (null: $ONPOLICY_SERVE_URL, else "
        "http://127.0.0.1:8000, the proxy every node runs). The control API sets its own for REST runs.",
    )
    run_tag: str | None = Field(
        None, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
        description="The name this run's usage and in-flight bound go under (null: host and process id). The "
        "control API sets the run id.",
    )
    api_key_env: str | None = Field(None, description="Environment variable holding the teacher's bearer token.")
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="Per-request timeout.")
    max_retries: int = Field(
        8, ge=0, le=100, description="Retries of a failed request (a replica lost mid-request, 429, 5xx).")
    max_in_flight: int = Field(4, ge=1, le=1024, description="Most requests this run has in flight.")
    max_wait_s: float = Field(600.0, gt=0.0, le=86400.0,
                              description="How long a call waits for an unavailable teacher before the run fails.")


TeacherConfig = Annotated[LocalTeacherConfig | RemoteTeacherConfig | ManagedTeacherConfig | TextTeacherConfig
                          | SelfTeacherConfig, Field(discriminator="kind")]
TEACHER_KINDS = Kinds.of("teacher", TeacherConfig, default="local")

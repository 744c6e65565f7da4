"""The `teacher` section: a local model the run starts itself, or a remote endpoint in one of the dialects.

Each member takes only its own fields (a local teacher: model, backend, dtype, top_k), so
`teacher.url` on a local teacher is an error naming the kinds it belongs to.
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


class _TeacherBase(Section):
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


class RemoteTeacherConfig(_TeacherBase):
    """A teacher behind HTTP: one URL, or the replicas of one teacher, reached through a robust client
    (retries with backoff, a circuit breaker, a bound on requests in flight)."""

    kind: Literal[tuple(REMOTE_DIALECTS)] = Field(  # type: ignore[valid-type]  # the dialects above
        description="The endpoint's dialect. " + "; ".join(f"`{k}`: {d.about}" for k, d in REMOTE_DIALECTS.items()),
    )
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
    def _check_urls(self) -> RemoteTeacherConfig:
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


TeacherConfig = Annotated[LocalTeacherConfig | RemoteTeacherConfig, Field(discriminator="kind")]
TEACHER_KINDS = Kinds.of("teacher", TeacherConfig, default="local")

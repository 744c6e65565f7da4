"""Typed contracts between the parts of onpolicy.

One module that every process imports (rollout workers, teacher, learner, driver, and later
the HTTP services), so the shapes cannot drift apart. Pydantic models are used for anything
that crosses a process or network boundary; they pickle cleanly through Ray.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class Example:
    """One prompt of a data set, with the completion text exact match expects (no EOS; may be empty).

    A chat example carries its conversation in `messages` ((role, content) pairs, ending before the
    assistant's turn); it is rendered with the student's chat template (`onpolicy.prompts.encode_prompts`)
    and `prompt` is then its last user turn, for messages only. `answer` None: nothing to check."""

    prompt: str
    answer: str | None
    messages: tuple[tuple[str, str], ...] | None = None
    where: str = field(default="", compare=False)  # its source and index (file:line, row), for error messages


class Rollout(BaseModel):
    """One sampled completion, as produced by a rollout worker.

    `sampler_logprobs[t]` is log q(completion_ids[t] | prompt, completion[:t]) under the
    weights the worker served (`policy_version`).
    """

    model_config = ConfigDict(frozen=True)

    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    policy_version: int = Field(ge=0)
    finish_reason: Literal["stop", "length"] = "stop"
    prompt_index: int = Field(default=-1, description="Index of the prompt in the step's batch.")
    source: Literal["student", "teacher"] = Field(
        default="student",
        description="Who sampled it: the student (on-policy) or the teacher (sft, soft targets, GKD's teacher "
        "batches; then `sampler_logprobs` are the teacher's and `policy_version` the learner's when drawn).",
    )

    @model_validator(mode="after")
    def _lengths_match(self) -> Rollout:
        if len(self.completion_ids) != len(self.sampler_logprobs):
            raise ValueError(
                f"completion has {len(self.completion_ids)} tokens but "
                f"{len(self.sampler_logprobs)} sampler log-probs"
            )
        return self


class RolloutBatch(BaseModel):
    """What a rollout worker returns for one generate call: the rollouts, the policy version they were
    sampled from, and how long the engine worked on them (its busy time, not the caller's wait)."""

    rollouts: list[Rollout]
    policy_version: int = Field(ge=0)
    seconds: float = Field(ge=0.0)


class ScoreRequestItem(BaseModel):
    """A token sequence to score: the teacher returns log-probs of `completion_ids` only."""

    prompt_ids: list[int] = Field(min_length=1)
    completion_ids: list[int]


class TeacherScores(BaseModel):
    """The teacher's view of one completion.

    `logprobs[t]` = log p_T(completion_ids[t] | prompt, completion[:t]).
    `top_k[t]` (optional) = the teacher's k most likely next tokens at position t as
    (token_id, logprob) pairs, most likely first.
    """

    logprobs: list[float]
    top_k: list[list[tuple[int, float]]] | None = None


def rank_top_k(pairs: Iterable[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """The k most likely (token_id, logprob) pairs, most likely first; ties: lower token id first.

    The one ordering every teacher (local, service, vLLM, SGLang) returns, so top-k lists from
    different engines compare position by position."""
    return sorted(((int(i), float(v)) for i, v in pairs), key=lambda p: (-p[1], p[0]))[:k]


def check_top_k(top_k: int, max_top_k: int, who: str = "this teacher") -> None:
    """ValueError unless 0 <= top_k <= max_top_k (the message names both and the fix)."""
    if not 0 <= top_k <= max_top_k:
        raise ValueError(
            f"top_k={top_k} is out of range: {who} returns at most max_top_k={max_top_k} entries per "
            f"position; lower teacher.top_k to {max_top_k} or serve a teacher that allows more"
        )


class ScoreRequest(BaseModel):
    """Body of `POST /v1/score` on the teacher service."""

    sequences: list[ScoreRequestItem] = Field(min_length=1)
    top_k: int = Field(default=0, ge=0, description="Also return the k most likely tokens.")


class ScoreUsage(BaseModel):
    tokens_scored: int = 0


class ScoreResponse(BaseModel):
    scores: list[TeacherScores]
    model: str
    usage: ScoreUsage = ScoreUsage()


class GenerateRequest(BaseModel):
    """Body of `POST /v1/generate` on the teacher service: the teacher samples completions of token-id
    prompts (the off-policy methods: sequence-level KD, soft targets, GKD's teacher-sampled batches)."""

    prompts: list[list[int]] = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=64, description="Completions per prompt.")
    max_new_tokens: int = Field(ge=1, le=32768)
    temperature: float = Field(default=1.0, ge=0.0, le=4.0, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, description="Fixes the samples (per prompt, derived).")


class GeneratedCompletion(BaseModel):
    """One completion the teacher sampled: `logprobs[t]` is the teacher's raw (untempered) log-prob of
    `completion_ids[t]`; it ends on EOS (`stop`, the EOS id included) or at the cap (`length`)."""

    prompt_index: int = Field(ge=0)
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"] = "stop"


class GenerateUsage(BaseModel):
    prompt_tokens: int = 0
    tokens_generated: int = 0


class GenerateResponse(BaseModel):
    completions: list[GeneratedCompletion]
    model: str
    usage: GenerateUsage = GenerateUsage()


class TeacherInfo(BaseModel):
    """What a teacher says about itself (`GET /v1/info`); checked against the student."""

    model: str
    vocab_size: int
    tokenizer_fingerprint: str
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    max_top_k: int
    max_model_len: int | None = Field(
        default=None, description="Longest sequence (prompt + completion) the teacher scores; None: not published."
    )


class WeightUpdate(BaseModel):
    """A versioned snapshot of the student's weights, as published by the learner.

    `tensors` is a list of (parameter name in Hugging Face naming, CPU tensor). It travels
    through the Ray object store, so it is put once and read by every worker. With
    `adapter_config` (PEFT's adapter_config.json) it is a LoRA adapter in PEFT's naming instead,
    which the engines serve on top of their base weights.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    version: int = Field(ge=0)
    tensors: list[tuple[str, object]]
    adapter_config: dict[str, Any] | None = None

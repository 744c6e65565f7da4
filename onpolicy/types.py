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


class TopK:
    """The teacher's top-k at each of a completion's C positions as two arrays: `ids` [C, k] int32 and `logprobs`
    [C, k] float32 (numpy), most likely first: the in-memory form every teacher returns, whatever the wire
    (JSON rows, our binary format, a dialect's own JSON: converted once, at the edge, by `from_rows`).

    It reads as the list form too: `len`, iteration and `[t]` give lists of (token_id, logprob) pairs, and
    it equals those lists (their log-probs rounded to float32, as held), so code written against rows keeps
    working. A row shorter than k (a teacher that
    returned fewer) is padded with id -1 and log-prob -inf, which the row views leave out."""

    __slots__ = ("ids", "logprobs")

    def __init__(self, ids: Any, logprobs: Any) -> None:
        import numpy as np

        self.ids = np.ascontiguousarray(ids, dtype="<i4")
        self.logprobs = np.ascontiguousarray(logprobs, dtype="<f4")
        if self.ids.ndim != 2 or self.ids.shape != self.logprobs.shape:
            raise ValueError(f"top-k ids {self.ids.shape} and log-probs {self.logprobs.shape} must be two arrays "
                             "of one shape [positions, k]")

    @classmethod
    def from_rows(cls, rows: Iterable[Iterable[tuple[int, float]]]) -> TopK:
        """From (token_id, logprob) rows, padding short rows (ValueError on anything but pairs of numbers)."""
        import numpy as np

        rows = [list(r) for r in rows]
        k = max((len(r) for r in rows), default=0)
        if all(len(r) == k for r in rows) and k:
            pairs = np.asarray(rows, dtype=np.float64)
            if pairs.shape != (len(rows), k, 2):
                raise ValueError(f"top-k rows must hold (token_id, logprob) pairs, got an array of shape {pairs.shape}")
            ids = pairs[..., 0]
            if not np.array_equal(ids, np.round(ids)) or (ids.size and np.abs(ids).max() >= 2**31):
                raise ValueError("top-k token ids must be integers below 2**31")
            return cls(ids.astype(np.int64), pairs[..., 1])
        ids = np.full((len(rows), k), -1, dtype=np.int64)
        lps = np.full((len(rows), k), -np.inf, dtype=np.float64)
        for t, row in enumerate(rows):
            for j, pair in enumerate(row):
                tok, lp = pair
                if (isinstance(tok, float) and not tok.is_integer()) or abs(int(tok)) >= 2**31:
                    raise ValueError("top-k token ids must be integers below 2**31")
                ids[t, j], lps[t, j] = int(tok), float(lp)
        return cls(ids, lps)

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def rows(self) -> list[list[tuple[int, float]]]:
        ids, lps = self.ids.tolist(), self.logprobs.tolist()
        if self.ids.size and self.ids.min() >= 0:  # no padding: the common case, without a test per entry
            return [list(zip(i, v)) for i, v in zip(ids, lps)]
        return [[(i, v) for i, v in zip(row_ids, row_lps) if i >= 0] for row_ids, row_lps in zip(ids, lps)]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, t: int | slice) -> list[tuple[int, float]] | TopK:
        if isinstance(t, slice):
            return TopK(self.ids[t], self.logprobs[t])
        return [(i, v) for i, v in zip(self.ids[t].tolist(), self.logprobs[t].tolist()) if i >= 0]

    def __iter__(self):
        return iter(self.rows())

    def __eq__(self, other: object) -> bool:
        import numpy as np

        if isinstance(other, TopK):  # the same rows (arrays of other widths can hold them: padding)
            if self.ids.shape == other.ids.shape:
                return np.array_equal(self.ids, other.ids) and np.array_equal(self.logprobs, other.logprobs)
            return self.rows() == other.rows()
        if isinstance(other, list):  # rows equal it when they round to what it holds (float32 log-probs)
            return self.rows() == [[(int(i), float(np.float32(v))) for i, v in row] for row in other]
        return NotImplemented

    __hash__ = None  # mutable arrays

    def __repr__(self) -> str:
        return f"TopK(positions={len(self)}, k={self.k})"

    def __getstate__(self) -> tuple:
        return self.ids, self.logprobs

    def __setstate__(self, state: tuple) -> None:
        self.ids, self.logprobs = state

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        def coerce(value: Any) -> TopK:
            if isinstance(value, TopK):
                return value
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):  # pydantic wants ValueError
                raise ValueError(  # noqa: TRY004
                    f"top_k must be a list of rows of [token_id, logprob] pairs, got {type(value).__name__}")
            try:
                return cls.from_rows(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"top_k: {err}") from None

        return core_schema.no_info_plain_validator_function(
            coerce, serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.rows()))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        pair = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "number"}], "minItems": 2,
                "maxItems": 2}
        return {"type": "array", "items": {"type": "array", "items": pair},
                "description": "Per completion token, the teacher's k most likely (token_id, logprob), most likely first."}


class TeacherScores(BaseModel):
    """The teacher's view of one completion.

    `logprobs[t]` = log p_T(completion_ids[t] | prompt, completion[:t]).
    `top_k[t]` (optional) = the teacher's k most likely next tokens at position t as
    (token_id, logprob) pairs, most likely first (held as arrays: `TopK`).
    `hidden[t][l]` (optional, local teachers asked for `loss.hidden`) = the teacher's residual stream after
    the l-th requested decoder layer, at the position that predicts completion token t.
    """

    logprobs: list[float]
    top_k: TopK | None = None
    hidden: list[list[list[float]]] | None = None


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


# ---- the binary form of a ScoreResponse (`Accept: application/x-onpolicy-scores`) --------------------------
#
#   b"OPS1" | uint32 n | float32 logprobs [N] | top-k ids [N, k] | top-k log-probs [N, k] |
#   n bytes of JSON {"lengths": [C_i], "k": k, "top_k": bool, "topk_form": "exact" | "compact", "model": ...,
#                    "usage": {...}}
#
# little-endian; N = sum C_i ("top_k": whether the scores carry top-k: k may be 0 when every completion is empty).
# The top-k comes in one of two forms, named in the trailer:
#   exact (the default): int32 ids, float32 log-probs: 8 bytes a pair, the engine's numbers bit for bit.
#   compact (`Accept: application/x-onpolicy-scores; topk=compact`): ids as 3-byte unsigned integers (vocabularies
#       under 2**24 - 1; 0xFFFFFF marks a padded slot, read back as -1), log-probs as float16: 5 bytes a pair.
#       float16 keeps 11 significant bits: a log-prob of -10 comes back within 0.004, one of -1 within 0.0005
#       (relative error <= 2**-11); below -65504 it reads -inf. Lossy, so opt-in: the per-token log-probs of the
#       sampled tokens (what the sampled losses use) stay float32 in both forms.
# The arrays start at byte 8; the JSON that describes them comes last, `usage` at its very end, where a proxy
# that reads a JSON answer's usage from its tail finds it too. JSON stays the default; a client that asks for
# this and gets JSON (an older server) reads that. Bytes and encode + decode time against JSON:
# docs/long_sequences.md.
SCORES_MEDIA_TYPE = "application/x-onpolicy-scores"
_SCORES_MAGIC = b"OPS1"
TopKForm = Literal["exact", "compact"]
_ID_PAD = 0xFFFFFF  # a padded slot in the compact form's 3-byte ids


def binary_scores_form(accept: str | None) -> TopKForm | None:
    """The binary form an `Accept` header asks for (`topk=compact` or, by default, exact), None if it does not
    list the binary scores type with q > 0."""
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() != SCORES_MEDIA_TYPE:
            continue
        named = {k.strip().lower(): v.strip() for k, _, v in (p.partition("=") for p in params)}
        try:
            if float(named.get("q", "1")) <= 0:
                return None
        except ValueError:
            return None
        return "compact" if named.get("topk", "").lower() == "compact" else "exact"
    return None


def accepts_binary_scores(accept: str | None) -> bool:
    """Whether an `Accept` header lists the binary scores type (with q > 0)."""
    return binary_scores_form(accept) is not None


def encode_scores(resp: ScoreResponse, form: TopKForm = "exact") -> bytes:
    """`resp` in the binary form above (ValueError for what it cannot carry: hidden states, top-k on only
    some sequences, an id the compact form cannot hold)."""
    import json

    import numpy as np

    scores = resp.scores
    with_top = [s.top_k is not None for s in scores]
    if any(with_top) and not all(with_top):
        raise ValueError("binary scores carry top-k for every sequence or none")
    if any(s.hidden is not None for s in scores):
        raise ValueError("binary scores do not carry hidden states (ask for JSON)")
    k = max((s.top_k.k for s in scores if s.top_k is not None), default=0)
    tail = json.dumps({"lengths": [len(s.logprobs) for s in scores], "k": k, "top_k": bool(scores) and all(with_top),
                       "topk_form": form, "model": resp.model, "usage": resp.usage.model_dump()}).encode()
    parts = [_SCORES_MAGIC, len(tail).to_bytes(4, "little"),
             np.asarray([v for s in scores for v in s.logprobs], dtype="<f4").tobytes()]
    if k:
        tops = [s.top_k if s.top_k.k == k else _widen(s.top_k, k) for s in scores]
        if form == "compact":
            ids = np.concatenate([t.ids for t in tops])
            lps = np.concatenate([t.logprobs for t in tops])
            if ids.size and (ids.max() >= _ID_PAD or ids.min() < -1):
                raise ValueError(f"the compact top-k holds ids in [0, {_ID_PAD}): got {int(ids.max())} (ask for "
                                 "the exact form)")
            packed = np.where(ids < 0, _ID_PAD, ids).astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
            parts.extend([packed.tobytes(), lps.astype("<f2").tobytes()])
        else:  # TopK holds <i4 ids and <f4 log-probs: their bytes as they are
            parts.extend(t.ids.tobytes() for t in tops)
            parts.extend(t.logprobs.tobytes() for t in tops)
    parts.append(tail)
    return b"".join(parts)


def _widen(top: TopK, k: int) -> TopK:
    import numpy as np

    pad = ((0, 0), (0, k - top.k))
    return TopK(np.pad(top.ids, pad, constant_values=-1), np.pad(top.logprobs, pad, constant_values=-np.inf))


def decode_scores(body: bytes) -> ScoreResponse:
    """The `ScoreResponse` in a binary body; ValueError saying what is malformed. Values are not checked
    here: `teacher.validate.validate_scores` checks them as it checks JSON answers."""
    import json

    import numpy as np

    if len(body) < 8 or body[:4] != _SCORES_MAGIC:
        raise ValueError(f"not an {SCORES_MEDIA_TYPE} body (starts {body[:4]!r}, expected {_SCORES_MAGIC!r})")
    n = int.from_bytes(body[4:8], "little")
    try:
        tail = json.loads(body[len(body) - n :] if 0 < n <= len(body) - 8 else b"")
        lengths, k, has_top = [int(c) for c in tail["lengths"]], int(tail["k"]), bool(tail.get("top_k", False))
        model, usage = str(tail["model"]), ScoreUsage.model_validate(tail.get("usage", {}))
        form = tail.get("topk_form", "exact")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"binary scores: unreadable trailer ({err})") from None
    if k < 0 or any(c < 0 for c in lengths) or form not in ("exact", "compact"):
        raise ValueError(f"binary scores: negative k ({k}) or sequence length, or an unknown topk_form ({form!r}) "
                         "in the trailer")
    total = sum(lengths)
    pair = 5 if form == "compact" else 8  # bytes of one (id, log-prob)
    expected = 8 + 4 * total + pair * total * k + n
    if len(body) != expected:
        raise ValueError(f"binary scores: {len(body)} bytes, expected {expected} for {total} tokens at k={k} "
                         f"({form} top-k)")
    logprobs = np.frombuffer(body, dtype="<f4", count=total, offset=8).tolist()
    if k:  # copies: the arrays outlive the body, and torch wants writable memory
        at_ids = 8 + 4 * total
        if form == "compact":
            wide = np.zeros((total * k, 4), dtype=np.uint8)  # 3 bytes -> a little-endian uint32
            wide[:, :3] = np.frombuffer(body, dtype=np.uint8, count=3 * total * k, offset=at_ids).reshape(-1, 3)
            ids = wide.view("<u4").reshape(total, k).astype("<i4")
            ids[ids == _ID_PAD] = -1
            lps = np.frombuffer(body, dtype="<f2", count=total * k, offset=at_ids + 3 * total * k)
            lps = lps.astype(np.float32).reshape(total, k)
        else:
            ids = np.frombuffer(body, dtype="<i4", count=total * k, offset=at_ids).reshape(total, k).copy()
            lps = np.frombuffer(body, dtype="<f4", count=total * k, offset=at_ids + 4 * total * k).reshape(total, k)
            lps = lps.copy()
    scores, at = [], 0
    for c in lengths:
        top = (TopK(ids[at : at + c], lps[at : at + c]) if k else TopK(np.zeros((c, 0)), np.zeros((c, 0)))) if has_top else None
        scores.append(TeacherScores.model_construct(logprobs=logprobs[at : at + c], top_k=top))
        at += c
    return ScoreResponse.model_construct(scores=scores, model=model, usage=usage)


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

"""Remote teachers behind the `Teacher` protocol: our service, external vLLM, external SGLang.

Each adapter turns a list of `ScoreRequestItem` into the dialect's request, sends it through
`RobustClient` (retries, breaker, bounded concurrency), and *validates* the answer before any
number reaches the loss: one finite log-prob per completion token, the echoed ids equal to what
was sent (where the dialect echoes them), top-k present when asked. A violation raises
`TeacherResponseError` naming the teacher and exactly what was wrong, because a silently
misaligned log-prob trains the student on garbage.

`make_teacher_client(cfg)` builds the adapter a `TeacherConfig` asks for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from onpolicy.teacher.http import BreakerState, RobustClient, TeacherResponseError
from onpolicy.types import ScoreRequest, ScoreRequestItem, ScoreResponse, TeacherInfo, TeacherScores

# A log-prob a little above 0 is float noise; far above it is a bug (a logit, a probability).
_LOGPROB_SLACK = 1e-3


def _where(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(body)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def validate_scores(
    source: str,
    items: Sequence[ScoreRequestItem],
    scores: Sequence[TeacherScores],
    top_k: int,
    offset: int = 0,
) -> None:
    """Raise `TeacherResponseError` unless `scores` fit `items` (lengths, finiteness, top-k).

    `offset` is added to sequence numbers in messages (the index of this chunk's first item).
    """
    if len(scores) != len(items):
        raise TeacherResponseError(f"{source}: sent {len(items)} sequences, got {len(scores)} scores back")
    for i, (item, sc) in enumerate(zip(items, scores)):
        n, seq = len(item.completion_ids), offset + i
        if len(sc.logprobs) != n:
            raise TeacherResponseError(
                f"{source}: sequence {seq}: expected {n} log-probs, got {len(sc.logprobs)}"
            )
        for t, v in enumerate(sc.logprobs):
            if not math.isfinite(v) or v > _LOGPROB_SLACK:
                raise TeacherResponseError(
                    f"{source}: sequence {seq}, token {t}: log-prob is {v} (must be finite and <= 0)"
                )
        if top_k:
            if sc.top_k is None:
                raise TeacherResponseError(f"{source}: sequence {seq}: asked for top-{top_k}, got no top_k")
            if len(sc.top_k) != n:
                raise TeacherResponseError(
                    f"{source}: sequence {seq}: expected top-k for {n} positions, got {len(sc.top_k)}"
                )
            for t, row in enumerate(sc.top_k):
                if len(row) != top_k:
                    raise TeacherResponseError(
                        f"{source}: sequence {seq}, position {t}: expected {top_k} top-k entries, got {len(row)}"
                    )
                if any(not math.isfinite(v) or v > _LOGPROB_SLACK for _, v in row):
                    raise TeacherResponseError(
                        f"{source}: sequence {seq}, position {t}: top-k has a non-finite or positive log-prob"
                    )


class RemoteTeacher:
    """Shared plumbing: a `RobustClient`, chunking, usage. Subclasses implement `_score_chunk`."""

    kind = "remote"

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        batch_size: int = 64,
        on_state_change: Callable[[BreakerState], None] | None = None,
        **client_kw: Any,
    ) -> None:
        self.url = url.rstrip("/")
        self.batch_size = batch_size
        self.client = RobustClient(
            self.url, api_key=api_key, timeout_s=timeout_s, on_state_change=on_state_change, **client_kw
        )
        self._max_in_flight = client_kw.get("max_in_flight", 4)
        self._info: TeacherInfo | None = None

    @property
    def source(self) -> str:
        return f"{self.kind} teacher at {self.url}"

    @property
    def state(self) -> BreakerState:
        return self.client.state

    def usage(self) -> dict[str, Any]:
        return self.client.snapshot()

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bad(self, what: str) -> TeacherResponseError:
        return TeacherResponseError(f"{self.source}: {what}")

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        if not items:
            return []
        chunks = [(s, items[s : s + self.batch_size]) for s in range(0, len(items), self.batch_size)]

        def run(chunk: tuple[int, list[ScoreRequestItem]]) -> list[TeacherScores]:
            start, part = chunk
            out = self._score_chunk(part, top_k, start)
            validate_scores(self.source, part, out, top_k, offset=start)
            self.client.usage.add(tokens_scored=sum(len(it.completion_ids) for it in part))
            return out

        if len(chunks) == 1:
            return run(chunks[0])
        with ThreadPoolExecutor(max_workers=min(len(chunks), self._max_in_flight)) as pool:
            return [s for part in pool.map(run, chunks) for s in part]

    def _score_chunk(self, items: list[ScoreRequestItem], top_k: int, offset: int) -> list[TeacherScores]:
        raise NotImplementedError


class ServiceTeacher(RemoteTeacher):
    """Our teacher service (`services/teacher`): `POST /v1/score`, `GET /v1/info`."""

    kind = "service"

    def info(self) -> TeacherInfo:
        if self._info is None:
            body = self.client.get_json("/v1/info")
            try:
                self._info = TeacherInfo.model_validate(body)
            except ValidationError as err:
                raise self._bad(f"GET /v1/info returned a malformed TeacherInfo ({_where(err)})") from None
        return self._info

    def _score_chunk(self, items: list[ScoreRequestItem], top_k: int, offset: int) -> list[TeacherScores]:
        req = ScoreRequest(sequences=items, top_k=top_k)
        body = self.client.post_json("/v1/score", req.model_dump(mode="json"))
        try:
            resp = ScoreResponse.model_validate(body)
        except ValidationError as err:
            raise self._bad(f"POST /v1/score returned a malformed ScoreResponse ({_where(err)})") from None
        return resp.scores


class SGLangTeacher(RemoteTeacher):
    """An SGLang server: `POST /generate` with `input_ids`, `return_logprob`, `logprob_start_len`.

    With `logprob_start_len = len(prompt)`, `meta_info.input_token_logprobs` holds one
    `[logprob, token_id, text|null]` per completion token (position start..end of the input),
    and `meta_info.input_top_logprobs` one list of such triples per position. SGLang exposes no
    tokenizer fingerprint, so `info()` reports what `GET /get_model_info` gives and marks the
    fingerprint `sglang-unverified:`; `max_top_k` is the configured `max_top_k`.
    """

    kind = "sglang"

    def __init__(self, url: str, *, max_top_k: int = 20, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.max_top_k = max_top_k

    def info(self) -> TeacherInfo:
        if self._info is None:
            body = self.client.get_json("/get_model_info")
            if not isinstance(body, dict) or "model_path" not in body:
                raise self._bad(f"GET /get_model_info has no model_path: {str(body)[:300]}")
            self._info = TeacherInfo(
                model=str(body["model_path"]),
                vocab_size=0,
                tokenizer_fingerprint=f"sglang-unverified:{body.get('tokenizer_path') or body['model_path']}",
                eos_token_ids=[],
                max_top_k=self.max_top_k,
            )
        return self._info

    def _score_chunk(self, items: list[ScoreRequestItem], top_k: int, offset: int) -> list[TeacherScores]:
        # A sequence with no completion needs no forward pass (and SGLang would reject start == len).
        todo = [i for i, it in enumerate(items) if it.completion_ids]
        out = [TeacherScores(logprobs=[], top_k=[] if top_k else None) for _ in items]
        if not todo:
            return out
        body = {
            "input_ids": [list(items[i].prompt_ids) + list(items[i].completion_ids) for i in todo],
            "return_logprob": True,
            "logprob_start_len": [len(items[i].prompt_ids) for i in todo],
            "top_logprobs_num": top_k,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        }
        resp = self.client.post_json("/generate", body)
        if isinstance(resp, dict):
            resp = [resp]
        if not isinstance(resp, list) or len(resp) != len(todo):
            raise self._bad(
                f"sent {len(todo)} sequences to /generate, got {len(resp) if isinstance(resp, list) else 0} results"
            )
        for j, i in enumerate(todo):
            out[i] = self._parse_one(resp[j], items[i], top_k, offset + i)
        return out

    def _parse_one(self, res: Any, item: ScoreRequestItem, top_k: int, seq: int) -> TeacherScores:
        meta = res.get("meta_info") if isinstance(res, dict) else None
        tok_lp = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if tok_lp is None:
            raise self._bad(
                f"sequence {seq}: response has no meta_info.input_token_logprobs (return_logprob ignored?)"
            )
        want = list(item.completion_ids)
        if len(tok_lp) != len(want):
            raise self._bad(f"sequence {seq}: expected {len(want)} log-probs, got {len(tok_lp)}")
        logprobs = []
        for t, entry in enumerate(tok_lp):
            if not isinstance(entry, (list, tuple)) or len(entry) < 2 or entry[0] is None:
                raise self._bad(f"sequence {seq}, token {t}: malformed input_token_logprobs entry {entry!r}")
            if int(entry[1]) != want[t]:
                raise self._bad(
                    f"sequence {seq}, token {t}: the server scored token {entry[1]}, but {want[t]} was sent"
                )
            logprobs.append(float(entry[0]))
        tops = None
        if top_k:
            rows = meta.get("input_top_logprobs")
            if not rows or len(rows) != len(want):
                raise self._bad(
                    f"sequence {seq}: asked for top-{top_k}, got input_top_logprobs for "
                    f"{len(rows) if rows else 0} of {len(want)} positions"
                )
            tops = []
            for t, row in enumerate(rows):
                if not isinstance(row, list):
                    raise self._bad(f"sequence {seq}, position {t}: input_top_logprobs entry is {row!r}")
                pairs = [(int(e[1]), float(e[0])) for e in row if e and e[0] is not None]
                tops.append(sorted(pairs, key=lambda p: (-p[1], p[0]))[:top_k])
        return TeacherScores(logprobs=logprobs, top_k=tops)


def make_teacher_client(tc: Any, *, on_state_change: Callable[[BreakerState], None] | None = None):
    """The remote `Teacher` a `TeacherConfig` (kind service | vllm | sglang) describes.

    The bearer token is read from the environment variable `tc.api_key_env` (never stored).
    """
    from onpolicy.teacher.vllm_server import VLLMServerTeacher

    if tc.kind not in ("service", "vllm", "sglang"):
        raise ValueError(
            f"teacher.kind={tc.kind!r} is not a remote teacher (expected service, vllm or sglang)"
        )
    if not tc.url:
        raise ValueError(f"teacher.url is required for teacher.kind={tc.kind}")
    api_key = None
    if tc.api_key_env:
        api_key = os.environ.get(tc.api_key_env)
        if not api_key:
            raise ValueError(
                f"teacher.api_key_env={tc.api_key_env!r} but that environment variable is empty or unset; "
                f"export it (the key is never written into the config)"
            )
    kw: dict[str, Any] = dict(  # noqa: C408 (keyword arguments, read as such)
        api_key=api_key,
        timeout_s=tc.timeout_s,
        max_retries=tc.max_retries,
        backoff_base_s=tc.backoff_base_s,
        backoff_max_s=tc.backoff_max_s,
        max_in_flight=tc.max_in_flight,
        breaker_failures=tc.breaker_failures,
        breaker_cooldown_s=tc.breaker_cooldown_s,
        max_wait_s=tc.max_wait_s,
        on_state_change=on_state_change,
    )
    cls = {"service": ServiceTeacher, "vllm": VLLMServerTeacher, "sglang": SGLangTeacher}[tc.kind]
    return cls(tc.url, **kw)

"""What every remote teacher shares: `RemoteTeacher` (a `RobustClient`, chunking, usage) and the
validation of what comes back. The adapters live one per file: `service.py` (our teacher
service), `vllm_server.py` (an external vLLM server), `sglang.py` (an external SGLang server).

Each adapter turns a list of `ScoreRequestItem` into the dialect's request, sends it through
`RobustClient` (retries, breaker, bounded concurrency), and *validates* the answer before any
number reaches the loss: one finite log-prob per completion token, the echoed ids equal to what
was sent (where the dialect echoes them), top-k present when asked. A violation raises
`TeacherResponseError` naming the teacher and exactly what was wrong, because a silently
misaligned log-prob trains the student on garbage.

Generation goes the same way (`generate` -> the adapter's `_generate_chunk`, then
`validate_completions`): n completions per prompt, grouped by prompt, each with one finite log-prob
<= 0 per token, ids inside the vocabulary when it is known, no longer than asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from onpolicy.engines.vllm import derive_seed
from onpolicy.teacher.fingerprint import CheckResult, compare_info
from onpolicy.teacher.http import BreakerState, RobustClient, TeacherResponseError
from onpolicy.teacher.local import generate_request
from onpolicy.types import GeneratedCompletion, ScoreRequestItem, TeacherInfo, TeacherScores

# A log-prob a little above 0 is float noise; far above it is a bug (a logit, a probability).
_LOGPROB_SLACK = 1e-3


def describe_validation_error(err: ValidationError) -> str:
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
    vocab_size: int | None = None,
) -> None:
    """Raise `TeacherResponseError` unless `scores` fit `items` (lengths, finiteness, top-k, and top-k
    token ids inside `[0, vocab_size)` when the vocabulary size is known).

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
                if vocab_size is not None and any(not 0 <= tok < vocab_size for tok, _ in row):
                    bad = next(tok for tok, _ in row if not 0 <= tok < vocab_size)
                    raise TeacherResponseError(
                        f"{source}: sequence {seq}, position {t}: top-k token id {bad} is outside the "
                        f"vocabulary [0, {vocab_size})"
                    )


def validate_completions(
    source: str,
    prompts: Sequence[Sequence[int]],
    n: int,
    completions: Sequence[GeneratedCompletion],
    max_new_tokens: int,
    offset: int = 0,
    vocab_size: int | None = None,
) -> None:
    """Raise `TeacherResponseError` unless `completions` are `n` per prompt, grouped by prompt in order, each
    1..`max_new_tokens` tokens with one finite log-prob <= 0 apiece, ids inside `[0, vocab_size)` when known.

    `offset` is added to prompt numbers in messages (the index of this chunk's first prompt)."""
    if len(completions) != len(prompts) * n:
        raise TeacherResponseError(
            f"{source}: sent {len(prompts)} prompts with n={n}, got {len(completions)} completions back "
            f"(expected {len(prompts) * n})"
        )
    for k, c in enumerate(completions):
        where = f"{source}: prompt {offset + k // n}, completion {k % n}"
        if c.prompt_index != k // n:
            raise TeacherResponseError(
                f"{where}: prompt_index is {c.prompt_index}, expected {k // n} (completions come grouped by "
                "prompt, in prompt order)"
            )
        if not 1 <= len(c.completion_ids) <= max_new_tokens:
            raise TeacherResponseError(
                f"{where}: {len(c.completion_ids)} tokens, expected 1 to max_new_tokens={max_new_tokens}"
            )
        if len(c.logprobs) != len(c.completion_ids):
            raise TeacherResponseError(
                f"{where}: {len(c.completion_ids)} tokens but {len(c.logprobs)} log-probs"
            )
        for t, v in enumerate(c.logprobs):
            if not math.isfinite(v) or v > _LOGPROB_SLACK:
                raise TeacherResponseError(f"{where}, token {t}: log-prob is {v} (must be finite and <= 0)")
        if vocab_size is not None:
            bad = next((tok for tok in c.completion_ids if not 0 <= tok < vocab_size), None)
            if bad is not None:
                raise TeacherResponseError(
                    f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})"
                )


class RemoteTeacher:
    """Shared plumbing: a `RobustClient`, chunking, usage. Subclasses implement `_score_chunk` and
    `_generate_chunk`."""

    kind = "remote"
    info_path = "/"  # the dialect's cheapest GET that proves it is there (reachability)
    fix_hint = ""  # how to serve a teacher of this dialect, for error messages
    top_k_fix = "lower teacher.top_k"  # how to get top-K from it (K is replaced by the number)

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

    def info(self) -> TeacherInfo:
        raise NotImplementedError

    def known_vocab_size(self) -> int | None:
        """The vocabulary size if this teacher has already said it (no request is made for it)."""
        return self._info.vocab_size if self._info is not None and self._info.vocab_size > 0 else None

    def describe(self) -> str:
        """The served model's name (what a reachability check reports)."""
        return self.info().model

    def max_top_k(self) -> int:
        """The most top-k entries per position this teacher returns."""
        return self.info().max_top_k

    def compatibility(self, student_path: str | Path) -> list[CheckResult]:
        """Checks of this teacher against the student: tokenizer and EOS, as far as the dialect publishes them."""
        return compare_info(student_path, self.info())

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
            validate_scores(self.source, part, out, top_k, offset=start, vocab_size=self.known_vocab_size())
            self.client.usage.add(tokens_scored=sum(len(it.completion_ids) for it in part))
            return out

        if len(chunks) == 1:
            return run(chunks[0])
        with ThreadPoolExecutor(max_workers=min(len(chunks), self._max_in_flight)) as pool:
            return [s for part in pool.map(run, chunks) for s in part]

    def _score_chunk(self, items: list[ScoreRequestItem], top_k: int, offset: int) -> list[TeacherScores]:
        raise NotImplementedError

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GeneratedCompletion]:
        if not prompts:
            return []
        req = generate_request(prompts, n, max_new_tokens, temperature, top_p, seed)  # fail before sending
        size = self._generate_chunk_prompts(req.n, seed)
        chunks = [(s, req.prompts[s : s + size]) for s in range(0, len(req.prompts), size)]

        def run(chunk: tuple[int, list[list[int]]]) -> list[GeneratedCompletion]:
            start, part = chunk
            # A chunk after the first gets a seed of its own: the server derives per-prompt seeds from the
            # request's, so equal prompts in two chunks would otherwise get equal samples.
            chunk_seed = None if seed is None else seed if start == 0 else derive_seed(seed, start)
            out = self._generate_chunk(part, start, n=n, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, seed=chunk_seed)
            validate_completions(self.source, part, n, out, max_new_tokens, offset=start,
                                 vocab_size=self.known_vocab_size())
            self.client.usage.add(prompt_tokens=sum(len(p) for p in part),
                                  tokens_generated=sum(len(c.completion_ids) for c in out))
            return [c.model_copy(update={"prompt_index": c.prompt_index + start}) for c in out]

        if len(chunks) == 1:
            return run(chunks[0])
        with ThreadPoolExecutor(max_workers=min(len(chunks), self._max_in_flight)) as pool:
            return [c for part in pool.map(run, chunks) for c in part]

    def _generate_chunk_prompts(self, n: int, seed: int | None) -> int:
        """Prompts per generation request: about `batch_size` completions."""
        return max(1, self.batch_size // n)

    def _generate_chunk(
        self, prompts: list[list[int]], offset: int, *, n: int, max_new_tokens: int, temperature: float,
        top_p: float, seed: int | None,
    ) -> list[GeneratedCompletion]:
        """`n` completions per prompt of this chunk, grouped by prompt (`prompt_index` within the chunk)."""
        raise NotImplementedError

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
`validate_completions`, both in validate.py): n completions per prompt, grouped by prompt, each with one finite log-prob
<= 0 per token, ids inside the vocabulary when it is known, no longer than asked.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from onpolicy.engines.vllm import derive_seed
from onpolicy.teacher.clients.http import BreakerState, RobustClient
from onpolicy.teacher.errors import TeacherResponseError
from onpolicy.teacher.fingerprint import CheckResult, compare_info
from onpolicy.teacher.local.engines import generate_request
from onpolicy.teacher.validate import validate_completions, validate_scores
from onpolicy.types import GeneratedCompletion, ScoreRequestItem, TeacherInfo, TeacherScores


def describe_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(body)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


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

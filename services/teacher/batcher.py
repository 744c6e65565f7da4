"""Merge concurrent score requests into few engine calls (`ScoreBatcher`).

How it works:
- Each request handler calls `await batcher.score(items, top_k)`. That puts a `_Pending`
  (items, top_k, a future) on an asyncio queue and waits on the future.
- One background task owns the engine. It blocks until something is queued, then keeps taking
  requests until it holds `max_batch_sequences` sequences or `batch_wait_ms` has passed since
  the first one arrived (a request that would overflow the batch waits for the next one; a
  single request larger than the cap runs alone).
- The batch is grouped by `top_k` (one engine call returns one k), and each group runs as ONE
  `teacher.score(items, top_k)` in a single worker thread, so the event loop keeps accepting
  requests while the engine works, and the engine (not thread-safe) is only ever called from
  that one thread, one call at a time.
- The flat result list is cut back into each request's slice, in order, and set on its future.
- If a merged call fails and it held several requests, each request is retried alone, so one
  bad request fails only itself. Requests whose caller went away (cancelled future) are dropped
  before the engine call.

Under light load a request waits at most `batch_wait_ms` extra; under heavy load requests pile
up while the engine is busy and the next batch takes them all at once, which is where merging
pays off (one padded forward pass / one vLLM `generate` instead of many).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from onpolicy.protocols import Teacher
from onpolicy.types import ScoreRequestItem, TeacherScores

log = logging.getLogger(__name__)

# on_batch(number of sequences, completion tokens, engine seconds) after each engine call.
BatchHook = Callable[[int, int, float], None]


@dataclass
class _Pending:
    items: list[ScoreRequestItem]
    top_k: int
    future: asyncio.Future = field(repr=False)


class ScoreBatcher:
    """Queue + one engine task; see the module docstring. Use inside one event loop."""

    def __init__(
        self,
        teacher: Teacher,
        *,
        max_batch_sequences: int = 512,
        batch_wait_ms: float = 2.0,
        on_batch: BatchHook | None = None,
    ) -> None:
        if max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1, got {max_batch_sequences}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.teacher = teacher
        self.max_batch_sequences = max_batch_sequences
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.on_batch = on_batch
        # One thread: the engine sees one caller, always the same one.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="teacher-engine")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: _Pending | None = None  # took it from the queue, but it did not fit

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine task on the running loop (again, if the loop changed)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self._loop = loop
        self._queue = asyncio.Queue()
        self._held = None
        self._task = loop.create_task(self._run(), name="teacher-score-batcher")

    async def stop(self) -> None:
        """Cancel the engine task; waiting requests fail with CancelledError."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        pending = [self._held] if self._held else []
        self._held = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for p in pending:
            if not p.future.done():
                p.future.cancel()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the API handlers use -------------------------------------------------------------------

    async def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        """Scores of `items`, computed in a merged engine call with other waiting requests."""
        if not items:
            return []
        self.start()
        assert self._queue is not None and self._loop is not None
        pending = _Pending(list(items), top_k, self._loop.create_future())
        self._queue.put_nowait(pending)
        return await pending.future

    # -- the engine task ------------------------------------------------------------------------

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        first = self._held if self._held is not None else await self._queue.get()
        self._held = None
        batch, n_seqs = [first], len(first.items)
        deadline = time.monotonic() + self.batch_wait_s
        while n_seqs < self.max_batch_sequences:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if n_seqs + len(nxt.items) > self.max_batch_sequences:
                self._held = nxt
                break
            batch.append(nxt)
            n_seqs += len(nxt.items)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            groups: dict[int, list[_Pending]] = {}
            for p in batch:
                if not p.future.done():  # the caller may have gone away
                    groups.setdefault(p.top_k, []).append(p)
            try:
                for top_k, group in groups.items():
                    await self._score_group(group, top_k)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.cancel()
                raise

    async def _engine_call(self, items: list[ScoreRequestItem], top_k: int) -> list[TeacherScores]:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(self._executor, self.teacher.score, items, top_k)
        if len(scores) != len(items):
            raise RuntimeError(f"teacher returned {len(scores)} scores for {len(items)} sequences")
        if self.on_batch is not None:
            tokens = sum(len(it.completion_ids) for it in items)
            self.on_batch(len(items), tokens, time.perf_counter() - t0)
        return scores

    async def _score_group(self, group: list[_Pending], top_k: int) -> None:
        items = [it for p in group for it in p.items]
        try:
            scores = await self._engine_call(items, top_k)
        except Exception as exc:  # noqa: BLE001 -- handed to the waiting requests, not swallowed
            if len(group) == 1:
                _fail(group[0], exc)
                return
            log.warning(
                "merged engine call over %d requests failed (%s); retrying each alone",
                len(group),
                type(exc).__name__,
            )
            for p in group:
                if p.future.done():
                    continue
                try:
                    _resolve(p, await self._engine_call(p.items, top_k))
                except Exception as one_exc:  # noqa: BLE001 -- as above
                    _fail(p, one_exc)
            return
        start = 0
        for p in group:
            _resolve(p, scores[start : start + len(p.items)])
            start += len(p.items)


def _resolve(p: _Pending, scores: list[TeacherScores]) -> None:
    if not p.future.done():
        p.future.set_result(scores)


def _fail(p: _Pending, exc: BaseException) -> None:
    if not p.future.done():
        p.future.set_exception(exc)

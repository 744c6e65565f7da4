"""Merge concurrent score requests into few engine calls, and run generation beside them (`ScoreBatcher`).

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
  before the engine call, and counted (`on_dropped`).
- The queue is bounded in sequences (`max_queue`), not requests: memory and waiting time grow
  with sequences, and one request may carry 1 or hundreds. A request that does not fit gets
  `QueueFull` at once (the app answers 429 + Retry-After) instead of waiting in an ever longer
  line. A request counts against the bound from the moment it is queued until the engine task
  takes it into a batch, cancelled or not, so the memory held by queued requests stays bounded
  even when clients disconnect faster than the engine drains the queue.

- Generation (`run_exclusive`) is not merged: a generate call runs alone, on the same one engine
  thread, between merged score calls (the executor runs what it is given in order). It counts its
  completions (prompts x n) against the same queue bound until the engine thread takes it, so it gets
  `QueueFull` like a score request, and a caller that goes away before then is never run.

Under light load a request waits at most `batch_wait_ms` extra; under heavy load requests pile
up while the engine is busy and the next batch takes them all at once, which is where merging
pays off (one padded forward pass / one vLLM `generate` instead of many).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from onpolicy.protocols import Teacher
from onpolicy.types import ScoreRequestItem, TeacherScores

log = logging.getLogger(__name__)
R = TypeVar("R")

# on_batch(number of sequences, completion tokens, engine seconds) after each engine call.
BatchHook = Callable[[int, int, float], None]
# on_dropped(number of requests) when requests whose caller went away are skipped.
DropHook = Callable[[int], None]

# Weight of the newest engine call in the running mean behind Retry-After: recent calls matter
# most (load changes), but one outlier should not swing the estimate.
_EWMA_WEIGHT = 0.2
MAX_RETRY_AFTER_S = 60


class QueueFull(Exception):
    """The queue has no room for this request now; retry after `retry_after_s` seconds."""

    def __init__(self, queued: int, wanted: int, max_queue: int, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"server busy: {queued} sequences already wait for the teacher engine (bound {max_queue}), "
            f"no room for {wanted} more; retry in {retry_after_s} s"
        )


def estimate_retry_after_s(queued: int, max_batch_sequences: int, mean_call_s: float | None) -> int:
    """Whole seconds until the queue has likely drained: the running call plus one call per
    `max_batch_sequences` queued, at the recent mean call time; 1 before any call, at most
    `MAX_RETRY_AFTER_S` (a client should come back and look, not go away for minutes)."""
    if mean_call_s is None:
        return 1
    calls = 1 + math.ceil(queued / max_batch_sequences)
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(calls * mean_call_s)))


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
        max_queue: int | None = None,
        on_batch: BatchHook | None = None,
        on_dropped: DropHook | None = None,
    ) -> None:
        """`max_queue`: most sequences waiting for the engine (None: unbounded, for library use;
        the service always sets it, see `app.queue_bound`)."""
        if max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1, got {max_batch_sequences}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 sequence, got {max_queue}")
        self.teacher = teacher
        self.max_batch_sequences = max_batch_sequences
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_dropped = on_dropped
        self.queued_sequences = 0  # in the queue or held, not yet in a batch
        self.mean_call_s: float | None = None  # running mean of engine call time (Retry-After)
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
        self.queued_sequences = 0  # a new queue: what the old loop queued is gone with it
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
        self.queued_sequences = 0
        for p in pending:
            if not p.future.done():
                p.future.cancel()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the API handlers use -------------------------------------------------------------------

    def is_full(self) -> bool:
        """No request, however small, fits in the queue now."""
        return self.max_queue is not None and self.queued_sequences >= self.max_queue

    def retry_after_s(self) -> int:
        return estimate_retry_after_s(self.queued_sequences, self.max_batch_sequences, self.mean_call_s)

    async def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        """Scores of `items`, computed in a merged engine call with other waiting requests.

        Raises `QueueFull` at once if the queue has no room for `items`. Cancelling the caller
        cancels the request: if it has not reached the engine yet, it never will.
        """
        if not items:
            return []
        self.start()
        assert self._queue is not None and self._loop is not None
        n = len(items)
        if self.max_queue is not None and self.queued_sequences + n > self.max_queue:
            raise QueueFull(self.queued_sequences, n, self.max_queue, self.retry_after_s())
        pending = _Pending(list(items), top_k, self._loop.create_future())
        self._queue.put_nowait(pending)
        self.queued_sequences += n
        try:
            return await pending.future
        except asyncio.CancelledError:
            # Awaiting a future from a cancelled task cancels it already; say so, since the
            # engine task relies on it to skip this request.
            pending.future.cancel()
            raise

    async def run_exclusive(self, fn: Callable[..., R], *args: Any, sequences: int) -> R:
        """`fn(*args)` on the engine thread, alone (between merged score calls): for work that is not
        scoring, such as generation. `sequences` count against the queue bound until the engine thread
        takes the call (`QueueFull` at once if they do not fit); cancelling the caller before then means
        it never runs."""
        if self.max_queue is not None and self.queued_sequences + sequences > self.max_queue:
            raise QueueFull(self.queued_sequences, sequences, self.max_queue, self.retry_after_s())
        loop = asyncio.get_running_loop()
        self.queued_sequences += sequences
        waiting = True

        def taken() -> None:  # on the loop: out of the queue, in the engine's hands (or given up)
            nonlocal waiting
            if waiting:
                waiting = False
                self.queued_sequences -= sequences

        def run() -> R:
            loop.call_soon_threadsafe(taken)
            return fn(*args)

        try:
            # A cancelled future that has not started is skipped by the executor.
            return await loop.run_in_executor(self._executor, run)
        finally:
            taken()

    # -- the engine task ------------------------------------------------------------------------

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        first = self._held if self._held is not None else await self._queue.get()
        self._held = None
        batch, n_seqs = [first], len(first.items)
        deadline = time.monotonic() + self.batch_wait_s
        try:
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
        except asyncio.CancelledError:
            # Stopped while gathering: these are neither in the queue nor held, so `stop` cannot
            # see them; without this their callers would wait forever.
            for p in batch:
                p.future.cancel()
            raise
        self.queued_sequences -= n_seqs  # out of the queue: in the engine's hands now
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            groups: dict[int, list[_Pending]] = {}
            for p in batch:
                if not p.future.done():  # the caller may have gone away
                    groups.setdefault(p.top_k, []).append(p)
            dropped = len(batch) - sum(len(g) for g in groups.values())
            if dropped and self.on_dropped is not None:
                self.on_dropped(dropped)
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
        seconds = time.perf_counter() - t0
        prev = self.mean_call_s
        self.mean_call_s = seconds if prev is None else (1 - _EWMA_WEIGHT) * prev + _EWMA_WEIGHT * seconds
        if len(scores) != len(items):
            raise RuntimeError(f"teacher returned {len(scores)} scores for {len(items)} sequences")
        if self.on_batch is not None:
            tokens = sum(len(it.completion_ids) for it in items)
            self.on_batch(len(items), tokens, seconds)
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

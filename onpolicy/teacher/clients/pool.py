"""Several replicas of one remote teacher behind the `Teacher` protocol (`teacher.urls`).

Each replica is a `RemoteTeacher` with its own `RobustClient` and circuit breaker. Each call (each
chunk of a large call) goes to the usable replica with the fewest requests in flight, ties broken
round robin: a slow replica collects a queue and gets less, a fast one gets more. Usable means the
breaker is closed, or open with its cool-down over (the call is then the breaker's probe, which is
how a replica that came back is let in again).

A replica fails fast (`REPLICA_CLIENT`: no retries of its own, no waiting on its breaker), so a
dead replica costs a call one refused connection, not `teacher.max_wait_s`: the pool sends the
call to another replica at once. Only a transport failure (`TeacherUnavailable`) moves a call; a
4xx (`TeacherRequestError`: our request is wrong) or a malformed answer (`TeacherResponseError`)
would be as wrong elsewhere, so it is raised. When every usable replica has failed the call, the
pool backs off and goes round again (`teacher.max_retries` rounds), then trips the breakers it
tried; with every breaker open the pool is down: `on_state_change("open")` (the run is degraded)
and calls wait, probing, up to `teacher.max_wait_s`. The first replica back closes the pool again.

Replicas must serve the same model: each one's `TeacherInfo` is compared with the first answer
before it gets work (at open for all that answer, later for one that was down then), and one that
differs is refused with both named: mixing teachers would silently train on two targets.

The routing itself (`usable`, `pick_replica`, `Router`, `pool_state`, `info_mismatch`) is pure and
tested without sockets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from onpolicy.engines.vllm import derive_seed
from onpolicy.teacher.clients.http import BreakerState, TeacherUsage, backoff_delay
from onpolicy.teacher.clients.remote import RemoteTeacher
from onpolicy.teacher.errors import TeacherUnavailable
from onpolicy.teacher.fingerprint import CheckResult, TeacherIncompatible
from onpolicy.types import GeneratedCompletion, ScoreRequestItem, TeacherInfo, TeacherScores

log = logging.getLogger(__name__)
T = TypeVar("T")

# What each replica's RobustClient is given on top of the run's client settings: fail fast, the pool
# retries elsewhere and does the waiting.
REPLICA_CLIENT: dict[str, Any] = {"max_retries": 0, "wait_when_down": False, "max_wait_s": 0.0}
SUMMED = ("requests", "retries", "failures", "tokens_scored", "tokens_generated", "prompt_tokens")


# ---------------------------------------------------------------------------------------------
# Pure pieces


def usable(state: BreakerState, seconds_until_probe: float) -> bool:
    """A replica may get a call: its breaker is closed, or open with the cool-down over (a probe)."""
    return state == "closed" or (state == "open" and seconds_until_probe <= 0.0)


def pick_replica(in_flight: Sequence[int], allowed: Sequence[bool], cursor: int) -> int | None:
    """The allowed replica with the fewest calls in flight; among equals the first at or after `cursor`
    (round robin). None when none is allowed."""
    n = len(in_flight)
    best: int | None = None
    for k in range(n):
        i = (cursor + k) % n
        if allowed[i] and (best is None or in_flight[i] < in_flight[best]):
            best = i
    return best


class Router:
    """Calls in flight per replica and the round-robin cursor (thread-safe)."""

    def __init__(self, n: int) -> None:
        self.in_flight = [0] * n
        self.calls = [0] * n  # calls routed to each replica since the start
        self._cursor = 0
        self._lock = threading.Lock()

    def acquire(self, allowed: Sequence[bool]) -> int | None:
        with self._lock:
            i = pick_replica(self.in_flight, allowed, self._cursor)
            if i is not None:
                self.in_flight[i] += 1
                self.calls[i] += 1
                self._cursor = (i + 1) % len(self.in_flight)
            return i

    def release(self, i: int) -> None:
        with self._lock:
            self.in_flight[i] -= 1


def pool_state(states: Sequence[BreakerState]) -> BreakerState:
    """Closed while any replica's breaker is closed; open (the run degraded) when none is."""
    return "closed" if "closed" in states else "open"


def info_mismatch(a: TeacherInfo, b: TeacherInfo) -> list[str]:
    """`field: a != b` for each field in which two replicas' descriptions differ."""
    out = []
    for field in TeacherInfo.model_fields:
        x, y = getattr(a, field), getattr(b, field)
        if x != y:
            if field == "tokenizer_fingerprint":
                x, y = str(x)[:16], str(y)[:16]
            out.append(f"{field}: {x!r} != {y!r}")
    return out


# ---------------------------------------------------------------------------------------------
# The pool


class TeacherPool:
    """Replicas of one remote teacher: least-outstanding-requests routing, a breaker per replica."""

    def __init__(
        self,
        replicas: list[RemoteTeacher],
        *,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_wait_s: float = 600.0,
        max_in_flight: int = 4,
        on_state_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if not replicas:
            raise ValueError("a teacher pool needs at least one replica")
        self.replicas = replicas
        self.max_retries, self.max_wait_s = max_retries, max_wait_s
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.max_in_flight = max_in_flight  # per replica (each client's own bound): chunks sent at once
        self.on_state_change = on_state_change
        self.router = Router(len(replicas))
        self._usage = TeacherUsage()  # the pool's own: resends, and the latency of each routed call
        self._state: BreakerState = "closed"
        self._times_opened = 0
        self._state_lock = threading.Lock()
        self._info: TeacherInfo | None = None
        self._info_from = -1
        self._verified: set[int] = set()
        self._verify_lock = threading.Lock()
        for r in replicas:  # the pool hears every replica's breaker
            r.client.breaker.on_state_change = self._replica_changed

    @property
    def source(self) -> str:
        return f"teacher pool ({', '.join(r.url for r in self.replicas)})"

    @property
    def state(self) -> BreakerState:
        return self._state

    def _replica_changed(self, _state: BreakerState) -> None:
        with self._state_lock:  # held while notifying, so two threads cannot report out of order
            state = pool_state([r.state for r in self.replicas])
            if state == self._state:
                return
            self._state = state
            self._times_opened += state == "open"
            log.warning("%s: %s", self.source, "every replica is down" if state == "open" else "a replica is back")
            if self.on_state_change is not None:
                self.on_state_change(state)

    # -- same model everywhere -------------------------------------------------------------------

    def _verify(self, i: int) -> None:
        """Compare replica i's description with the pool's (the first one seen); TeacherIncompatible if they differ."""
        info = self.replicas[i].info()
        with self._verify_lock:
            if self._info is None:
                self._info, self._info_from = info, i
            diff = info_mismatch(self._info, info)
            if diff:
                first = self.replicas[self._info_from].url
                raise TeacherIncompatible(
                    f"teacher replica {self.replicas[i].url} serves another model than replica {first} "
                    f"({'; '.join(diff)}): every URL in teacher.urls must be a replica of one teacher"
                )
            self._verified.add(i)

    def info(self) -> TeacherInfo:
        """The replicas' common description; at the first call every replica that answers is compared."""
        if self._info is None:
            for i in range(len(self.replicas)):
                try:
                    self._verify(i)
                except TeacherUnavailable as err:
                    log.warning("%s: replica %s not checked yet (%s)", self.source, self.replicas[i].url, err)
            if self._info is None:  # none answered: wait for one, as any call does
                self._call(lambda r: r.info())
        assert self._info is not None
        return self._info

    def max_top_k(self) -> int:
        return self.info().max_top_k

    def compatibility(self, student_path: str | Path) -> list[CheckResult]:
        self.info()
        return self._call(lambda r: r.compatibility(student_path))

    # -- routing ---------------------------------------------------------------------------------

    def _usable(self, skip: set[int]) -> list[bool]:
        return [i not in skip and usable(r.state, r.client.breaker.seconds_until_probe())
                for i, r in enumerate(self.replicas)]

    def _call(self, fn: Callable[[RemoteTeacher], T]) -> T:
        """`fn(replica)` on the usable replica with the fewest calls in flight; on a transport failure, on
        another one (see the module docstring for the rounds and the waiting)."""
        tried: set[int] = set()  # replicas that failed this call in this round
        rounds = 0
        waiting_since: float | None = None
        errors: dict[str, str] = {}
        t0 = time.monotonic()
        while True:
            i = self.router.acquire(self._usable(tried))
            if i is None:
                if any(self._usable(set())):  # every usable replica failed this call: go round again
                    rounds = self._next_round(rounds, tried)
                else:  # every breaker is open: the pool is down
                    waiting_since = self._wait_for_probe(waiting_since, errors)
                tried.clear()
                continue
            replica = self.replicas[i]
            try:
                if i not in self._verified:
                    self._verify(i)
                out = fn(replica)
            except TeacherUnavailable as err:
                errors[replica.url] = str(err)
                tried.add(i)
                self._usage.add(retries=1)
                continue
            finally:
                self.router.release(i)
            self._usage.record_latency(time.monotonic() - t0)
            return out

    def _next_round(self, rounds: int, tried: set[int]) -> int:
        """Back off before the next round; once `max_retries` rounds are spent, trip the breakers of the
        replicas that failed (they are down: the pool waits for their probes)."""
        if rounds >= self.max_retries:
            for j in tried:
                self.replicas[j].client.breaker.trip()
            return rounds
        time.sleep(backoff_delay(rounds, self.backoff_base_s, self.backoff_max_s))
        return rounds + 1

    def _wait_for_probe(self, waiting_since: float | None, errors: dict[str, str]) -> float:
        """Sleep until a replica's breaker lets a probe through (at most 0.25 s at a time); TeacherUnavailable
        once the pool has been down `max_wait_s`. Returns when the call started waiting."""
        now = time.monotonic()
        since = now if waiting_since is None else waiting_since
        if now - since >= self.max_wait_s:
            last = "; ".join(f"{url}: {e}" for url, e in errors.items()) or "none"
            raise TeacherUnavailable(
                f"{self.source} unavailable: waited {now - since:.1f}s (max_wait_s={self.max_wait_s}) with every "
                f"replica's circuit breaker open; last errors: {last}. Check that the replicas are up and "
                f"reachable, or raise teacher.max_wait_s."
            )
        probe = min(r.client.breaker.seconds_until_probe() for r in self.replicas)
        time.sleep(max(0.005, min(probe, 0.25, self.max_wait_s - (now - since))))
        return since

    def _chunked(self, total: int, size: int, fn: Callable[[int, int], list[T]]) -> list[T]:
        """`fn(start, end)` for each chunk of `size` of `total`, each routed on its own, in parallel."""
        starts = range(0, total, size)
        if len(starts) == 1:
            return fn(0, total)
        workers = min(len(starts), self.max_in_flight * len(self.replicas))
        with ThreadPoolExecutor(max_workers=workers) as ex:
            return [x for part in ex.map(lambda s: fn(s, min(s + size, total)), starts) for x in part]

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        if not items:
            return []
        return self._chunked(len(items), self.replicas[0].batch_size,
                             lambda s, e: self._call(lambda r: r.score(items[s:e], top_k)))

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

        def run(start: int, end: int) -> list[GeneratedCompletion]:
            # Chunk by chunk with the seeds a single replica would derive, so a pool samples what one
            # replica would have sampled.
            chunk_seed = None if seed is None else seed if start == 0 else derive_seed(seed, start)
            out = self._call(lambda r: r.generate(prompts[start:end], n=n, max_new_tokens=max_new_tokens,
                                                  temperature=temperature, top_p=top_p, seed=chunk_seed))
            return [c.model_copy(update={"prompt_index": c.prompt_index + start}) for c in out]

        return self._chunked(len(prompts), self.replicas[0]._generate_chunk_prompts(n, seed), run)

    # -- accounting ------------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """The replicas' counters summed; `retries` adds the pool's resends to another replica (or round);
        latency is per routed call, failovers included; per replica its requests and breaker state."""
        per = [r.usage() for r in self.replicas]
        own = self._usage.snapshot()
        out: dict[str, Any] = {key: sum(p[key] for p in per) for key in SUMMED}
        out.update(retries=out["retries"] + own["retries"], latency_p50_s=own["latency_p50_s"],
                   latency_p95_s=own["latency_p95_s"], breaker=self._state, breaker_opened=self._times_opened,
                   replicas_live=sum(r.state == "closed" for r in self.replicas))
        for i, p in enumerate(per):
            out[f"replica_{i}_requests"] = p["requests"]
            out[f"replica_{i}_breaker"] = p["breaker"]
        return out

    def close(self) -> None:
        for r in self.replicas:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

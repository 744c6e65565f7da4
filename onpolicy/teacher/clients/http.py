"""A robust HTTP layer for remote teachers: retries, a circuit breaker, bounded concurrency, usage.

The driver calls `teacher.score` synchronously once per step, so this is a sync httpx client.
What it does on a failure, and why:

- Connection errors, timeouts, 5xx and 429 are transient: retry with exponential backoff and
  full jitter (`backoff_delay`), honouring `Retry-After`. Other 4xx mean *our request* is wrong
  (a too-long sequence, a top-k the server refuses): retrying cannot help, so raise
  `TeacherRequestError` at once with the status and the server's body.
- After `breaker_failures` consecutive failed requests the `CircuitBreaker` opens: the run is
  *degraded* (`on_state_change("open")`). Calls then wait instead of hammering a dead server or
  failing the run: every `breaker_cooldown_s` one request goes through as a probe (half-open);
  its success closes the breaker and everybody proceeds. A call that has waited `max_wait_s`
  raises `TeacherUnavailable`. A call that spends its `max_retries` before the breaker has opened
  trips it (`wait_when_down`): an outage is an outage whether `max_retries` is below
  `breaker_failures` or not, so the run degrades and waits up to `max_wait_s` either way (a preflight
  check passes `wait_when_down=False`: it reports, it does not ride out an outage).
- At most `max_in_flight` requests are on the wire at once (a semaphore).
- `TeacherUsage` counts requests, retries, failures, tokens scored and generated, and keeps a bounded
  reservoir of latencies for p50/p95.

The pure pieces (`backoff_delay`, `parse_retry_after`, `CircuitBreaker`, `percentile`) take
their clock and random source as arguments, so tests drive them without sockets or sleeps.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import httpx

from onpolicy.teacher.clients import pinned
from onpolicy.teacher.errors import TeacherRequestError, TeacherResponseError, TeacherUnavailable, status_text

BreakerState = Literal["closed", "open", "half_open"]
log = logging.getLogger(__name__)
# Sent with every request, the same on each of its retries (the IETF draft's name for it).
IDEMPOTENCY_HEADER = "Idempotency-Key"


# ---------------------------------------------------------------------------------------------
# Pure pieces


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max_s, base_s * 2**attempt)].

    `attempt` counts from 0 (the wait before the first retry). Full jitter spreads the retries of
    many clients that failed together, so they do not come back in lock-step.
    """
    cap = min(max_s, base_s * (2.0 ** min(attempt, 60)))
    return (rng or random).uniform(0.0, cap)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class CircuitBreaker:
    """closed -> open after `failures` consecutive failures -> half_open after `cooldown_s` (one probe).

    `allow()` says whether a request may go now; in half-open only one probe is let through at a
    time. The probe's `record_success()` closes the breaker, its `record_failure()` re-opens it
    for another cool-down. `on_state_change(state)` is called (outside the lock) on each transition.
    """

    def __init__(
        self,
        failures: int = 5,
        cooldown_s: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("breaker needs failures >= 1 and cooldown_s > 0")
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.on_state_change = on_state_change
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.times_opened = 0
        self._lock = threading.Lock()

    @property
    def state(self) -> BreakerState:
        return self._state

    def _set(self, state: BreakerState) -> BreakerState | None:
        if state == self._state:
            return None
        self._state = state
        if state == "open":
            self._opened_at = self.clock()
            self.times_opened += 1
        return state

    def _notify(self, changed: BreakerState | None) -> None:
        if changed is not None and self.on_state_change is not None:
            self.on_state_change(changed)

    def allow(self) -> bool:
        with self._lock:
            changed = None
            if self._state == "closed":
                return True
            if self._state == "open":
                if self.clock() - self._opened_at < self.cooldown_s:
                    return False
                changed = self._set("half_open")
            if self._probe_in_flight:
                allowed = False
            else:
                self._probe_in_flight = allowed = True
        self._notify(changed)
        return allowed

    def seconds_until_probe(self) -> float:
        if self._state != "open":
            return 0.0
        return max(0.0, self.cooldown_s - (self.clock() - self._opened_at))

    def record_success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._probe_in_flight = False
            changed = self._set("closed")
        self._notify(changed)

    def trip(self) -> None:
        """Open now, whatever the count (a caller that spent its retries: the teacher is down)."""
        with self._lock:
            self._probe_in_flight = False
            changed = self._set("open")
        self._notify(changed)

    def record_failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            was_probe, self._probe_in_flight = self._probe_in_flight, False
            changed = None
            if self._state == "half_open" and was_probe:
                # The probe failed: back to open for another full cool-down.
                changed = self._set("open")
            elif self._state == "closed" and self._consecutive >= self.failures:
                changed = self._set("open")
        self._notify(changed)


class TeacherUsage:
    """Counters of one client, plus a bounded latency reservoir (Algorithm R) for percentiles."""

    def __init__(self, reservoir_size: int = 1024, seed: int = 0) -> None:
        self.requests = 0  # HTTP attempts sent
        self.retries = 0  # attempts that were retries
        self.failures = 0  # attempts that failed (transport error, timeout, 5xx, 429)
        self.tokens_scored = 0
        self.tokens_generated = 0  # completion tokens the teacher sampled
        self.prompt_tokens = 0  # prompt tokens of generation calls (once per prompt, whatever n)
        self._size = reservoir_size
        self._latencies: list[float] = []
        self._seen = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def add(self, *, requests: int = 0, retries: int = 0, failures: int = 0, tokens_scored: int = 0,
            tokens_generated: int = 0, prompt_tokens: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries
            self.failures += failures
            self.tokens_scored += tokens_scored
            self.tokens_generated += tokens_generated
            self.prompt_tokens += prompt_tokens

    def record_latency(self, seconds: float) -> None:
        with self._lock:
            self._seen += 1
            if len(self._latencies) < self._size:
                self._latencies.append(seconds)
            else:
                j = self._rng.randrange(self._seen)
                if j < self._size:
                    self._latencies[j] = seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = list(self._latencies)
            return {
                "requests": self.requests,
                "retries": self.retries,
                "failures": self.failures,
                "tokens_scored": self.tokens_scored,
                "tokens_generated": self.tokens_generated,
                "prompt_tokens": self.prompt_tokens,
                "latency_p50_s": percentile(lat, 50),
                "latency_p95_s": percentile(lat, 95),
            }


# ---------------------------------------------------------------------------------------------
# The client


class RobustClient:
    """JSON over HTTP with retries, a circuit breaker and bounded concurrency (thread-safe)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_in_flight: int = 4,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 5.0,
        max_wait_s: float = 600.0,
        wait_when_down: bool = True,
        on_state_change: Callable[[BreakerState], None] | None = None,
        seed: int | None = None,
        connect_to: dict[str, str] | None = None,
    ) -> None:
        """`connect_to`: host -> the address to connect to for it (see pinned.py: the control API pins the
        address it vetted); proxy variables from the environment are never used."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.max_wait_s = max_wait_s
        self.wait_when_down = wait_when_down
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s, on_state_change=on_state_change)
        self.usage = TeacherUsage()
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
        self._http = pinned.client(connect_to, base_url=self.base_url, headers=headers, timeout=timeout_s,
                                   limits=limits)

    @property
    def state(self) -> BreakerState:
        return self.breaker.state

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.usage.snapshot(),
            "breaker": self.breaker.state,
            "breaker_opened": self.breaker.times_opened,
        }

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_json(self, path: str) -> Any:
        return self.request_json("GET", path)

    def post_json(self, path: str, body: Any) -> Any:
        return self.request_json("POST", path, body)

    def post_raw(self, path: str, body: Any, accept: str) -> httpx.Response:
        """POST a JSON body asking for `accept`; the successful response as it came (the caller decodes it by
        its content type), with the same retries and breaker as `request_json`."""
        return self.request_json("POST", path, body, accept=accept)

    def _wait_for_breaker(self, waiting_since: float | None, path: str, last_error: str) -> float | None:
        """Block until the breaker lets a request through; returns when this call started waiting."""
        while not self.breaker.allow():
            now = time.monotonic()
            waiting_since = now if waiting_since is None else waiting_since
            if now - waiting_since >= self.max_wait_s:
                raise TeacherUnavailable(
                    f"teacher {self.base_url} unavailable: waited {now - waiting_since:.1f}s "
                    f"(max_wait_s={self.max_wait_s}) with the circuit breaker open for {path}; "
                    f"last error: {last_error}. Check that the teacher is up and reachable, "
                    f"or raise teacher.max_wait_s."
                )
            left = self.max_wait_s - (now - waiting_since)
            time.sleep(max(0.005, min(self.breaker.seconds_until_probe() or 0.02, 0.25, left)))
        return waiting_since

    def request_json(self, method: str, path: str, body: Any = None, accept: str | None = None) -> Any:
        """Send one request, retrying transient failures; return the decoded JSON body (with `accept`: the
        `httpx.Response` itself, sent with that `Accept` header)."""
        attempt = 0  # retries spent while the breaker was closed
        # One key for every attempt of this request: a server that answered an attempt whose reply was lost (its
        # replica died before the answer left) can tell the retry is the same request (a managed teacher's
        # usage ledger counts it once). Other servers ignore the header.
        headers = {IDEMPOTENCY_HEADER: uuid.uuid4().hex} | ({} if accept is None else {"Accept": accept})
        waiting_since: float | None = None
        last_error = "none"
        first = True
        while True:
            waiting_since = self._wait_for_breaker(waiting_since, path, last_error)
            self.usage.add(requests=1, retries=0 if first else 1)
            first = False
            retry_after: float | None = None
            busy = False
            t0 = time.monotonic()
            try:
                with self._slots:
                    resp = self._http.request(method, path, json=body, headers=headers)
            except httpx.TimeoutException as err:
                last_error = f"timed out after {self.timeout_s}s ({type(err).__name__})"
            except httpx.RequestError as err:  # connection, protocol, decoding errors
                last_error = f"{type(err).__name__}: {err}"
            else:
                if resp.status_code < 400:
                    self.breaker.record_success()
                    self.usage.record_latency(time.monotonic() - t0)
                    if accept is not None:
                        return resp
                    try:
                        return resp.json()
                    except ValueError:
                        raise TeacherResponseError(
                            f"teacher {self.base_url}{path} returned a body that is not JSON "
                            f"({len(resp.content)} bytes, content-type {resp.headers.get('content-type')!r})"
                        ) from None
                if resp.status_code != 429 and resp.status_code < 500:
                    # The server is alive and says our request is wrong: not a breaker failure.
                    self.breaker.record_success()
                    log.warning("teacher %s%s: %s: %s", self.base_url, path, status_text(resp.status_code),
                                resp.text[:500])
                    raise TeacherRequestError(f"{self.base_url}{path}", resp.status_code, resp.text)
                last_error = status_text(resp.status_code)
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
                busy = resp.status_code == 429
            self.usage.add(failures=1)
            if busy:
                # 429: the server is alive but busy; back off without counting it against the breaker.
                self.breaker.record_success()
            else:
                self.breaker.record_failure()
            if self.breaker.state != "closed":
                continue  # the next iteration waits for the breaker's probe (up to max_wait_s)
            if attempt >= self.max_retries and self.wait_when_down:
                self.breaker.trip()  # retries spent: degraded, wait for a probe (up to max_wait_s)
                continue
            if attempt >= self.max_retries:
                raise TeacherUnavailable(
                    f"teacher {self.base_url}{path} failed after {attempt + 1} attempts "
                    f"(max_retries={self.max_retries}); last error: {last_error}"
                )
            delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self._rng)
            if retry_after is not None:
                delay = min(max(delay, retry_after), self.max_wait_s)
            attempt += 1
            time.sleep(delay)

"""Readiness: can this API serve its purpose right now? (`/healthz` only says the process answers.)

A probe asks the database (one `SELECT 1`) and the launcher (for Ray: the cluster answers a call) and
keeps the answer with its time; `GET /readyz` is 200 when the last answer is recent and clean, else 503
with the reasons. The probe runs in its own thread (`readiness_interval_s`), so a Ray connection that
hangs (a wrong auth token makes `ray.init` retry for minutes) turns into "no answer for N s" instead of
a hung request. Interval 0: the probe runs inside the request (tests).
"""

from __future__ import annotations

import threading
import time
from typing import Any


class Readiness:
    def __init__(self, store: Any, launcher: Any, interval_s: float) -> None:
        self.store, self.launcher, self.interval_s = store, launcher, interval_s
        self._lock = threading.Lock()
        self._last: tuple[float, list[str]] | None = None  # (monotonic time, reasons)
        self._asking: tuple[str, float] | None = None  # what the probe waits on now, since when

    def probe(self) -> list[str]:
        """Check the database and the cluster now; the reasons for not being ready (none: ready)."""
        reasons = []
        self._asking = ("database", time.monotonic())
        try:
            self.store.ping()
        except Exception as err:  # noqa: BLE001 -- reported, not raised
            reasons.append(f"database: {type(err).__name__}")
        self._asking = ("ray", time.monotonic())
        problem = self.launcher.ready()
        if problem:
            reasons.append(f"ray: {problem}")
        self._asking = None
        with self._lock:
            self._last = (time.monotonic(), reasons)
        return reasons

    def state(self) -> tuple[bool, list[str]]:
        """(ready, reasons) from the last probe (or a probe now, without a probe thread)."""
        if self.interval_s <= 0:
            reasons = self.probe()
            return not reasons, reasons
        with self._lock:
            last = self._last
        asking, now = self._asking, time.monotonic()
        stale = max(10.0, 5 * self.interval_s)
        if asking is not None and now - asking[1] > stale:
            return False, [f"{asking[0]}: no answer for {now - asking[1]:.0f}s"]
        if last is None:
            return False, ["starting: no readiness probe has finished yet"]
        if now - last[0] > stale:
            return False, [f"no readiness probe has finished for {now - last[0]:.0f}s"]
        return not last[1], list(last[1])

"""Readiness: can this API serve its purpose right now? (`/healthz` only says the process answers.)

Ready also needs the reconciler's first pass since start-up: before it, a record may hold the step it
had when the previous API process died. A probe asks the database (a read of the runs table, as the
API's reads do) and the launcher (for Ray: the cluster answers a call) and
keeps the answer with its time; `GET /readyz` is 200 when the last answer is recent and clean, else 503
with the reasons. The probe runs in its own thread (`readiness_interval_s`), so a Ray connection that
hangs (a wrong auth token makes `ray.init` retry for minutes) turns into "no answer for N s" instead of
a hung request. Interval 0: the probe runs inside the request (tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Readiness:
    def __init__(self, store: Any, launcher: Any, interval_s: float,
                 reconciled: Callable[[], bool] = lambda: True) -> None:
        """`reconciled()`: whether the reconciler has finished a pass since start-up (until then the records
        hold what they held when the previous API process died, e.g. a step 20 behind)."""
        self.store, self.launcher, self.interval_s, self.reconciled = store, launcher, interval_s, reconciled
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
        """(ready, reasons): the reconciler has made its first pass, and the last probe (or a probe now, without
        a probe thread) found the database and the cluster answering."""
        ready, reasons = self._probed()
        if not self.reconciled():
            stale = "starting: the reconciler has not finished its first pass, so run records may be stale"
            return False, [stale, *reasons]
        return ready, reasons

    def _probed(self) -> tuple[bool, list[str]]:
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

"""`Periodic`: call a function every few seconds in a daemon thread (the reconciler and scheduler loops)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls `fn` at once, then every `interval_s` until `close()`; an exception is logged, the loop goes on."""

    def __init__(self, name: str, fn: Callable[[], None], interval_s: float):
        self.name = name
        self.fn = fn
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.fn()
            except Exception:
                log.exception("%s failed", self.name)
            self._stop.wait(self.interval_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

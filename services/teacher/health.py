"""Readiness of the teacher service: does its engine still score?

The server listens only once the engine has loaded, but an engine can die later (a crashed worker, a lost
GPU, a remote model behind it gone). `EngineHealth.check` answers from the last engine call that succeeded,
if it is recent (`fresh_s`: real traffic proves it); otherwise it scores a one-token probe through the same
queue and engine, with a timeout. A full queue is not a dead engine as long as calls keep finishing.
"""

from __future__ import annotations

import asyncio
import time

from onpolicy.types import ScoreRequestItem
from services.teacher.batcher import QueueFull, ScoreBatcher

FRESH_S = 10.0
PROBE_TIMEOUT_S = 30.0


class EngineHealth:
    def __init__(self, batcher: ScoreBatcher, token_id: int, fresh_s: float = FRESH_S,
                 timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.batcher, self.fresh_s, self.timeout_s = batcher, fresh_s, timeout_s
        self.probe = [ScoreRequestItem(prompt_ids=[token_id], completion_ids=[token_id])]
        self.last_ok: float | None = None  # monotonic time of the last engine call that succeeded

    def note_ok(self, *_: object) -> None:
        """An engine call succeeded (the batcher's `on_batch` hook)."""
        self.last_ok = time.monotonic()

    def _recent(self, within_s: float) -> bool:
        return self.last_ok is not None and time.monotonic() - self.last_ok < within_s

    async def check(self) -> str | None:
        """None when the engine scores, else why not (one line)."""
        if self._recent(self.fresh_s):
            return None
        try:
            await asyncio.wait_for(self.batcher.score(self.probe, 0), timeout=self.timeout_s)
        except QueueFull:
            return None if self._recent(6 * self.fresh_s) else "the queue is full and no engine call has " \
                                                                 f"finished for {6 * self.fresh_s:.0f}s"
        except asyncio.TimeoutError:
            return f"the engine did not score a one-token probe within {self.timeout_s:.0f}s"
        except Exception as err:  # noqa: BLE001 -- the reason, not a 500
            return f"the engine failed a one-token probe ({type(err).__name__})"
        self.note_ok()
        return None

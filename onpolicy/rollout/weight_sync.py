"""How a run's weight pushes reach its engines: by broadcast over a collective group when `rollout.weight_sync`
allows it, else through the object store (see `pool.py`).

A fault breaks the group (a restarted worker or learner is a new process, outside it; a broadcast cut short
leaves it unusable), so the run pushes through the object store until the group is formed again: that
happens at the next push, from the driver's own thread, when no broadcast is in flight (the engines take
the new group's set-up call after the sampling they are doing), not for the rest of the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from onpolicy.rollout.pool import open_collective, push_collective_async, push_weights_async


@dataclass
class Push:
    """A push in flight: the versions each worker will report, how it went, and (a broadcast) the learner's
    side, whose failure would otherwise leave the engines waiting for bytes that never come."""

    worker_refs: list[Any] = field(default_factory=list)
    by: str = "object_store"
    learner_ref: Any = None


class WeightSync:
    """The push path of one run: `open` forms the group, `leave` drops to the object store after a fault,
    `push` sends the learner's current weights (forming the group again first if a fault broke it)."""

    def __init__(self, mode: str, lora: bool, log: Callable[[str], None] = lambda _: None) -> None:
        # A LoRA student pushes only its adapter, through the object store.
        self.allowed = mode != "object_store" and not lora
        self.required = mode == "collective" and not lora
        self.collective = False
        self._again = False  # the group was broken by a fault: form it again at the next push
        self.log = log

    def open(self, learner: Any, workers: list[Any]) -> bool:
        """Form the broadcast group (learner rank 0 + every engine); `auto` falls back to the object store when it
        cannot be formed, `collective` raises."""
        self._again = False
        if not self.allowed:
            return False
        try:
            open_collective(learner, workers)
            self.collective = True
        except Exception:
            if self.required:
                raise
            self.collective = False
        return self.collective

    def leave(self, why: str) -> None:
        """A fault broke the group: push through the object store until it is formed again (next push)."""
        if self.collective:
            self.collective = False
            self._again = True
            self.log(f"weight sync: object store until the group is formed again ({why})")

    def push(self, learner: Any, workers: list[Any]) -> Push:
        """Queue the learner's current weights on every worker (behind their sampling in flight)."""
        if self._again and self.open(learner, workers):
            self.log("weight sync: collective again")
        if self.collective:
            learner_ref, refs = push_collective_async(learner, workers)
            return Push(refs, "collective", learner_ref)
        return Push(push_weights_async(learner.weight_update.remote(), workers), "object_store")

"""A run's status: one vocabulary (`RunStatus`) for the library, the run actor, the control plane's
database and API, and the Prometheus gauges; kept in `<output_dir>/status.json` so anything (a
person, the control plane) can read where a run stands without talking to its driver.

The driver writes `starting`, `running`, `degraded` (the teacher is unreachable and scoring is
paused; the run waits instead of failing), `finished`, `stopped`, `paused`, `failed` (with a
`reason`); the control plane adds `queued`, `stopping` and `pausing` around them.
"""

from __future__ import annotations

import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Any


class RunStatus(str, Enum):
    """Where a run stands. Members are strings (`RunStatus.RUNNING == "running"`), so they go into
    JSON, SQL and Prometheus labels as their value."""

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    STOPPING = "stopping"
    PAUSING = "pausing"
    PAUSED = "paused"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"

    # Hash and print as the plain string, so "running" and RunStatus.RUNNING are the same set member.
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


# A driver exists (or is being launched) for the run.
ACTIVE = frozenset({RunStatus.STARTING, RunStatus.RUNNING, RunStatus.DEGRADED, RunStatus.STOPPING,
                    RunStatus.PAUSING})
# The run has left its loop for good (until a resume).
TERMINAL = frozenset({RunStatus.FINISHED, RunStatus.STOPPED, RunStatus.PAUSED, RunStatus.FAILED})
# What `resume` accepts: every terminal status (a finished run can be trained further).
RESUMABLE = TERMINAL


def write_status(out_dir: str | Path, status: RunStatus | str, *, step: int, reason: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    record = {"status": RunStatus(status).value, "step": step, "reason": reason, "updated": time.time(), **extra}
    path = Path(out_dir) / "status.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # atomic: readers never see half a file
    return record


def read_status(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else None

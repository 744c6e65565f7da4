"""A run's status, kept in `<output_dir>/status.json` so anything (a person, the control plane)
can read where a run stands without talking to its driver.

Statuses: `starting`, `running`, `degraded` (the teacher is unreachable and scoring is paused;
the run waits instead of failing), `finished`, `stopped`, `failed` (with `reason`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

Status = Literal["starting", "running", "degraded", "finished", "stopped", "failed"]


def write_status(out_dir: str | Path, status: Status, *, step: int, reason: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    record = {"status": status, "step": step, "reason": reason, "updated": time.time(), **extra}
    path = Path(out_dir) / "status.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # atomic: readers never see half a file
    return record


def read_status(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else None

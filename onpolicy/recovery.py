"""What the driver needs to come back from a failure: which checkpoint to trust, and fault counts.

`restore_checkpoint` walks the run's checkpoints newest first, skips any folder that is not whole
(no completion marker, a missing or short file: `learner.checkpoint.damage`) or that fails to load,
and returns the first that loads, with the driver state saved in it. A resume with nothing to
restore is an error (`NoCheckpoint`), never a silent fresh start.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onpolicy.learner.checkpoint import whole_checkpoints

DRIVER_STATE = "driver_state.json"


class NoCheckpoint(FileNotFoundError):
    """A resume found no checkpoint it could load."""


class TooManyRestarts(RuntimeError):
    """An actor died more often than the run allows."""


@dataclass
class Restored:
    path: Path
    state: dict[str, Any]  # the driver's state at that checkpoint: step, prompts_drawn
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer folders not trusted, and why


def restore_checkpoint(root: Path, load: Callable[[str], Any]) -> Restored | None:
    """Load the newest whole checkpoint under `root` with `load(path)`; None if there is none."""
    skipped: list[tuple[Path, str]] = []
    for path, problem in whole_checkpoints(root):
        if problem is None:
            try:
                state = json.loads((path / DRIVER_STATE).read_text())
                load(str(path))
                return Restored(path, state, skipped)
            except Exception as err:  # noqa: BLE001 -- a folder that does not load is skipped, with the reason
                problem = f"does not load: {type(err).__name__}: {str(err)[:300]}"
        skipped.append((path, problem))
    if skipped:
        raise NoCheckpoint(
            f"no checkpoint under {root} can be loaded: "
            + "; ".join(f"{p.name}: {why}" for p, why in skipped)
        )
    return None


def _none_to_resume(out_dir: Path) -> NoCheckpoint:
    return NoCheckpoint(
        f"--resume: no checkpoint in {out_dir / 'checkpoints'}. Start without --resume for a fresh run, "
        "or set output_dir to the run you meant to resume."
    )


def check_resumable(out_dir: Path) -> None:
    """Before any engine starts: a resume needs at least one whole checkpoint folder."""
    if not any(problem is None for _, problem in whole_checkpoints(out_dir / "checkpoints")):
        raise _none_to_resume(out_dir)


def require_restored(restored: Restored | None, out_dir: Path) -> Restored:
    if restored is None:
        raise _none_to_resume(out_dir)
    return restored


@dataclass
class FaultCounts:
    """Actors that died and were brought back in this run, by role (logged with every train step)."""

    rollout: int = 0
    learner: int = 0

    def metrics(self) -> dict[str, int]:
        return {"restarts_rollout": self.rollout, "restarts_learner": self.learner}

"""Per-step metrics: one JSON line per record in the run directory, and a console progress bar.

Records carry a `kind` (`train`, `eval`, or `fault`: an actor died and was brought back) so one file
holds the whole time series and a reader (the report, the control plane) can filter it. A run that
goes back to a checkpoint (a resume, a learner restart) first `rewind`s the file, so every step's
train and eval records appear once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from onpolicy.trackers import Tracker


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to `path` (JSONL), hands each to the experiment `trackers` (see `onpolicy.trackers`),
    and shows a progress bar on stderr."""

    def __init__(self, path: str | Path, total_steps: int, *, show_progress: bool = True, start_step: int = 0,
                 trackers: list[Tracker] | None = None):
        self.path = Path(path)
        self.trackers = list(trackers or [])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # faults are logged from the driver's sampler threads
        drop_torn_tail(self.path)
        self._file = self.path.open("a", buffering=1)
        self._bar = None
        if show_progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="distill", file=sys.stderr,
                             dynamic_ncols=True)

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"kind": kind, "step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(kind, step, record)
        return record

    def train(self, step: int, metrics: dict[str, Any]) -> None:
        self.write("train", step, metrics)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                teacher_kl=f"{metrics.get('teacher_kl', float('nan')):.4f}",
                tok_s=f"{metrics.get('tokens_per_second', 0.0):.0f}",
                refresh=False,
            )

    def eval(self, step: int, metrics: dict[str, Any]) -> None:
        self.write("eval", step, metrics)
        line = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        self.message(f"[eval step {step}] {line}")

    def fault(self, step: int, event: dict[str, Any]) -> None:
        """An actor died and was brought back (who, what was done, how long it took)."""
        self.write("fault", step, event)
        self.message(f"[fault step {step}] " + "  ".join(f"{k}={v}" for k, v in event.items()))

    def rewind(self, step: int) -> int:
        """Drop the train and eval records after `step` (the run went back to the checkpoint of `step`, and
        will log those steps again); fault records stay. Returns how many records were dropped."""
        with self._lock:
            self._file.close()
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            keep = [ln for ln in lines if (rec := _parse(ln)) is not None and not _after(rec, step)]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)
            self._file = self.path.open("a", buffering=1)
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()
        return sum(1 for ln in lines if ln.strip()) - len(keep)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _after(record: dict[str, Any], step: int) -> bool:
    return record.get("kind") in ("train", "eval") and record.get("step", 0) > step


def _parse(line: str) -> dict[str, Any] | None:
    """The record on `line`, or None for a blank or torn one (a crash or a full disk mid-write)."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that was never finished (no newline, not JSON), so the next record starts a line of
    its own instead of being glued to the torn one; a whole record that only lacks its newline gets one."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        start = f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        if tail.endswith(b"\n") or (b"\n" not in tail and start > 0):
            return  # whole, or a "line" longer than any record: not ours to cut
        cut = tail.rfind(b"\n") + 1
        if _parse(tail[cut:].decode(errors="replace")) is not None:
            f.write(b"\n")
        else:
            f.truncate(size - (len(tail) - cut))


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl (of `kind` if given); a torn line is skipped, not an error."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(errors="replace").splitlines():
        rec = _parse(line)
        if rec is not None and (kind is None or rec.get("kind") == kind):
            out.append(rec)
    return out


def first_record(path: str | Path, kind: str) -> dict[str, Any] | None:
    """The values of the first record of `kind` (without kind, step, time), or None: a resumed run's "before"."""
    records = read_metrics(path, kind=kind)
    if not records:
        return None
    return {k: v for k, v in records[0].items() if k not in ("kind", "step", "time")}

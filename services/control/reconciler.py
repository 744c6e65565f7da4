"""Keeps run records fresh, so the API's reads come from the database alone.

Every `reconcile_interval_s` (a background thread; once at start-up) `Reconciler.tick()` takes
each run the database holds in an active status (a query by status, no cap), reads its
status.json and the tail of its metrics.jsonl, asks the launcher which drivers exist (one call
for all runs), and writes what changed into the record. It also removes the drivers of runs
that are over (or whose record was deleted).

The rules are pure functions: `reconcile_status` (the status a record takes given the file and
whether a driver exists) and `observe` (every field that changes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from onpolicy.status import ACTIVE, TERMINAL, RunStatus, read_status
from services.control.db import RunRecord, Store
from services.control.launcher import Launcher

log = logging.getLogger(__name__)
LAUNCH_GRACE_S = 120.0  # a launch this recent may not have registered its actor yet
DRIVER_LOST = "driver lost: no driver actor on the cluster and no final status in status.json"


def reconcile_status(db_status: RunStatus, file: dict[str, Any] | None, alive: bool | None,
                     launching_for_s: float | None = None) -> tuple[RunStatus, str | None] | None:
    """The (status, reason) a record should take, or None to leave it as it is.

    A record the DB calls active whose driver is gone and whose file is not terminal failed with
    "driver lost", unless its launch began less than LAUNCH_GRACE_S ago (`launching_for_s`).
    """
    if db_status not in ACTIVE:
        return None
    raw = (file or {}).get("status")
    file_status = RunStatus(raw) if raw in RunStatus._value2member_map_ else None
    if db_status == RunStatus.PAUSING and file_status == RunStatus.STOPPED:
        # a run stopped for a pause writes `paused`; `stopped` means the stop came first: wait for the actor
        return (RunStatus.PAUSED, "paused") if alive is False else None
    if file_status in TERMINAL:
        return file_status, (file or {}).get("reason")
    if alive is False:
        if launching_for_s is not None and launching_for_s < LAUNCH_GRACE_S:
            return None
        return RunStatus.FAILED, DRIVER_LOST
    if db_status in (RunStatus.STOPPING, RunStatus.PAUSING):
        return None
    if file_status in (RunStatus.RUNNING, RunStatus.DEGRADED) and file_status != db_status:
        return file_status, (file or {}).get("reason")
    return None


def last_train_record(path: Path, tail_bytes: int = 65536) -> dict[str, Any] | None:
    """The last `kind=train` line of metrics.jsonl (reads only the end of the file)."""
    if not path.exists():
        return None
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail_bytes))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "train":
            return rec
    return None


def observe(rec: RunRecord, file: dict[str, Any] | None, last: dict[str, Any] | None, alive: bool | None,
            now: float) -> dict[str, Any]:
    """The fields of `rec` to update given its status.json (`file`), its last train record and whether its
    driver exists; {} when nothing changed."""
    fields: dict[str, Any] = {}
    step = max(int((file or {}).get("step") or 0), int(last["step"]) if last else 0)
    if step != rec.step:
        fields["step"] = step
    if last is not None and (rec.latest_metrics or {}).get("step") != last.get("step"):
        fields["latest_metrics_json"] = json.dumps(last)
        if last.get("policy_version") is not None:
            fields["policy_version"] = int(last["policy_version"])
    launching = None if rec.launch_began is None else now - rec.launch_began
    change = reconcile_status(rec.status, file, alive, launching)
    if change is not None:
        fields["status"], fields["reason"] = change
        if change[0] in TERMINAL:
            fields["ended"] = now
    return fields


class Reconciler:
    def __init__(self, store: Store, launcher: Launcher):
        self.store = store
        self.launcher = launcher

    def refresh(self, rec: RunRecord, alive: bool | None | str = "ask") -> RunRecord:
        """Bring an active record up to date with its run directory and driver; return the new record."""
        if rec.status not in ACTIVE:
            return rec
        out = Path(rec.output_dir)
        if alive == "ask":
            alive = self.launcher.is_alive(rec.id)
        fields = observe(rec, read_status(out), last_train_record(out / "metrics.jsonl"), alive, time.time())
        if fields and self.store.update_run(rec.id, expect=(rec.status,), **fields):
            return self.store.get_run(rec.id) or rec
        return rec

    def tick(self) -> None:
        # Records first, drivers second: a launch that ends in between is then seen alive, not lost.
        records = self.store.runs_in(ACTIVE)
        live = self.launcher.live_run_ids()
        for rec in records:
            try:
                self.refresh(rec, alive=None if live is None else rec.id in live)
            except Exception:  # one unreadable run directory must not leave the others stale
                log.exception("could not refresh run %s", rec.id)
        for run_id in live or ():
            rec = self.store.get_run(run_id)
            if rec is None or rec.status in TERMINAL:
                try:
                    self.launcher.reap(run_id)
                except Exception as err:  # noqa: BLE001 -- retried next tick
                    log.warning("could not remove the driver of run %s: %s", run_id, err)

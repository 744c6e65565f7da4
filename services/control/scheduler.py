"""Admission (start now or queue), status refresh and reconciliation with the cluster.

- `reconcile_status` is the pure rule: what a record's status becomes given status.json and
  whether a driver exists. A record the DB calls active whose driver is gone and whose file is
  not terminal failed with "driver lost".
- `Scheduler.tick()` (a background thread every `scheduler_interval_s`, and once at start-up)
  refreshes active runs, removes drivers of finished runs and starts queued runs in FIFO order
  while they fit. With several API replicas the DB is the lock: a queued run is started only by
  the replica whose `UPDATE ... WHERE status='queued'` matched.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from onpolicy.runner import required_cpus
from onpolicy.status import ACTIVE, TERMINAL, RunStatus, read_status, write_status
from services.control.db import RunRecord, Store
from services.control.launcher import Launcher, LaunchError

log = logging.getLogger(__name__)
LAUNCH_GRACE_S = 120.0  # a run claimed this recently may not have its actor registered yet
LAUNCHING = "launching the driver actor"


def reconcile_status(db_status: RunStatus, file: dict[str, Any] | None, alive: bool | None,
                     launching_for_s: float | None = None) -> tuple[RunStatus, str | None] | None:
    """The (status, reason) a record should take, or None to leave it as it is."""
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
        return RunStatus.FAILED, "driver lost: no driver actor on the cluster and no final status in status.json"
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


class Scheduler:
    def __init__(self, store: Store, launcher: Launcher, max_concurrent_runs: int):
        self.store = store
        self.launcher = launcher
        self.max_concurrent_runs = max_concurrent_runs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    # ---- refresh ---------------------------------------------------------------------------
    def refresh(self, rec: RunRecord, alive: bool | None | str = "ask") -> RunRecord:
        """Bring an active record up to date with its run directory and driver; return the new record."""
        if rec.status not in ACTIVE:
            return rec
        out = Path(rec.output_dir)
        file = read_status(out)
        fields: dict[str, Any] = {}
        last = last_train_record(out / "metrics.jsonl")
        step = max(int((file or {}).get("step") or 0), int(last["step"]) if last else 0)
        if step != rec.step:
            fields["step"] = step
        if last is not None and (rec.latest_metrics or {}).get("step") != last.get("step"):
            fields["latest_metrics_json"] = json.dumps(last)
            if last.get("policy_version") is not None:
                fields["policy_version"] = int(last["policy_version"])
        if alive == "ask":
            alive = self.launcher.is_alive(rec.id)
        launching = time.time() - (rec.started or rec.created) if rec.reason == LAUNCHING else None
        change = reconcile_status(rec.status, file, alive, launching)
        if change is not None:
            fields["status"], fields["reason"] = change
            if change[0] in TERMINAL:
                fields["ended"] = time.time()
        if fields:
            self.store.update_run(rec.id, expect=(rec.status,), **fields)
            return self.store.get_run(rec.id) or rec
        return rec

    # ---- admission -------------------------------------------------------------------------
    def wait_reason(self, rec: RunRecord) -> str | None:
        """Why `rec` cannot start now (None: it fits)."""
        active = self.store.count_active()
        if active >= self.max_concurrent_runs:
            return f"queued: {active} of max_concurrent_runs={self.max_concurrent_runs} runs active"
        need = required_cpus(rec.config)
        free = self.launcher.free_cpus()
        if need > 0 and free is not None and free < need:
            return f"queued: needs {need:g} CPUs, the cluster has {free:g} free"
        return None

    def try_start(self, rec: RunRecord) -> RunRecord:
        """Start a queued run if it fits (else record why it waits); return the new record."""
        reason = self.wait_reason(rec)
        if reason is not None:
            if reason != rec.reason:
                self.store.update_run(rec.id, expect=(RunStatus.QUEUED,), reason=reason)
            return self.store.get_run(rec.id) or rec
        if not self.store.claim_queued(rec.id, reason=LAUNCHING):
            return self.store.get_run(rec.id) or rec  # another replica took it, or it was stopped
        cfg = rec.config
        Path(rec.output_dir).mkdir(parents=True, exist_ok=True)
        write_status(rec.output_dir, RunStatus.STARTING, step=rec.step)  # a stale final status must not win
        try:
            self.launcher.submit(rec.id, cfg, resume=bool(rec.resume))
            self.store.update_run(rec.id, expect=(RunStatus.STARTING,), reason=None)
        except LaunchError as err:
            write_status(rec.output_dir, RunStatus.FAILED, step=rec.step, reason=str(err))
            self.store.update_run(rec.id, status=RunStatus.FAILED, reason=str(err), ended=time.time())
        return self.store.get_run(rec.id) or rec

    # ---- the loop --------------------------------------------------------------------------
    def tick(self) -> None:
        with self._tick_lock:
            live = self.launcher.live_run_ids()
            for rec in self.store.list_runs():
                if rec.status in ACTIVE:
                    alive = None if live is None else rec.id in live
                    self.refresh(rec, alive=alive)
            if live:
                for run_id in live:
                    rec = self.store.get_run(run_id)
                    if rec is None or rec.status in TERMINAL:
                        try:
                            self.launcher.reap(run_id)
                        except Exception as err:  # noqa: BLE001 -- retried next tick
                            log.warning("could not remove the driver of run %s: %s", run_id, err)
            for rec in self.store.list_runs(status=RunStatus.QUEUED):
                rec = self.try_start(rec)
                if rec.status == RunStatus.QUEUED:
                    break  # FIFO: later runs wait behind the first that does not fit

    def _loop(self, interval_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.tick()  # the first tick, at once, is the start-up reconciliation
            except Exception:
                log.exception("scheduler tick failed")
            self._stop.wait(interval_s)

    def start(self, interval_s: float) -> None:
        if interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True,
                                            name="control-scheduler")
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

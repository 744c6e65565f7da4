"""Keeps run records fresh, so the API's reads come from the database alone.

Every `reconcile_interval_s` (a background thread; once at start-up) `Reconciler.tick()` takes
each run the database holds in an active status (a query by status, no cap), reads its
status.json and the tail of its metrics.jsonl, asks the launcher which drivers exist (one call
for all runs) and what each live driver says of itself, and writes what changed into the record.
It also removes the drivers of runs that are over (or whose record was deleted), and:

- a launch that has been going on past the grace (`launch_grace_s`, timed on this process's monotonic
  clock from when it first saw the launch, so a wall clock that steps does not stretch or cut it) and is
  not in progress here is over: its mark is cleared (a driver that exists gets the stop recorded while it
  launched), or the run is lost;
- a stop or pause recorded while nobody could deliver it (the API died in between) is delivered;
- a driver that says it ended (its `train()` failed and writing status.json failed too) ends the record;
- `kind=fault` records of metrics.jsonl (an actor died and was brought back) join the run's history.

Every reason shown to clients goes through `redact` (no data values). The rules are pure functions:
`reconcile_status` (the status a record takes given the file, the driver, and whether it exists) and
`observe` (every field that changes).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from onpolicy.status import ACTIVE, TERMINAL, RunStatus, read_status
from services.control.db import RunRecord, Store
from services.control.launcher import Launcher
from services.control.redact import redact

log = logging.getLogger(__name__)
LAUNCH_GRACE_S = 120.0  # a launch this recent may not have registered its actor yet
DRIVER_LOST = "driver lost: no driver actor on the cluster and no final status in status.json"
FAULT_READ_BYTES = 4 << 20  # metrics.jsonl read per run and pass, looking for faults (the rest next pass)


def reconcile_status(db_status: RunStatus, file: dict[str, Any] | None, alive: bool | None,
                     launching_for_s: float | None = None, driver: dict[str, Any] | None = None,
                     grace_s: float = LAUNCH_GRACE_S) -> tuple[RunStatus, str | None] | None:
    """The (status, reason) a record should take, or None to leave it as it is.

    A record the DB calls active whose driver is gone and whose file is not terminal failed with
    "driver lost", unless its launch began less than `grace_s` ago (`launching_for_s`). A live driver
    that says it ended (`driver`: its `state()`) ends the record even if status.json never said so.
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
    phase = (driver or {}).get("phase")
    if alive and phase in TERMINAL:
        return RunStatus(phase), (driver or {}).get("error") or f"the driver ended {phase} without saying so in " \
                                                               "status.json"
    if alive is False:
        if launching_for_s is not None and launching_for_s < grace_s:
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
        if isinstance(rec, dict) and rec.get("kind") == "train":
            return rec
    return None


def fault_text(rec: dict[str, Any]) -> str:
    """One line for a `kind=fault` record: what died and what was done (values redacted like a reason)."""
    fields = {k: v for k, v in rec.items() if k not in ("kind", "step", "time")}
    return redact("fault: " + ", ".join(f"{k}={v}" for k, v in fields.items())) or "fault"


def observe(rec: RunRecord, file: dict[str, Any] | None, last: dict[str, Any] | None, alive: bool | None,
            now: float, launching_for_s: float | None = None, driver: dict[str, Any] | None = None,
            grace_s: float = LAUNCH_GRACE_S) -> dict[str, Any]:
    """The fields of `rec` to update given its status.json (`file`), its last train record, whether its
    driver exists and what it says; {} when nothing changed."""
    fields: dict[str, Any] = {}
    step = max(int((file or {}).get("step") or 0), int(last["step"]) if last else 0)
    if step != rec.step:
        fields["step"] = step
    if last is not None and (rec.latest_metrics or {}).get("step") != last.get("step"):
        fields["latest_metrics_json"] = json.dumps(last)
        if last.get("policy_version") is not None:
            fields["policy_version"] = int(last["policy_version"])
    change = reconcile_status(rec.status, file, alive, launching_for_s, driver, grace_s)
    if change is not None:
        fields["status"], fields["reason"] = change[0], redact(change[1])
        if change[0] in TERMINAL:
            fields["ended"] = now
            fields["launch_began"] = None
    if rec.launch_began is not None and alive and launching_for_s is not None and launching_for_s >= grace_s:
        fields["launch_began"] = None  # the launcher died before it could clear it: the driver is up
    return fields


class Reconciler:
    def __init__(self, store: Store, launcher: Launcher, launch_grace_s: float = LAUNCH_GRACE_S):
        self.store = store
        self.launcher = launcher
        self.launch_grace_s = launch_grace_s
        self.passes = 0  # finished ticks (readiness waits for the first)
        self.in_flight: set[str] = set()  # runs this process is launching now (the scheduler adds them)
        self._launch_seen: dict[tuple[str, float], float] = {}  # (run, launch_began) -> monotonic first sight
        self._fault_offsets: dict[str, int] = {}
        self._fault_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def launching_for(self, rec: RunRecord) -> float | None:
        """Seconds (monotonic, this process) since the record's launch began, as far as this process knows."""
        if rec.launch_began is None:
            return None
        if rec.id in self.in_flight:
            return 0.0
        with self._lock:
            first = self._launch_seen.setdefault((rec.id, rec.launch_began), time.monotonic())
        return time.monotonic() - first

    def refresh(self, rec: RunRecord, alive: bool | None | str = "ask") -> RunRecord:
        """Bring an active record up to date with its run directory and driver; return the new record."""
        if rec.status not in ACTIVE:
            return rec
        out = Path(rec.output_dir)
        if alive == "ask":
            alive = self.launcher.is_alive(rec.id)
        launching = self.launching_for(rec)
        settled = launching is None or launching >= self.launch_grace_s
        driver = self.launcher.driver_state(rec.id) if alive and settled else None
        fields = observe(rec, read_status(out), last_train_record(out / "metrics.jsonl"), alive, time.time(),
                         launching, driver, self.launch_grace_s)
        if fields and not self.store.update_run(rec.id, expect=(rec.status,), **fields):
            return self.store.get_run(rec.id) or rec
        new = (self.store.get_run(rec.id) or rec) if fields else rec
        if new.status in (RunStatus.STOPPING, RunStatus.PAUSING) and alive and new.launch_began is None \
                and driver is not None and not driver.get("stop_requested") and not driver.get("done"):
            # recorded, never delivered (the API went away in between, or the launch that was to hand it over)
            self.launcher.request_stop(rec.id, pause=new.status == RunStatus.PAUSING)
        return new

    def collect_faults(self, rec: RunRecord) -> None:
        """Add the run's new `kind=fault` metrics records to its history (each once, by its time)."""
        path = Path(rec.output_dir) / "metrics.jsonl"
        if not path.exists():
            return
        offset = self._fault_offsets.get(rec.id, 0)
        if rec.id not in self._fault_until:
            self._fault_until[rec.id] = self.store.last_fault_time(rec.id) or 0.0
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < offset:  # rewound to a checkpoint: faults stay in the file; read again, skip the seen ones
                offset = 0
            f.seek(offset)
            chunk = f.read(FAULT_READ_BYTES)
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written is read next pass
        self._fault_offsets[rec.id] = offset + len(complete)
        faults = []
        for line in complete.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a torn line (crash, full disk)
            if isinstance(item, dict) and item.get("kind") == "fault" and \
                    float(item.get("time") or 0) > self._fault_until[rec.id]:
                faults.append((fault_text(item), int(item.get("step") or 0), float(item["time"])))
        if faults:
            self.store.add_faults(rec.id, faults)
            self._fault_until[rec.id] = max(t for _, _, t in faults)

    def tick(self) -> None:
        # Records first, drivers second: a launch that ends in between is then seen alive, not lost.
        records = self.store.runs_in(ACTIVE)
        live = self.launcher.live_run_ids()
        observed = []
        for rec in records:
            try:
                self.collect_faults(rec)
                self.refresh(rec, alive=None if live is None else rec.id in live)
                if live is not None:
                    observed.append(rec.id)
            except Exception:  # one unreadable run directory must not leave the others stale
                log.exception("could not refresh run %s", rec.id)
        self.store.mark_observed(observed, time.time())
        with self._lock:  # forget launches that are over
            launching = {(r.id, r.launch_began) for r in records if r.launch_began is not None}
            self._launch_seen = {k: v for k, v in self._launch_seen.items() if k in launching}
        for run_id in live or ():
            rec = self.store.get_run(run_id)
            if rec is None or rec.status in TERMINAL:
                try:
                    self.launcher.reap(run_id)
                except Exception as err:  # noqa: BLE001 -- retried next tick
                    log.warning("could not remove the driver of run %s: %s", run_id, err)
        self.passes += 1

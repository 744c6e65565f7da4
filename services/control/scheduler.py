"""Admission: start a queued run now, or record why it waits.

`Scheduler.tick()` (a background thread every `scheduler_interval_s`, and once at start-up) starts
queued runs in FIFO order while they fit; the reconciler keeps the active runs it counts fresh.
With several API replicas the DB is the lock: a queued run is started only by the replica whose
`UPDATE ... WHERE status='queued'` matched.

A launch takes a while (Ray may have to start a worker process for the driver actor), and a stop
or pause may come meanwhile: it is recorded as the status (`stopping`/`pausing`) and
handed to the driver here, once the launch returns. A launch that fails after the actor exists
removes the actor before the run is marked failed, so nothing trains unrecorded.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from onpolicy.run_actor import required_cpus
from onpolicy.status import TERMINAL, RunStatus, write_status
from services.control.db import RunRecord, Store
from services.control.launcher import Launcher, LaunchError
from services.control.reconciler import Reconciler
from services.control.redact import redact

log = logging.getLogger(__name__)
LAUNCHING = "launching the driver actor"


class Scheduler:
    def __init__(self, store: Store, launcher: Launcher, reconciler: Reconciler, max_concurrent_runs: int):
        self.store = store
        self.launcher = launcher
        self.reconciler = reconciler
        self.max_concurrent_runs = max_concurrent_runs

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
        self.reconciler.in_flight.add(rec.id)  # from before the claim: the reconciler must not call it stuck
        try:
            if not self.store.claim_queued(rec.id, reason=LAUNCHING, max_active=self.max_concurrent_runs):
                # another replica took it, it was stopped, or a concurrent claim took the last slot
                now = self.store.get_run(rec.id) or rec
                if now.status == RunStatus.QUEUED and (why := self.wait_reason(now)) and why != now.reason:
                    self.store.update_run(rec.id, expect=(RunStatus.QUEUED,), reason=why)
                return self.store.get_run(rec.id) or rec
            Path(rec.output_dir).mkdir(parents=True, exist_ok=True)
            write_status(rec.output_dir, RunStatus.STARTING, step=rec.step)  # a stale final status must not win
            try:
                self.launcher.submit(rec.id, rec.config, resume=bool(rec.resume))
            except LaunchError as err:
                self._launch_failed(rec, redact(str(err)) or "launch failed")
            else:
                self._launched(rec.id)
        finally:
            self.reconciler.in_flight.discard(rec.id)
        return self.store.get_run(rec.id) or rec

    def _launched(self, run_id: str) -> None:
        """The driver is up: clear the launch mark, and hand it a stop or pause that came meanwhile."""
        if not self.store.update_run(run_id, expect=(RunStatus.STARTING,), reason=None, launch_began=None):
            self.store.update_run(run_id, launch_began=None)
            rec = self.store.get_run(run_id)
            if rec is None or rec.status in TERMINAL:  # given up on (e.g. past the launch grace): not to train
                self.launcher.reap(run_id, force=True)
            elif rec.status in (RunStatus.STOPPING, RunStatus.PAUSING):
                self.launcher.request_stop(run_id, pause=rec.status == RunStatus.PAUSING)
        rec = self.store.get_run(run_id)
        if rec is not None:
            self.reconciler.refresh(rec)

    def _launch_failed(self, rec: RunRecord, reason: str) -> None:
        try:  # the actor may exist (it did not answer in time): remove it before calling the run failed
            self.launcher.reap(rec.id, force=True)
        except Exception as err:  # noqa: BLE001 -- the reconciler removes drivers of failed runs later
            log.warning("could not remove the driver of run %s after its failed launch: %s", rec.id, err)
        write_status(rec.output_dir, RunStatus.FAILED, step=rec.step, reason=reason)
        self.store.update_run(rec.id, status=RunStatus.FAILED, reason=reason, ended=time.time(), launch_began=None)

    def tick(self) -> None:
        """Start the oldest queued run while one fits; FIFO (by the order runs were added, not the wall clock):
        later runs wait behind the first that does not.

        One run read at a time, so a long queue costs a tick one small query, not every record."""
        while oldest := self.store.runs_in([RunStatus.QUEUED], limit=1):
            if self.try_start(oldest[0]).status == RunStatus.QUEUED:
                return

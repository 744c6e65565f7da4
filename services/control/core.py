"""The control plane's operations on runs, shared by the HTTP routes (which stay thin).

Errors are `ApiError(status, detail)`; the app turns them into JSON responses.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from onpolicy.config import RunConfig, config_error_items
from onpolicy.status import ACTIVE, RESUMABLE, TERMINAL, RunStatus
from services.control.db import RunRecord, Store, new_id
from services.control.launcher import Launcher, RayLauncher
from services.control.policy import PolicyError
from services.control.reconciler import Reconciler
from services.control.scheduler import Scheduler
from services.control.settings import Settings

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, detail: Any):
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


def config_errors(err: ValidationError, prefix: tuple[str, ...] = ("body", "config")) -> list[dict[str, Any]]:
    """Pydantic errors as JSON: each with `path` (e.g. `rollout.max_new_tokens`), `loc`, `msg`, `type`."""
    return [{"path": e["path"], "loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in config_error_items(err)]


@contextmanager
def policy_errors(prefix: tuple[str, ...]) -> Iterator[None]:
    """A `PolicyError` as a 422 in the same shape as a config error (path, loc, msg, type)."""
    try:
        yield
    except PolicyError as err:
        raise ApiError(422, [{"path": err.field, "loc": [*prefix, *err.field.split(".")], "msg": str(err),
                              "type": "policy"}]) from None


class Control:
    """Settings, the store, the launcher and the scheduler of one API process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.policy = settings.policy()
        self.store = Store(settings.db_url)
        self.launcher: Launcher = settings.launcher or RayLauncher(settings.ray_address)
        self.reconciler = Reconciler(self.store, self.launcher)
        self.scheduler = Scheduler(self.store, self.launcher, self.reconciler, settings.max_concurrent_runs)

    def apply_policy(self, cfg: RunConfig) -> None:
        """Confine the run's paths to the server's roots and check its teacher URL and key name (in place)."""
        p = self.policy
        p.check_key_env(cfg.teacher.api_key_env, "teacher.api_key_env")
        cfg.model.student = p.confine(cfg.model.student, p.models_roots, "model.student", "models")
        cfg.teacher.model = p.confine(cfg.teacher.model, p.models_roots, "teacher.model", "models")
        if cfg.data.prompts_path is not None:
            cfg.data.prompts_path = p.confine(cfg.data.prompts_path, p.data_roots, "data.prompts_path", "data")
        if cfg.teacher.url is not None:
            cfg.teacher.url = p.check_teacher_url(cfg.teacher.url, "teacher.url")
        if cfg.teacher.urls:
            cfg.teacher.urls = [p.check_teacher_url(u, f"teacher.urls.{i}") for i, u in enumerate(cfg.teacher.urls)]

    # ---- runs ------------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord:
        """The record as the database has it (the reconciler keeps it fresh)."""
        rec = self.store.get_run(run_id)
        if rec is None:
            raise ApiError(404, f"no run with id {run_id!r}")
        return rec

    def create_run(self, config: dict[str, Any], name: str | None, teacher_id: str | None) -> RunRecord:
        data = json.loads(json.dumps(config))  # a private deep copy
        run_id = new_id()
        out = self.settings.runs_root / run_id
        data["output_dir"] = str(out)  # never the client's: runs live under the server's runs root
        if name:
            data["name"] = name
        if teacher_id is not None:
            t = self.store.get_teacher(teacher_id)
            if t is None:
                raise ApiError(422, [{"path": "teacher_id", "loc": ["body", "teacher_id"], "type": "not_found",
                                      "msg": f"no attached teacher with id {teacher_id!r} (see GET /v1/teachers)"}])
            section = data.get("teacher")
            section = dict(section) if isinstance(section, dict) else {}
            section.update(kind=t.kind, url=t.url, api_key_env=t.api_key_env, urls=None)  # the attached one only
            data["teacher"] = section
        try:
            cfg = RunConfig.model_validate(data)
        except ValidationError as err:
            raise ApiError(422, config_errors(err)) from None
        with policy_errors(prefix=("body", "config")):
            self.apply_policy(cfg)
        now = time.time()
        rec = RunRecord(id=run_id, name=cfg.name, status=RunStatus.QUEUED, reason="queued: waiting for the scheduler",
                        step=0, config_json=json.dumps(cfg.model_dump(mode="json")), output_dir=str(out),
                        teacher_id=teacher_id, resume=0, created=now, updated=now)
        self.store.add_run(rec)
        return self.scheduler.try_start(rec)

    def stop(self, run_id: str, pause: bool) -> RunRecord:
        """Graceful stop/pause: the run finishes its step, checkpoints and saves its student. Idempotent.

        Each transition is a compare-and-set; one that lost to a concurrent change (a queued run being
        claimed) is retried from the new status."""
        for _ in range(3):
            if self._stop_once(self.get(run_id), pause):
                break
        return self.get(run_id)

    def _stop_once(self, rec: RunRecord, pause: bool) -> bool:
        """One attempt; False if the record changed under it."""
        target = RunStatus.PAUSED if pause else RunStatus.STOPPED
        if rec.status == RunStatus.QUEUED:
            return self.store.update_run(rec.id, expect=(RunStatus.QUEUED,), status=target,
                                         reason=f"{target} while queued", ended=time.time())
        if rec.status == RunStatus.PAUSED and not pause:
            return self.store.update_run(rec.id, expect=(RunStatus.PAUSED,), status=RunStatus.STOPPED,
                                         reason="stopped while paused")
        if rec.status not in (RunStatus.STARTING, RunStatus.RUNNING, RunStatus.DEGRADED):
            return True  # stopping, pausing, stopped, paused (pause again), finished, failed: nothing to do
        verb = "pause" if pause else "stop"
        reason = (f"{verb} requested while launching; the driver gets it once up" if rec.launch_began is not None
                  else f"{verb} requested; finishing the current step")
        # Recorded before the driver is asked: a launch in progress hands it over when it returns.
        if not self.store.update_run(rec.id, expect=(rec.status,), reason=reason,
                                     status=RunStatus.PAUSING if pause else RunStatus.STOPPING):
            return False
        rec = self.get(rec.id)
        if rec.launch_began is None:  # launched (read after the write, so a launch ending now is not missed)
            self.launcher.request_stop(rec.id, pause)  # no driver: the refresh below calls the run lost
        self.reconciler.refresh(rec)
        return True

    def resume(self, run_id: str, steps: int | None) -> RunRecord:
        rec = self.get(run_id)
        if rec.status not in RESUMABLE:
            if rec.status == RunStatus.QUEUED:
                return rec
            raise ApiError(409, f"run {run_id} is {rec.status}; only a stopped, paused, failed or finished run "
                           "can be resumed")
        cfg = rec.config
        if steps is not None:
            cfg.schedule.steps = steps
        if not self.store.update_run(run_id, expect=(rec.status,), status=RunStatus.QUEUED,
                                     reason="queued: resume requested", resume=1, ended=None,
                                     config_json=json.dumps(cfg.model_dump(mode="json"))):
            return self.get(run_id)  # a concurrent request changed it first (e.g. resumed it)
        return self.scheduler.try_start(self.get(run_id))

    def delete(self, run_id: str) -> None:
        """Delete a run that is not active, as a compare-and-set on the status read: a run resumed meanwhile
        is not deleted (409)."""
        rec = self.get(run_id)
        if rec.status in ACTIVE:
            raise ApiError(409, f"run {run_id} is {rec.status}: stop it first (POST /v1/runs/{run_id}/stop), "
                           "then delete it")
        if not self.store.delete_run(run_id, expect=rec.status):
            now = self.get(run_id)  # 404 if a concurrent delete came first
            raise ApiError(409, f"run {run_id} changed while being deleted (it is now {now.status}); stop it "
                           "first, then delete it")
        try:  # a driver still closing; left to the reconciler if the cluster does not answer now
            self.launcher.reap(run_id, force=True)
        except Exception as err:  # noqa: BLE001
            log.warning("could not remove the driver of deleted run %s: %s", run_id, err)
        out = Path(rec.output_dir)
        if out.is_dir() and self.settings.runs_root in out.resolve().parents:
            shutil.rmtree(out, ignore_errors=True)

    def is_terminal(self, status: RunStatus) -> bool:
        return status in TERMINAL

"""The control plane's operations on runs, shared by the HTTP routes (which stay thin).

Errors are `ApiError(status, detail)`; the app turns them into JSON responses.
"""

from __future__ import annotations

import json
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
from services.control.scheduler import Scheduler
from services.control.schemas import RunView, StatusChange, TeacherRef
from services.control.settings import Settings


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
        self.scheduler = Scheduler(self.store, self.launcher, settings.max_concurrent_runs)

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

    # ---- runs ------------------------------------------------------------------------------
    def get(self, run_id: str, refresh: bool = True) -> RunRecord:
        rec = self.store.get_run(run_id)
        if rec is None:
            raise ApiError(404, f"no run with id {run_id!r}")
        return self.scheduler.refresh(rec) if refresh else rec

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
            section.update(kind=t.kind, url=t.url, api_key_env=t.api_key_env)
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
        """Graceful stop/pause: the run finishes its step, checkpoints and saves its student. Idempotent."""
        rec = self.get(run_id)
        target = RunStatus.PAUSED if pause else RunStatus.STOPPED
        if rec.status == RunStatus.QUEUED:
            self.store.update_run(run_id, expect=(RunStatus.QUEUED,), status=target,
                                  reason=f"{target} while queued", ended=time.time())
        elif rec.status == RunStatus.PAUSED and not pause:
            self.store.update_run(run_id, expect=(RunStatus.PAUSED,), status=RunStatus.STOPPED,
                                  reason="stopped while paused")
        elif rec.status in (RunStatus.STARTING, RunStatus.RUNNING, RunStatus.DEGRADED):
            if self.launcher.request_stop(run_id, pause):
                self.store.update_run(run_id, expect=(rec.status,),
                                      status=RunStatus.PAUSING if pause else RunStatus.STOPPING,
                                      reason=f"{'pause' if pause else 'stop'} requested; finishing the current step")
            else:
                self.scheduler.refresh(rec, alive=False)
        # stopping, pausing, stopped, paused (pause again), finished, failed: nothing to do
        return self.get(run_id)

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
        self.store.update_run(run_id, expect=(rec.status,), status=RunStatus.QUEUED,
                              reason="queued: resume requested", resume=1,
                              config_json=json.dumps(cfg.model_dump(mode="json")), ended=None)
        return self.scheduler.try_start(self.get(run_id, refresh=False))

    def delete(self, run_id: str) -> None:
        rec = self.get(run_id)
        if rec.status in ACTIVE:
            raise ApiError(409, f"run {run_id} is {rec.status}: stop it first (POST /v1/runs/{run_id}/stop), "
                           "then delete it")
        self.launcher.reap(run_id, force=True)
        self.store.delete_run(run_id)
        out = Path(rec.output_dir)
        if out.is_dir() and self.settings.runs_root in out.resolve().parents:
            shutil.rmtree(out, ignore_errors=True)

    def view(self, rec: RunRecord, history: bool = False) -> RunView:
        cfg = rec.config
        hist = None
        if history:
            hist = [StatusChange(status=h.status, reason=h.reason, step=h.step, time=h.time)
                    for h in self.store.history(rec.id)]
        return RunView(
            id=rec.id, name=rec.name, status=rec.status, reason=rec.reason, step=rec.step,
            steps=cfg.schedule.steps, policy_version=rec.policy_version, latest_metrics=rec.latest_metrics,
            teacher=TeacherRef(kind=cfg.teacher.kind, url=cfg.teacher.url, teacher_id=rec.teacher_id),
            output_dir=rec.output_dir, created=rec.created, updated=rec.updated, started=rec.started,
            ended=rec.ended, history=hist,
        )

    def is_terminal(self, status: RunStatus) -> bool:
        return status in TERMINAL

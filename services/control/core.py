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

from onpolicy.config import (
    TEACHER_KINDS,
    EndpointTeacherBase,
    ManagedTeacherConfig,
    RunConfig,
    config_error_items,
)
from onpolicy.status import ACTIVE, RESUMABLE, TERMINAL, RunStatus
from services.control.db import RunRecord, Store, new_id
from services.control.launcher import Launcher, RayLauncher
from services.control.managed_teachers import ServeSettings
from services.control.policy import PolicyError, path_fields
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


def _items(value: object) -> list:
    """A config section as a list of sections: none, itself, or a list's items."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


class Control:
    """Settings, the store, the launcher and the scheduler of one API process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.policy = settings.policy()
        self.store = Store(settings.db_url, busy_timeout_s=settings.db_busy_timeout_s)
        self.launcher: Launcher = settings.launcher or RayLauncher(settings.ray_address)
        self.reconciler = Reconciler(self.store, self.launcher, settings.launch_grace_s)
        self.scheduler = Scheduler(self.store, self.launcher, self.reconciler, settings.max_concurrent_runs)

    def apply_policy(self, cfg: RunConfig) -> None:
        """Hold a REST run to the server's policy (in place): every path field confined to its root, the teacher
        URLs vetted and pinned to the addresses vetted (resolved once, here), the key name allowed and bound
        to those hosts, the run's size within the server's limits, each actor's CPUs at least the minimum."""
        p = self.policy
        for where, kind in path_fields(RunConfig):
            *sections, name = where.split(".")
            nodes: list = [cfg]
            for section in sections:  # a list of sections (eval.retention's probes): each of its items; a
                # section another kind has (data.sources of a mixture, on a dataset's data) is absent
                nodes = [c for n in nodes for c in _items(getattr(n, section, None))]
            for node in nodes:
                # a field of another kind than the section's (teacher.model of a remote teacher) is absent
                if name in type(node).model_fields and getattr(node, name) is not None:
                    setattr(node, name, p.confine_field(getattr(node, name), kind, where, self.settings.runs_root))
        for tc in cfg.teacher_list():  # the one `teacher`, or each of `teachers`
            if isinstance(tc, EndpointTeacherBase):  # a local teacher has no URL or key to vet
                self._vet_teacher(tc)
            if isinstance(tc, ManagedTeacherConfig):
                self._vet_managed(tc)
        caps = self.settings.run_caps()
        caps.check(cfg)
        caps.apply_minimums(cfg)

    def _vet_teacher(self, tc: EndpointTeacherBase) -> None:
        p = self.policy
        p.check_key_env(tc.api_key_env, "teacher.api_key_env")
        pins: dict[str, str] = {}
        urls = [("teacher.url", tc.url)] if tc.url is not None else []
        urls += [(f"teacher.urls.{i}", u) for i, u in enumerate(tc.urls or [])]
        vetted = []
        for where, url in urls:
            url, pinned = p.vet_teacher_url(url, where)
            p.check_key_host(tc.api_key_env, url, pinned, where)
            pins.update(pinned)
            vetted.append(url)
        if tc.url is not None:
            tc.url = vetted[0]
        elif tc.urls:
            tc.urls = vetted
        tc.connect_to = pins or None  # never the client's: only addresses vetted here

    def _vet_managed(self, tc: ManagedTeacherConfig) -> None:
        """A managed teacher this server deployed, reached at this server's Serve proxy (never the client's URL)."""
        t = self.store.get_teacher(tc.id)
        if t is None or t.kind != "managed":
            raise PolicyError("teacher.id", f"no managed teacher with id {tc.id!r} (GET /v1/teachers lists them; "
                              "POST /v1/teachers with a model deploys one)")
        self.policy.check_key_env(tc.api_key_env, "teacher.api_key_env")
        tc.serve_url = ServeSettings.from_env().url

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
            if t.kind == "managed":
                section.update(kind="managed", id=t.id, api_key_env=t.api_key_env)
            else:
                section.update(kind=t.kind, url=t.url, api_key_env=t.api_key_env, urls=None)  # the attached one only
            # as when a command line changes the kind: the section's fields the attached kind lacks are dropped
            data["teacher"] = TEACHER_KINDS.keep_applicable(section)
        try:
            cfg = RunConfig.model_validate(data)
        except ValidationError as err:
            raise ApiError(422, config_errors(err)) from None
        with policy_errors(prefix=("body", "config")):
            self.apply_policy(cfg)
        if isinstance(cfg.teacher, ManagedTeacherConfig):
            cfg.teacher.run_tag = run_id  # its usage and in-flight bound at the teacher go under the run's id
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
        with policy_errors(prefix=("config",)):
            # Today's policy, not the one at creation: roots, allowed hosts and what a host resolves to change.
            self.apply_policy(cfg)
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

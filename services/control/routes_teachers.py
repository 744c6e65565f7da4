"""/v1/teachers: attach an external teacher (runs the compatibility check) or deploy a managed one on the
cluster's Ray Serve (a body with `model`: managed_teachers.py); list, show, detach or delete (409 while runs
use it)."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Request
from pydantic import Discriminator, Tag

from onpolicy.model_dir import require_model_dir
from onpolicy.status import ACTIVE, RunStatus
from onpolicy.teacher.clients import pinned
from onpolicy.teacher.factory import REMOTE_KINDS
from services.control.core import ApiError, Control, policy_errors
from services.control.db import TeacherRecord, new_id
from services.control.managed_teachers import ManagedTeachers, ServeUnavailable, serve_args
from services.control.routes_runs import ERRORS
from services.control.schemas import AttachTeacher, CheckItemView, DeployTeacher, TeacherList, TeacherView

router = APIRouter(prefix="/v1/teachers", tags=["teachers"])


def _control(request: Request) -> Control:
    return request.app.state.control


def reachability_report(url: str, kind: str, api_key: str | None, timeout_s: float = 10.0,
                        connect_to: dict[str, str] | None = None) -> dict:
    """Without a student folder, only check that the teacher answers its dialect's info endpoint (at the
    address the policy vetted, `connect_to`; no proxy from the environment). Only the status code is
    reported: an upstream body never goes back to the API client."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = httpx.URL(url)
    target = base.copy_with(path=base.path.rstrip("/") + REMOTE_KINDS[kind].info_path)
    try:
        with pinned.client(connect_to, timeout=timeout_s, follow_redirects=False) as http:
            r = http.get(target, headers=headers)
        ok = r.status_code == 200
        msg = f"GET {target} -> HTTP {r.status_code}" + ("" if ok else " (is the URL, kind and API key right?)")
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as err:  # an unusable URL is a failed check
        ok, msg = False, f"cannot reach {target}: {type(err).__name__}"
    items = [{"name": "reachable", "status": "pass" if ok else "fail", "message": msg},
             {"name": "tokenizer", "status": "skip", "message": "not checked: attach with `student` to compare"}]
    text = "\n".join([f"teacher {url} (kind={kind})", *(f"  [{i['status'].upper()}] {i['name']}: {i['message']}"
                                                       for i in items)])
    return {"ok": ok, "items": items, "text": text}


def run_check(body: AttachTeacher, connect_to: dict[str, str] | None = None) -> dict:
    api_key = os.environ.get(body.api_key_env) if body.api_key_env else None  # unset: the check says 401
    if not body.student:
        return reachability_report(body.url, body.kind, api_key, connect_to=connect_to)
    from onpolicy.teacher.check import check_teacher

    try:
        report = check_teacher(body.url, body.kind, body.student, api_key=api_key, timeout_s=15.0,
                               connect_to=connect_to)
    except Exception as err:  # noqa: BLE001 -- a check that cannot run is a failed check, not a 500
        msg = f"the check could not run: {type(err).__name__}"
        return {"ok": False, "items": [{"name": "check", "status": "fail", "message": msg}], "text": msg}
    return {"ok": report.ok, "items": [i.model_dump() for i in report.items], "text": report.render()}


def _managed(request: Request) -> ManagedTeachers:
    """One per app, on the Ray connection the launcher makes (a launcher without one: this process's)."""
    state = request.app.state
    if getattr(state, "managed_teachers", None) is None:
        launcher = _control(request).launcher
        import ray

        state.managed_teachers = ManagedTeachers(getattr(launcher, "_ray", lambda: ray))
    return state.managed_teachers


def _unavailable(err: ServeUnavailable) -> ApiError:
    return ApiError(503, f"managed teachers need the cluster's Ray Serve, which does not answer now ({err})")


def teacher_view(t: TeacherRecord, request: Request | None = None) -> TeacherView:
    report = json.loads(t.report_json)
    managed = None
    if t.kind == "managed" and request is not None:
        try:
            managed = _managed(request).view(t.id, report["spec"])
        except ServeUnavailable as err:
            raise _unavailable(err) from None
    return TeacherView(id=t.id, url=t.url, kind=t.kind, api_key_env=t.api_key_env, student=t.student,
                       ok=bool(t.ok), checks=[CheckItemView(**i) for i in report["items"]], report=report["text"],
                       created=t.created, managed=managed)


def _body_kind(body: Any) -> str:
    return "managed" if (isinstance(body, dict) and "model" in body) or isinstance(body, DeployTeacher) else "attach"


TeacherBody = Annotated[Annotated[AttachTeacher, Tag("attach")] | Annotated[DeployTeacher, Tag("managed")],
                        Discriminator(_body_kind)]


@router.post("", status_code=201, response_model=TeacherView, responses={**ERRORS, 503: ERRORS[404]},
             summary="Attach an external teacher (`url`: runs the compatibility check and stores the result), or "
             "deploy a managed one on the cluster's Ray Serve (`model`)")
def add_teacher(body: TeacherBody, request: Request) -> TeacherView:
    if isinstance(body, DeployTeacher):
        return deploy_teacher(body, request)
    return attach_teacher(body, request)


def deploy_teacher(body: DeployTeacher, request: Request) -> TeacherView:
    control = _control(request)
    p = control.policy
    with policy_errors(prefix=("body",)):
        body.model = p.confine(body.model, p.models_roots, "model", "models")
        p.check_key_env(body.api_key_env, "api_key_env")
    problem = None
    try:  # the replicas load it from the same models volume: a wrong path fails here, not in every replica
        require_model_dir(body.model, "teacher")
    except FileNotFoundError as err:
        problem = ("model", str(err))
    if body.replicas.min > body.replicas.max:
        problem = ("replicas", f"replicas.min ({body.replicas.min}) is above replicas.max ({body.replicas.max})")
    if problem is not None:
        raise ApiError(422, [{"path": problem[0], "loc": ["body", problem[0]], "type": "value_error",
                              "msg": problem[1]}])
    managed = _managed(request)
    teacher_id = new_id()
    spec = serve_args(teacher_id, body)
    try:
        managed.deploy(teacher_id, body)
    except ServeUnavailable as err:
        raise _unavailable(err) from None
    text = (f"managed teacher {body.model} on Ray Serve, {body.replicas.min}-{body.replicas.max} replicas of "
            f"{body.num_cpus} CPUs, at {managed.url(teacher_id)}")
    report = {"ok": True, "items": [], "text": text, "spec": spec}
    rec = TeacherRecord(id=teacher_id, url=managed.url(teacher_id), kind="managed", api_key_env=body.api_key_env,
                        student=None, ok=1, report_json=json.dumps(report), created=time.time())
    control.store.add_teacher(rec)
    return teacher_view(rec, request)


def attach_teacher(body: AttachTeacher, request: Request) -> TeacherView:
    control = _control(request)
    p = control.policy
    with policy_errors(prefix=("body",)):
        p.check_key_env(body.api_key_env, "api_key_env")
        body.url, pins = p.vet_teacher_url(body.url, "url")
        p.check_key_host(body.api_key_env, body.url, pins, "api_key_env")
        if body.student is not None:
            body.student = p.confine(body.student, p.models_roots, "student", "models")
    report = run_check(body, pins)  # to the address vetted above, never a second resolution
    rec = TeacherRecord(id=new_id(), url=body.url, kind=body.kind, api_key_env=body.api_key_env,
                        student=body.student, ok=int(report["ok"]), report_json=json.dumps(report),
                        created=time.time())
    _control(request).store.add_teacher(rec)
    return teacher_view(rec)


@router.get("", response_model=TeacherList, responses=ERRORS,
            summary="Attached and managed teachers (a managed one's replicas and usage: GET /v1/teachers/{id})")
def list_teachers(request: Request) -> TeacherList:
    return TeacherList(teachers=[teacher_view(t) for t in _control(request).store.list_teachers()])


@router.get("/{teacher_id}", response_model=TeacherView, responses={**ERRORS, 503: ERRORS[404]},
            summary="One teacher; a managed one with its replicas, queue depth, tokens scored per run, latency")
def get_teacher(teacher_id: str, request: Request) -> TeacherView:
    t = _control(request).store.get_teacher(teacher_id)
    if t is None:
        raise ApiError(404, f"no attached teacher with id {teacher_id!r}")
    return teacher_view(t, request)


def runs_using(control: Control, teacher_id: str) -> list[str]:
    """Ids of the runs not over that use teacher `teacher_id` (by `teacher_id`, or a managed config's id)."""
    using = []
    for rec in control.store.runs_in(ACTIVE | {RunStatus.QUEUED}):
        teacher = (json.loads(rec.config_json).get("teacher") or {})
        if rec.teacher_id == teacher_id or (teacher.get("kind") == "managed" and teacher.get("id") == teacher_id):
            using.append(rec.id)
    return sorted(using)


@router.delete("/{teacher_id}", status_code=204, responses={**ERRORS, 503: ERRORS[404]},
               summary="Detach a teacher, or delete a managed one (its replicas drain; 409 while runs use it)")
def detach_teacher(teacher_id: str, request: Request) -> None:
    control = _control(request)
    t = control.store.get_teacher(teacher_id)
    if t is None:
        raise ApiError(404, f"no attached teacher with id {teacher_id!r}")
    if t.kind == "managed":  # (an attached teacher's runs keep its URL: detaching stops nothing they use)
        using = runs_using(control, teacher_id)
        if using:
            raise ApiError(409, f"managed teacher {teacher_id} is used by run(s) {', '.join(using)}: stop them "
                           "first (POST /v1/runs/{id}/stop), then delete it")
        try:
            _managed(request).delete(teacher_id)
        except ServeUnavailable as err:
            raise _unavailable(err) from None
    if not control.store.delete_teacher(teacher_id):
        raise ApiError(404, f"no attached teacher with id {teacher_id!r}")

"""/v1/teachers: attach an external teacher (runs the compatibility check), list, show, detach."""

from __future__ import annotations

import json
import os
import time

import httpx
from fastapi import APIRouter, Request

from onpolicy.teacher.clients import pinned
from onpolicy.teacher.factory import REMOTE_KINDS
from services.control.core import ApiError, Control, policy_errors
from services.control.db import TeacherRecord, new_id
from services.control.routes_runs import ERRORS
from services.control.schemas import AttachTeacher, CheckItemView, TeacherList, TeacherView

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


def teacher_view(t: TeacherRecord) -> TeacherView:
    report = json.loads(t.report_json)
    return TeacherView(id=t.id, url=t.url, kind=t.kind, api_key_env=t.api_key_env, student=t.student,
                       ok=bool(t.ok), checks=[CheckItemView(**i) for i in report["items"]], report=report["text"],
                       created=t.created)


@router.post("", status_code=201, response_model=TeacherView, responses=ERRORS,
             summary="Attach an external teacher: runs the compatibility check and stores the result")
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


@router.get("", response_model=TeacherList, responses=ERRORS, summary="Attached teachers")
def list_teachers(request: Request) -> TeacherList:
    return TeacherList(teachers=[teacher_view(t) for t in _control(request).store.list_teachers()])


@router.get("/{teacher_id}", response_model=TeacherView, responses=ERRORS, summary="One attached teacher")
def get_teacher(teacher_id: str, request: Request) -> TeacherView:
    t = _control(request).store.get_teacher(teacher_id)
    if t is None:
        raise ApiError(404, f"no attached teacher with id {teacher_id!r}")
    return teacher_view(t)


@router.delete("/{teacher_id}", status_code=204, responses=ERRORS, summary="Detach a teacher")
def detach_teacher(teacher_id: str, request: Request) -> None:
    if not _control(request).store.delete_teacher(teacher_id):
        raise ApiError(404, f"no attached teacher with id {teacher_id!r}")

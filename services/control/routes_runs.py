"""/v1/runs: create, list, show, stop, pause, resume, delete; metrics; events (SSE); artifacts."""

from __future__ import annotations

import asyncio
import json
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from onpolicy.metrics import read_metrics
from onpolicy.status import RunStatus, read_status
from services.control.core import ApiError, Control
from services.control.db import RunRecord, render_view
from services.control.schemas import (
    Artifact,
    ArtifactList,
    CreateRun,
    MetricsView,
    Problem,
    ResumeRun,
    RunList,
    RunView,
)
from services.control.views import list_json, with_history

router = APIRouter(prefix="/v1/runs", tags=["runs"])
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem}, 404: {"model": Problem}, 409: {"model": Problem}, 422: {"model": Problem},
}


def _control(request: Request) -> Control:
    return request.app.state.control


def _json(text: str, status_code: int = 200) -> Response:
    """A body already rendered as JSON (`views`): FastAPI neither validates nor re-encodes it."""
    return Response(text, status_code=status_code, media_type="application/json")


def _view(rec: RunRecord, status_code: int = 200) -> Response:
    return _json(with_history(rec.view_json or render_view(rec), None), status_code)


@router.post("", status_code=201, response_model=RunView, responses=ERRORS,
             summary="Start a run from a config (queued if it does not fit now)")
def create_run(body: CreateRun, request: Request) -> Response:
    return _view(_control(request).create_run(body.config, body.name, body.teacher_id), 201)


# The two reads clients poll: the stored views, from the database alone (the reconciler keeps them fresh).
# `async def` on purpose: a read is one indexed query (~0.2 ms on SQLite), cheaper inline on the event loop
# than a hop to the thread pool, whose threads contend for the GIL with the loop: with 20 clients, plain `def`
# took 2.8 ms of CPU per request against 0.7 ms, and p99 74-124 ms against 35 ms.
@router.get("", response_model=RunList, responses=ERRORS, summary="List runs (optionally by status)")
async def list_runs(request: Request, status: RunStatus | None = None) -> Response:
    return _json(list_json(_control(request).store.views(status=status)))


@router.get("/{run_id}", response_model=RunView, responses=ERRORS,
            summary="A run: status, step, policy version, latest metrics, teacher, timestamps, reason")
async def get_run(run_id: str, request: Request) -> Response:
    found = _control(request).store.view(run_id)
    if found is None:
        raise ApiError(404, f"no run with id {run_id!r}")
    return _json(with_history(*found))


@router.post("/{run_id}/stop", response_model=RunView, responses=ERRORS,
             summary="Stop gracefully: finish the step, checkpoint, save the student (idempotent)")
def stop_run(run_id: str, request: Request) -> Response:
    return _view(_control(request).stop(run_id, pause=False))


@router.post("/{run_id}/pause", response_model=RunView, responses=ERRORS,
             summary="Like stop, but the run ends `paused` (resume it later)")
def pause_run(run_id: str, request: Request) -> Response:
    return _view(_control(request).stop(run_id, pause=True))


@router.post("/{run_id}/resume", response_model=RunView, responses=ERRORS,
             summary="Resume from the last checkpoint; optional {\"steps\": N} overrides schedule.steps")
def resume_run(run_id: str, request: Request, body: Annotated[ResumeRun | None, Body()] = None) -> Response:
    return _view(_control(request).resume(run_id, body.steps if body else None))


@router.delete("/{run_id}", status_code=204, responses=ERRORS,
               summary="Delete a run's record and files (409 while it runs)")
def delete_run(run_id: str, request: Request) -> None:
    _control(request).delete(run_id)


@router.get("/{run_id}/metrics", response_model=MetricsView, responses=ERRORS,
            summary="The metrics time series (metrics.jsonl), records with step > since_step")
def get_metrics(run_id: str, request: Request, since_step: int = Query(-1, ge=-1, le=2**31),
                kind: str | None = Query(None, pattern="^(train|eval)$")) -> MetricsView:
    rec = _control(request).get(run_id)
    records = [r for r in read_metrics(Path(rec.output_dir) / "metrics.jsonl", kind)
               if int(r.get("step", 0)) > since_step]
    return MetricsView(run_id=run_id, records=records)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/{run_id}/events", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
            summary="Server-sent events: `metrics` (each record) and `status` changes; ends at a terminal status")
async def run_events(run_id: str, request: Request, poll_s: float = Query(0.5, ge=0.05, le=10.0)):
    c = _control(request)
    rec = await run_in_threadpool(c.get, run_id)

    async def stream():
        path = Path(rec.output_dir) / "metrics.jsonl"
        offset, last_status, buf = 0, None, b""
        while True:
            current = await run_in_threadpool(c.get, run_id)
            # metrics first, so a client sees every step before the final status
            if path.exists():
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _sse("metrics", json.loads(line))
            file = read_status(rec.output_dir) or {}
            status = (current.status, current.step, current.reason)
            if status != last_status:
                last_status = status
                yield _sse("status", {"status": current.status, "step": current.step, "reason": current.reason,
                                      "file_status": file.get("status")})
            if c.is_terminal(current.status) or await request.is_disconnected():
                return
            await asyncio.sleep(poll_s)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@router.get("/{run_id}/artifacts", response_model=ArtifactList, responses=ERRORS,
            summary="Checkpoints, the final student, the config and the metrics of a run")
def list_artifacts(run_id: str, request: Request) -> ArtifactList:
    rec = _control(request).get(run_id)
    out = Path(rec.output_dir)
    items: list[Artifact] = []
    for ckpt in sorted((out / "checkpoints").glob("step_*")):
        items.append(Artifact(name=f"checkpoints/{ckpt.name}", kind="checkpoint", path=str(ckpt), bytes=_size(ckpt)))
    if (out / "student" / "config.json").is_file():
        items.append(Artifact(name="student.tar.gz", kind="student", path=str(out / "student"),
                              bytes=_size(out / "student"),
                              download=f"/v1/runs/{run_id}/artifacts/student.tar.gz"))
    for name, kind in (("config.yaml", "config"), ("metrics.jsonl", "metrics"), ("summary.json", "summary"),
                       ("status.json", "status")):
        if (out / name).is_file():
            items.append(Artifact(name=name, kind=kind, path=str(out / name), bytes=_size(out / name)))
    return ArtifactList(run_id=run_id, artifacts=items)


@router.get("/{run_id}/artifacts/student.tar.gz", responses={**ERRORS, 200: {"content": {"application/gzip": {}}}},
            summary="The final student (Hugging Face folder) as a tar.gz stream")
def download_student(run_id: str, request: Request):
    rec = _control(request).get(run_id)
    student = Path(rec.output_dir) / "student"
    if not (student / "config.json").is_file():
        raise ApiError(404, f"run {run_id} has no final student yet (status {rec.status}); it is saved when the "
                       "run finishes, stops or pauses")
    spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 -- closed by chunks()
    with tarfile.open(fileobj=spool, mode="w:gz") as tar:
        tar.add(student, arcname="student")
    spool.seek(0)

    def chunks():
        with spool:
            while data := spool.read(1 << 20):
                yield data

    return StreamingResponse(chunks(), media_type="application/gzip",
                             headers={"Content-Disposition": content_disposition(f"{rec.name}-student.tar.gz")})


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and the exact UTF-8 name (RFC 6266 / 5987): a run name is
    any text, and HTTP headers are Latin-1."""
    ascii_name = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("_") or "student.tar.gz"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


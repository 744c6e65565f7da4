"""/v1/runs: create, list, show, stop, pause, resume, delete; metrics; events (SSE); artifacts."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
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
from services.control.streams import Slot, TarGzStream
from services.control.views import list_json, with_history

router = APIRouter(prefix="/v1/runs", tags=["runs"])
SSE_READ_BYTES = 1 << 20  # metrics.jsonl read per pass of an event stream (a long run's file is not read at once)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem}, 404: {"model": Problem}, 409: {"model": Problem}, 422: {"model": Problem},
}


def _control(request: Request) -> Control:
    return request.app.state.control


def _json(text: str, status_code: int = 200) -> Response:
    """A body already rendered as JSON (`views`): FastAPI neither validates nor re-encodes it."""
    return Response(text, status_code=status_code, media_type="application/json")


def _view(rec: RunRecord, status_code: int = 200) -> Response:
    return _json(with_history(rec.view_json or render_view(rec), rec.observed, None), status_code)


@router.post("", status_code=201, response_model=RunView, responses=ERRORS,
             summary="Start a run from a config (queued if it does not fit now)")
def create_run(body: CreateRun, request: Request) -> Response:
    return _view(_control(request).create_run(body.config, body.name, body.teacher_id), 201)


# The two reads clients poll: the stored views, from the database alone (the reconciler keeps them fresh).
# Plain `def` (the thread pool), not `async def`: a read that waits for a database lock must not stall the
# event loop, which answers /healthz and every other request (inline on the loop, a 30 s lock held them all).
@router.get("", response_model=RunList, responses=ERRORS,
            summary="List runs, newest first, a page at a time (optionally by status)")
def list_runs(request: Request, status: RunStatus | None = None,
              limit: int = Query(100, ge=1, le=1000, description="Runs per page."),
              before: str | None = Query(None, pattern=r"^[0-9]{1,18}$",
                                         description="The `next` of the previous page.")) -> Response:
    views, next_cursor = _control(request).store.views(status=status, limit=limit,
                                                       before=None if before is None else int(before))
    return _json(list_json(views, next_cursor))


@router.get("/{run_id}", response_model=RunView, responses=ERRORS,
            summary="A run: status, step, policy version, latest metrics, teacher, timestamps, reason, history "
            "(status changes and faults), when it was last observed")
def get_run(run_id: str, request: Request) -> Response:
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


def _busy(what: str, limit: int) -> Response:
    return JSONResponse({"detail": f"too many {what} open at once (this server allows {limit}); retry shortly"},
                        status_code=429, headers={"Retry-After": "5"})


def _read_from(path: Path, offset: int, limit: int) -> tuple[int, bytes]:
    """(where the read began, up to `limit` bytes of `path` from `offset`); a file now shorter than `offset` was
    rewound to a checkpoint, and is read again from its start."""
    if not path.exists():
        return offset, b""
    with path.open("rb") as f:
        if f.seek(0, 2) < offset:
            offset = 0
        f.seek(offset)
        return offset, f.read(limit)


@router.get("/{run_id}/events", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}},
                                           429: {"model": Problem}},
            summary="Server-sent events: `metrics` (each record), `fault` (an actor died and was brought back) and "
            "`status` changes; ends at a terminal status")
async def run_events(run_id: str, request: Request, poll_s: float = Query(1.0, ge=0.5, le=10.0)):
    c = _control(request)
    rec = await run_in_threadpool(c.get, run_id)
    slot = Slot.take(request.app.state.event_streams)
    if slot is None:
        return _busy("event streams", c.settings.max_event_streams)

    async def stream():
        path = Path(rec.output_dir) / "metrics.jsonl"
        offset, last_status, buf = 0, None, b""
        try:
            while True:
                current = await run_in_threadpool(c.get, run_id)
                # metrics first, so a client sees every step before the final status; a bounded read per pass
                start, chunk = await run_in_threadpool(_read_from, path, offset, SSE_READ_BYTES)
                if start != offset:
                    buf = b""  # rewound: a partial line from before is gone
                offset = start + len(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        item = json.loads(line) if line.strip() else None
                    except ValueError:
                        continue  # a torn line (the run crashed mid-write)
                    if isinstance(item, dict):
                        yield _sse("fault" if item.get("kind") == "fault" else "metrics", item)
                if len(chunk) == SSE_READ_BYTES:
                    continue  # more to read now
                file = await run_in_threadpool(read_status, rec.output_dir) or {}
                status = (current.status, current.step, current.reason)
                if status != last_status:
                    last_status = status
                    yield _sse("status", {"status": current.status, "step": current.step,
                                          "reason": current.reason, "file_status": file.get("status")})
                if c.is_terminal(current.status) or await request.is_disconnected():
                    return
                await asyncio.sleep(poll_s)
        finally:
            slot.release()

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


@router.get("/{run_id}/artifacts/student.tar.gz",
            responses={**ERRORS, 200: {"content": {"application/gzip": {}}}, 429: {"model": Problem}},
            summary="The final student (Hugging Face folder) as a tar.gz stream, packed as it is sent (429 when "
            "too many downloads run)")
def download_student(run_id: str, request: Request):
    rec = _control(request).get(run_id)
    student = Path(rec.output_dir) / "student"
    if not (student / "config.json").is_file():
        raise ApiError(404, f"run {run_id} has no final student yet (status {rec.status}); it is saved when the "
                       "run finishes, stops or pauses")
    slot = Slot.take(request.app.state.downloads)
    if slot is None:
        return _busy("student downloads", _control(request).settings.max_downloads)
    archive = TarGzStream(student, "student", slot)

    async def chunks():
        try:
            while (data := await run_in_threadpool(archive.next_chunk)) is not None:
                yield data
        finally:
            archive.close()  # a client that left stops the packer and frees the slot

    return StreamingResponse(chunks(), media_type="application/gzip",
                             headers={"Content-Disposition": content_disposition(f"{rec.name}-student.tar.gz")})


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and the exact UTF-8 name (RFC 6266 / 5987): a run name is
    any text, and HTTP headers are Latin-1."""
    ascii_name = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("_") or "student.tar.gz"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


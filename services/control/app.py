"""The control API: `create_app(settings)`; OpenAPI at /docs.

The process holds no training state: runs are detached Ray actors writing to their run
directory, records live in SQL. A reconciler thread keeps the records of active runs fresh (its
first pass, at start-up, reconciles them with the cluster), so reads come from the database
alone; a scheduler thread starts queued runs.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DatabaseError as SQLAlchemyDatabaseError

from services.body_limit import BodyLimit
from services.control.auth import DOC_PATHS, UNAUTHORIZED, make_auth_dependency, token_ok
from services.control.core import ApiError, Control
from services.control.periodic import Periodic
from services.control.readiness import Readiness
from services.control.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    control = Control(settings)
    readiness = Readiness(control.store, control.launcher, settings.readiness_interval_s,
                          reconciled=lambda: control.reconciler.passes > 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Each loop's first pass runs at once, in the background (/healthz answers even while Ray is slow to
        # join); an interval of 0 means one pass here instead. Reconcile first: the scheduler counts active runs.
        loops = []
        if settings.readiness_interval_s > 0:
            loops.append(Periodic("control-readiness", readiness.probe, settings.readiness_interval_s).start())
        for name, fn, interval_s in (("control-reconciler", control.reconciler.tick, settings.reconcile_interval_s),
                                     ("control-scheduler", control.scheduler.tick, settings.scheduler_interval_s)):
            if interval_s > 0:
                loops.append(Periodic(name, fn, interval_s).start())
            else:
                try:
                    fn()
                except Exception:
                    log.exception("%s: start-up pass failed", name)
        yield
        for loop in loops:
            loop.close()

    app = FastAPI(title="onpolicy control", version="0.1.0", lifespan=lifespan,
                  description="Start, watch, stop, pause and resume on-policy distillation runs; attach "
                  "teachers; fetch the distilled student. Bearer token on every endpoint (these docs included) but "
                  "/healthz and /readyz.",
                  dependencies=[Depends(make_auth_dependency(settings.api_tokens))])
    app.state.control = control
    app.state.downloads = threading.BoundedSemaphore(settings.max_downloads)
    app.state.event_streams = threading.BoundedSemaphore(settings.max_event_streams)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def _docs_need_a_token(request: Request, call_next):
        # FastAPI serves the docs outside the routers, so the auth dependency never sees them.
        if settings.api_tokens and request.url.path in DOC_PATHS \
                and not token_ok(request.headers.get("authorization"), settings.api_tokens):
            return JSONResponse({"detail": UNAUTHORIZED}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.exception_handler(SQLAlchemyDatabaseError)
    @app.exception_handler(sqlite3.DatabaseError)
    async def _database_error(request: Request, err: Exception):
        # A lock held past the busy timeout, or a database that cannot be read: the client may retry; a 500
        # would say the request was wrong. The details go to the log, not to the client.
        locked = "locked" in str(err) or "busy" in str(err)
        log.warning("%s %s: database error: %s", request.method, request.url.path, err)
        detail = ("the database is busy (another writer holds its lock); retry shortly" if locked else
                  "the database cannot be read right now; retry later (the operator sees why in the API's log)")
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        detail = [{"path": ".".join(str(p) for p in e["loc"][1:]), "loc": list(e["loc"]), "msg": e["msg"],
                   "type": e["type"]} for e in err.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/healthz", tags=["ops"], summary="Liveness (no auth): the process answers (no I/O)")
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz", tags=["ops"], summary="Readiness (no auth): the reconciler has made its first pass and the "
             "database and the Ray cluster answer; 503 if not, with the reasons for a caller with a token")
    def readyz(request: Request) -> JSONResponse:
        ready, reasons = readiness.state()
        body: dict = {"ready": ready}
        if not settings.api_tokens or token_ok(request.headers.get("authorization"), settings.api_tokens):
            body["reasons"] = reasons  # they name the cluster's address: not for anonymous probes
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics: runs by status, steps, teacher latency",
             response_class=Response)
    def metrics() -> Response:
        from services.control.prom import render_metrics

        body, content_type = render_metrics(control.store)
        return Response(body, media_type=content_type)

    from services.control.routes_runs import router as runs_router
    from services.control.routes_teachers import router as teachers_router

    app.include_router(runs_router)
    app.include_router(teachers_router)
    from services.control.ui import mount_ui

    mount_ui(app)  # the dashboard at /ui
    return app

"""The control API: `create_app(settings)`; OpenAPI at /docs.

The process holds no training state: runs are detached Ray actors writing to their run
directory, records live in SQL. A reconciler thread keeps the records of active runs fresh (its
first pass, at start-up, reconciles them with the cluster), so reads come from the database
alone; a scheduler thread starts queued runs.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from services.body_limit import BodyLimit
from services.control.auth import make_auth_dependency
from services.control.core import ApiError, Control
from services.control.periodic import Periodic
from services.control.readiness import Readiness
from services.control.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    control = Control(settings)
    readiness = Readiness(control.store, control.launcher, settings.readiness_interval_s)

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
                  "teachers; fetch the distilled student. Bearer token on every endpoint but /healthz.",
                  dependencies=[Depends(make_auth_dependency(settings.api_tokens))])
    app.state.control = control
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        detail = [{"path": ".".join(str(p) for p in e["loc"][1:]), "loc": list(e["loc"]), "msg": e["msg"],
                   "type": e["type"]} for e in err.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/healthz", tags=["ops"], summary="Liveness (no auth)")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz", tags=["ops"], summary="Readiness (no auth): the database and the Ray cluster answer; 503 "
             "with the reasons if not")
    def readyz() -> JSONResponse:
        ready, reasons = readiness.state()
        return JSONResponse({"ready": ready, "reasons": reasons}, status_code=200 if ready else 503)

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
    return app

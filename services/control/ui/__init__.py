"""The dashboard at /ui: plain HTML, JS and CSS shipped in the package (no build step), and the two reads it
needs that the REST API lacks.

The page talks to the REST endpoints with the bearer token the user entered (kept in sessionStorage, sent as
an `Authorization` header, never a cookie: no CSRF surface). The static files hold no data, so they are served
without a token; everything they show comes from token-checked endpoints.

Two read-only endpoints are added for it, behind the same token as every other (the app's auth dependency):
- `GET /v1/ui/configs`: the YAML files of the server-side config folders (`ONPOLICY_UI_CONFIGS`, folders
  separated by the OS path separator; default `./configs` when it exists), to start a run from a list;
- `GET /v1/ui/runs/{run_id}/config`: the config a run was started with (the run view has no config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from services.control.core import ApiError

STATIC_DIR = Path(__file__).parent / "static"
MAX_CONFIG_FILES = 64
MAX_CONFIG_BYTES = 64 << 10
# The page loads only its own files and calls only its own origin; inline script and style are refused, so a
# run name that slipped into markup could not run code (the page also writes all data as text, never HTML).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter(prefix="/v1/ui", tags=["dashboard"])


def config_dirs() -> list[Path]:
    raw = os.environ.get("ONPOLICY_UI_CONFIGS")
    if raw is None:
        return [Path.cwd() / "configs"]
    return [Path(p) for p in raw.split(os.pathsep) if p]


@router.get("/configs", summary="The server-side configs to start a run from (YAML text of each file in the "
            "ONPOLICY_UI_CONFIGS folders; read-only)")
def list_configs() -> dict:
    items: list[dict[str, str]] = []
    for folder in config_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.y*ml")):
            if len(items) >= MAX_CONFIG_FILES:
                break
            if path.is_file() and path.suffix in (".yaml", ".yml") and path.stat().st_size <= MAX_CONFIG_BYTES:
                items.append({"name": path.name, "yaml": path.read_text(errors="replace")})
    return {"configs": items}


@router.get("/runs/{run_id}/config", summary="The config a run was started with (JSON; read-only)")
def run_config(run_id: str, request: Request) -> dict:
    rec = request.app.state.control.store.get_run(run_id)
    if rec is None:
        raise ApiError(404, f"no run with id {run_id!r}")
    return {"run_id": run_id, "config": json.loads(rec.config_json)}


class _Static(StaticFiles):
    """StaticFiles with a content security policy and no caching of the app's own files (an upgrade shows at
    once)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"content-security-policy", CSP.encode()),
                                      (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff")]
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def mount_ui(app: FastAPI) -> None:
    """Add the dashboard's reads (before the mount, so /v1/ui is never shadowed) and the static files at /ui."""
    app.include_router(router)
    app.mount("/ui", _Static(directory=STATIC_DIR, html=True), name="ui")

"""Run an ASGI app with uvicorn in a background thread, on loopback, restartable on the same port; a proxy
that edits a real server's answers (`make_mangling_proxy_app`)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """`with ServerThread(app) as srv: srv.url` -- a real HTTP server for the test's lifetime."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        import uvicorn

        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"test server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_mangling_proxy_app(upstream: str, path: str, mangle: Callable[[Any], Any]):
    """Forward every request to `upstream`; a successful answer on `path` (e.g. "v1/completions") goes back
    as `mangle(decoded body)` (a teacher that answers, but wrongly). NaN survives (as JSON's NaN literal)."""
    app = FastAPI()
    client = httpx.AsyncClient(base_url=upstream, timeout=120)

    @app.api_route("/{sub:path}", methods=["GET", "POST"])
    async def proxy(sub: str, request: Request):
        r = await client.request(
            request.method, "/" + sub, content=await request.body(),
            headers={"content-type": request.headers.get("content-type", "application/json")},
        )
        if sub == path and r.status_code == 200:
            return Response(json.dumps(mangle(r.json()), allow_nan=True), media_type="application/json")
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    return app

"""A REAL vLLM OpenAI-compatible server as a subprocess, for tests that talk to one over HTTP.

    with start_vllm_server(model_dir, max_logprobs=16) as srv:
        srv.url  # http://127.0.0.1:PORT, /health answered 200

Runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script is broken in
this environment) on CPU with a 1 GiB KV cache, float32, eager mode. Start-up takes ~30-60 s;
share one server per module. `make_stripping_proxy_app(upstream)` is a proxy in front of it
that drops `prompt_logprobs` from completions (a teacher that "does not return log-probs").
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .server import free_port


class VLLMServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_vllm_server(
    model_dir: str | Path,
    *,
    port: int | None = None,
    max_logprobs: int = 16,
    max_model_len: int = 64,
    extra_args: tuple[str, ...] = (),
    startup_timeout_s: float = 240.0,
) -> VLLMServerProcess:
    """Start the server and wait until `/health` answers; RuntimeError with its log tail if it dies."""
    port = port or free_port()
    log_path = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--max-logprobs",
        str(max_logprobs),
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = VLLMServerProcess(proc, port, log_path)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{srv.log_tail()}")
        try:
            if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    srv.stop()
    raise RuntimeError(f"vLLM server not healthy after {startup_timeout_s}s:\n{srv.log_tail()}")


def make_stripping_proxy_app(upstream: str):
    """Forward every request to `upstream`, but remove `prompt_logprobs` from completion choices."""

    app = FastAPI()
    client = httpx.AsyncClient(base_url=upstream, timeout=60)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def proxy(path: str, request: Request):
        body = await request.body()
        r = await client.request(
            request.method,
            "/" + path,
            content=body,
            headers={"content-type": request.headers.get("content-type", "application/json")},
        )
        if path == "v1/completions" and r.status_code == 200:
            data = r.json()
            for choice in data.get("choices", []):
                choice["prompt_logprobs"] = None
            return JSONResponse(data)
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    return app

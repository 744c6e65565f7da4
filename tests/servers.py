"""Start real servers as subprocesses for integration and fault tests.

- `free_port()`: a TCP port on 127.0.0.1 nobody listens on (now).
- `start_teacher_server(model_dir, port, backend="vllm", extra_env=None)`: `python -m
  services.teacher` in its own process; its output goes to a log file (`proc.log_path`), so a
  chatty engine never blocks on a full pipe.
- `wait_healthy(url, timeout, proc=None)`: poll `url` (e.g. `.../healthz`) until it answers 200;
  with `proc`, fail at once if the process died, showing the tail of its log.
- `stop_server(proc)`: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fakes.server import free_port  # noqa: F401  (re-exported for the tests)

REPO_ROOT = Path(__file__).resolve().parents[1]



def start_teacher_server(
    model_dir: str | Path,
    port: int,
    backend: str = "vllm",
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> subprocess.Popen:
    """Launch the teacher service on 127.0.0.1:`port`; returns at once (see `wait_healthy`)."""
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    fd, log_path = tempfile.mkstemp(prefix=f"teacher-{port}-", suffix=".log")
    cmd = [
        sys.executable,
        "-m",
        "services.teacher",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend",
        backend,
        *(extra_args or []),
    ]
    with os.fdopen(fd, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def log_tail(proc: subprocess.Popen, n_chars: int = 4000) -> str:
    path = getattr(proc, "log_path", None)
    if not path or not os.path.exists(path):
        return ""
    return Path(path).read_text(errors="replace")[-n_chars:]


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until GET `url` returns 200; TimeoutError (or RuntimeError if `proc` exited)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited with code {proc.returncode} before {url} was healthy:\n{log_tail(proc)}"
            )
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    tail = f"\n{log_tail(proc)}" if proc is not None else ""
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s (last: {last}){tail}")


def stop_server(proc: subprocess.Popen, grace: float = 15.0) -> int:
    """Terminate `proc` (SIGKILL if it ignores SIGTERM for `grace` s); return its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def kill_procs(procs: list) -> None:
    """SIGKILL these psutil processes (ours) and wait for them; ones already gone are skipped."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)

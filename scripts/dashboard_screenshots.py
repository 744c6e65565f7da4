"""Screenshots of the dashboard from a real run: docs/dashboard_runs.png (the runs table) and
docs/dashboard_run.png (a run page).

Starts a Ray head of its own (its own temp dir and token), the control API on a free port, builds the toy
models, starts configs/toy.yaml over REST (a few dozen steps, an evaluation every 10), opens /ui in Debian's
headless Chromium (scripts/setup.sh installs it) and photographs both pages; then stops the run and every
process it started.

    .venv/bin/python scripts/dashboard_screenshots.py [--steps 40] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := fn():
                return value
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=REPO / "docs")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dash-shots-"))
    token = secrets.token_hex(16)
    bin_dir = Path(sys.executable).parent
    # A Ray cluster and token of our own: never one another process left at /tmp/ray (Ray's `auto`).
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONPATH": str(REPO)}
    ray_port, api_port = free_port(), free_port()
    temp_dir = f"/tmp/ray_shots_{secrets.token_hex(4)}"
    api = None
    try:
        subprocess.run([str(bin_dir / "onpolicy"), "toy", "build", "--out", str(work / "toy")], check=True, env=env)
        subprocess.run([str(bin_dir / "ray"), "start", "--head", "--port", str(ray_port), "--num-cpus", "4",
                        "--disable-usage-stats", "--include-dashboard=false", "--temp-dir", temp_dir],
                       check=True, env=env, capture_output=True, timeout=300)
        log = open(work / "control.log", "wb")  # noqa: SIM115 -- open while the API runs
        api = subprocess.Popen([sys.executable, "-m", "services.control", "--port", str(api_port), "--data-dir",
                                str(work / "control"), "--models-root", str(work), "--log-level", "warning"],
                               cwd=REPO, env={**env, "RAY_ADDRESS": f"127.0.0.1:{ray_port}", "ONPOLICY_API_TOKENS": token,
                                              "ONPOLICY_UI_CONFIGS": str(REPO / "configs")},
                               stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{api_port}"
        auth = {"Authorization": f"Bearer {token}"}
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, 120, "the control API")
        cfg = yaml.safe_load((REPO / "configs" / "toy.yaml").read_text())
        cfg["model"]["student"] = str(work / "toy" / "student")
        cfg["teacher"]["model"] = str(work / "toy" / "teacher")
        cfg["schedule"]["steps"] = args.steps
        cfg.setdefault("eval", {})["every"] = 10
        r = httpx.post(f"{url}/v1/runs", json={"config": cfg, "name": "toy-addition"}, headers=auth, timeout=300)
        r.raise_for_status()
        run_id = r.json()["id"]
        print(f"run {run_id} started; waiting for step {args.steps * 3 // 4}")
        wait_for(lambda: httpx.get(f"{url}/v1/runs/{run_id}", headers=auth, timeout=10).json()["step"]
                 >= args.steps * 3 // 4, 900, "the run's steps")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.add_init_script(f"sessionStorage.setItem('onpolicy.token', {json.dumps(token)})")
            page.goto(f"{url}/ui/#/run/{run_id}")
            page.wait_for_function("() => document.querySelector('#run-before-after table')")
            page.wait_for_timeout(1500)
            args.out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out / "dashboard_run.png"), full_page=True)
            page.goto(f"{url}/ui/#/runs")
            page.wait_for_function("() => document.querySelector('#runs-table td[data-col=kl]')"
                                   " && document.querySelector('#runs-table td[data-col=kl]').textContent !== '—'")
            page.screenshot(path=str(args.out / "dashboard_runs.png"))
            browser.close()
        httpx.post(f"{url}/v1/runs/{run_id}/stop", headers=auth, timeout=120)
        print(f"wrote {args.out / 'dashboard_runs.png'} and {args.out / 'dashboard_run.png'}")
    finally:
        if api is not None and api.poll() is None:
            api.send_signal(signal.SIGKILL)
            api.wait(10)
        # only the processes of our own head (its temp dir is on their command lines)
        _kill_matching(temp_dir)


def _kill_matching(marker: str) -> None:
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or []):
                for child in [*proc.children(recursive=True), proc]:
                    child.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


if __name__ == "__main__":
    main()

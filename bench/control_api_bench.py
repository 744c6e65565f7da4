"""Latency of the control API's reads with 100 runs recorded, under concurrent clients, while a run trains.

    python bench/control_api_bench.py [--url http://127.0.0.1:8000 --token T] [--clients 20] [--seconds 15]

Without --url it starts everything itself: a Ray head (own --temp-dir and auth token; removed at
the end by killing only its processes), the API (`python -m services.control`, max_concurrent_runs=1)
and one toy run (the embedded toy student/teacher, HF teacher, one vLLM engine). The other 99
runs are queued behind it, so 100 runs are recorded while one trains. With --url the same 100 runs
are submitted to that server (the first trains if it has a slot) and stopped at the end.

Each client loops `GET /v1/runs/{id}` (the training run) and `GET /v1/runs` (all 100) for
--seconds; the table gives p50/p99/mean latency and requests/s. Both reads come from the database
alone (the API's reconciler keeps the training run's record fresh), so the run's progress shows
in them with up to a reconciler interval (1 s) of delay.

The clients are aiohttp sessions on one event loop (aiohttp comes with ray[default]). httpx's
async client spent ~4 ms of CPU per request here against ~0.3 ms for aiohttp, so with 20 clients
on one loop it measured its own queue more than the API.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "onpolicy" / "toy" / "assets"


def toy_config(steps: int = 100_000) -> dict:
    return {
        "model": {"student": str(ASSETS / "student")},
        "teacher": {"model": str(ASSETS / "teacher"), "backend": "hf"},
        "rollout": {"num_workers": 1, "prompts_per_step": 16, "max_new_tokens": 8},
        "optim": {"warmup_steps": 0, "schedule": "constant", "micro_batch_size": 16},
        "schedule": {"steps": steps},
        "eval": {"every": 0, "num_prompts": 16, "ood_num_prompts": 4},
        "checkpoint": {"every": 0, "keep": 1},
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """A Ray head + the API as subprocesses, for a standalone benchmark."""

    def __init__(self) -> None:
        self.temp_dir = f"/tmp/ray_bench_{uuid.uuid4().hex[:8]}"
        self.token = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex,
                        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH")) if p))
        self.api = None

    def start(self) -> str:
        for attempt in range(3):  # on a busy host the head's start-up can time out: retry in a fresh dir
            port = free_port()
            self.temp_dir = f"/tmp/ray_bench_{uuid.uuid4().hex[:8]}"
            res = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port),
                                  "--num-cpus", "4", "--disable-usage-stats", "--include-dashboard=false",
                                  "--temp-dir", self.temp_dir], env=self.env, cwd=ROOT, capture_output=True,
                                 text=True, timeout=600, check=False)
            if res.returncode == 0:
                break
            self.close()
            if attempt == 2:
                raise RuntimeError(f"ray start failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        api_port = free_port()
        self.data = tempfile.mkdtemp(prefix="control-bench-")
        env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{port}", "ONPOLICY_API_TOKENS": self.token}
        self.api = subprocess.Popen([sys.executable, "-m", "services.control", "--port", str(api_port),
                                     "--data-dir", self.data, "--max-concurrent-runs", "1", "--log-level",
                                     "warning"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("the control API did not start")

    def close(self) -> None:
        import psutil

        if self.api is not None:
            self.api.kill()
        victims = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.temp_dir in " ".join(p.info["cmdline"] or []):
                    victims += [p, *p.children(recursive=True)]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for p in victims:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


async def client_loop(http, url: str, run_id: str, until: float, lat: dict[str, list[float]]) -> None:
    while time.monotonic() < until:
        for name, path in (("GET /v1/runs/{id}", f"/v1/runs/{run_id}"), ("GET /v1/runs", "/v1/runs")):
            t = time.perf_counter()
            async with http.get(url + path) as r:
                await r.read()  # the whole body, as a client would before using it
            lat[name].append(time.perf_counter() - t)
            if r.status != 200:
                lat.setdefault(f"errors {name}", []).append(r.status)


async def measure(url: str, token: str | None, run_id: str, clients: int, seconds: float) -> dict:
    import aiohttp

    lat: dict[str, list[float]] = {"GET /v1/runs/{id}": [], "GET /v1/runs": []}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(limit=clients)) as http:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(http, url, run_id, until, lat) for _ in range(clients)))
    return lat


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None)
    p.add_argument("--token", default=os.environ.get("ONPOLICY_TOKEN"))
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--runs", type=int, default=100)
    args = p.parse_args()
    stack = Stack() if args.url is None else None
    url, token = args.url, args.token
    ids: list[str] = []
    try:
        if stack is not None:
            url, token = stack.start(), stack.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
            for i in range(args.runs):
                r = http.post("/v1/runs", json={"config": toy_config(), "name": f"bench-{i}"})
                r.raise_for_status()
                ids.append(r.json()["id"])
            print(f"{len(ids)} runs recorded; waiting for run {ids[0]} to train ...", file=sys.stderr)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                view = http.get(f"/v1/runs/{ids[0]}").json()
                if view["status"] == "running" and view["step"] >= 2:
                    break
                if view["status"] in ("failed", "finished", "stopped"):
                    raise SystemExit(f"run {ids[0]} is {view['status']}: {view.get('reason')}")
                time.sleep(1)
            step0 = http.get(f"/v1/runs/{ids[0]}").json()["step"]
            lat = asyncio.run(measure(url, token, ids[0], args.clients, args.seconds))
            step1 = http.get(f"/v1/runs/{ids[0]}").json()["step"]
            print(f"\n{args.clients} clients, {args.seconds:.0f}s, {len(ids)} runs recorded, training run advanced "
                  f"{step0} -> {step1} steps during the measurement")
            print(f"{'endpoint':<20} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'errors':>7}")
            for name in ("GET /v1/runs/{id}", "GET /v1/runs"):
                xs = lat[name]
                errs = len(lat.get(f"errors {name}", []))
                print(f"{name:<20} {len(xs):>9} {len(xs) / args.seconds:>8.1f} {pct(xs, 0.5) * 1e3:>8.1f} "
                      f"{pct(xs, 0.99) * 1e3:>8.1f} {statistics.mean(xs) * 1e3:>8.1f} {errs:>7}")
            for rid in reversed(ids):  # queued ones stop at once; the training run checkpoints and stops
                http.post(f"/v1/runs/{rid}/stop")
            if stack is not None:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and http.get(f"/v1/runs/{ids[0]}").json()["status"] != "stopped":
                    time.sleep(1)
    finally:
        if stack is not None:
            stack.close()


if __name__ == "__main__":
    main()

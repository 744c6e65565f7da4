"""A run on an existing Ray cluster through the Jobs API, as deploy/README.md documents it:

    ray job submit --address http://HEAD:8265 --working-dir . -- onpolicy train CONFIG

A Ray head of our own (its own ports and temp dir, so other tests' clusters are untouched), a
3-step run on tiny models submitted with the `ray` CLI, then: the job SUCCEEDED, the run wrote its
files, and its rollout worker was an actor of THIS cluster (the driver honoured RAY_ADDRESS, which
the job supervisor sets, rather than starting a Ray of its own).

The helpers here (processes by marker, a head on free ports) are shared with test_compose_smoke.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_env(**extra: str) -> dict[str, str]:
    """Our venv first on PATH (`ray`, `onpolicy`, `python`), token auth off (Ray >= 2.5x turns it on for
    a new cluster when ~/.ray/auth_token exists), no usage stats, quiet vLLM."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", VLLM_LOGGING_LEVEL="WARNING",
               # a loaded 2-core machine can take over a minute to register a node (default 60 s)
               RAY_raylet_start_wait_time_s="300")
    env.update(extra)
    return env


def _ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def processes_matching(markers: list[str]) -> set[int]:
    """PIDs whose command line contains any marker (a temp dir or port of ours), and their descendants."""
    me = os.getpid()
    found = set()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(m in cmd for m in markers):
                found.add(int(d))
    parents = _ppid_map()
    grew = True
    while grew:
        kids = {p for p, pp in parents.items() if pp in found and p not in found and p != me}
        found |= kids
        grew = bool(kids)
    return found


def kill_processes(markers: list[str], grace_s: float = 8.0) -> None:
    """SIGTERM everything `processes_matching(markers)` finds, then SIGKILL what is left. Only our
    own processes match: the markers are our unique temp dir and ports."""
    pids = processes_matching(markers)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 3.0)
        while time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"}
            if not pids:
                return
            time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def short_tmp(prefix: str) -> Path:
    """Ray's unix sockets live under its temp dir and their paths must stay short (< 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def tiny_run_config(student: Path, teacher: Path | None, out: Path, steps: int = 3, **teacher_section) -> dict:
    """A few-step run on tiny models: one rollout worker, small batches, evaluation at start and end."""
    cfg = {
        "name": "deploy-test", "seed": 0, "output_dir": str(out),
        "model": {"student": str(student)},
        "teacher": teacher_section or {"kind": "local", "model": str(teacher), "backend": "hf"},
        "rollout": {"num_workers": 1, "prompts_per_step": 16, "max_new_tokens": 6},
        "optim": {"warmup_steps": 0, "schedule": "constant", "micro_batch_size": 16},
        "schedule": {"steps": steps},
        "eval": {"every": 0, "num_prompts": 16, "ood_num_prompts": 8},
        "checkpoint": {"every": 0, "keep": 1},
    }
    return cfg


def actors_of(dashboard_url: str, class_name: str) -> list[dict]:
    """Actors (live or dead) of a class, from the cluster's state API."""
    from ray.util.state import list_actors

    return [a.__dict__ if hasattr(a, "__dict__") else dict(a)
            for a in list_actors(address=dashboard_url, filters=[("class_name", "=", class_name)],
                                 limit=1000, raise_on_missing_output=False)]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with the dashboard (the job server) on free ports, stopped by its temp dir and ports."""
    tmp = short_tmp("orj")
    gcs, dash = free_port(), free_port()
    cmd = ["ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=4",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--temp-dir={tmp}", "--disable-usage-stats"]
    markers = [str(tmp), f"127.0.0.1:{gcs}"]
    try:
        res = subprocess.run(cmd, check=False, env=local_env(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "tmp": tmp}
    finally:
        kill_processes(markers)
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_runs_a_toy_run_on_the_cluster(ray_head, tiny_model_dir, tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, tiny_teacher_dir, out)))
    sub_id = f"onpolicy-test-{uuid.uuid4().hex[:8]}"
    # The documented command, plus --no-wait/--submission-id so the test can poll and show logs.
    submit = ["ray", "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO),
              "--submission-id", sub_id, "--no-wait", "--", "onpolicy", "train", str(config)]
    res = subprocess.run(submit, check=False, env=local_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head["dashboard"])
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        status = client.get_job_status(sub_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(sub_id)
    assert status == JobStatus.SUCCEEDED, f"job {sub_id} is {status}:\n{logs[-4000:]}"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert (out / "student" / "config.json").is_file()
    # The run's actors lived in this cluster: the driver joined it through RAY_ADDRESS.
    workers = actors_of(ray_head["dashboard"], "RolloutWorker")
    assert len(workers) == 1, workers

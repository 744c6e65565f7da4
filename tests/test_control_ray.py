"""The control API with a real Ray cluster and a real toy run (tiny models, one vLLM engine, HF teacher).

A Ray head is started as a subprocess with its own `--temp-dir` (and stopped by killing only the
processes under that directory); the API runs as a subprocess joining it through RAY_ADDRESS, so
a SIGKILL of the API leaves the run's detached driver actor training.

One run is shared by the tests below, in order: events, SIGKILL of the API, stop, resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.servers import REPO_ROOT, free_port, kill_procs, wait_healthy

pytestmark = pytest.mark.slow
TOKEN = "test-token-ray"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Our own Ray auth token: ~/.ray/auth_token is shared with (and may be rewritten by) other clusters on this host.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return {**env, **RAY_ENV}


def kill_tree_matching(marker: str) -> None:
    """SIGKILL every process whose command line mentions `marker` (our head's temp dir), and its children."""
    import psutil

    victims = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                victims += [p, *p.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    kill_procs(victims)


def start_ray_head(attempts: int = 2, port: int | None = None) -> tuple[str, str]:
    """`ray start --head` in its own temp dir; on a busy host its start-up can time out, so retry once."""
    chosen = port
    for attempt in range(attempts):
        temp_dir, port = f"/tmp/ray_ctl_{uuid.uuid4().hex[:8]}", chosen or free_port()
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "4",
               "--disable-usage-stats", "--include-dashboard=false", "--temp-dir", temp_dir]
        try:
            subprocess.run(cmd, cwd=REPO_ROOT, env=ray_env(), check=True, capture_output=True, timeout=300)
            return f"127.0.0.1:{port}", temp_dir
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            kill_tree_matching(temp_dir)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ray_head():
    address, temp_dir = start_ray_head()
    try:
        yield address
    finally:
        kill_tree_matching(temp_dir)


class Api:
    def __init__(self, ray_address: str, data_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray_address = ray_address
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    def start(self) -> Api:
        env = {**ray_env(), "RAY_ADDRESS": self.ray_address, "ONPOLICY_API_TOKENS": TOKEN}
        fd, self.log_path = tempfile.mkstemp(prefix="control-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.control", "--port", str(self.port), "--data-dir",
                 str(self.data_dir), "--models-root", tempfile.gettempdir(), "--log-level", "warning"],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(f"{self.url}/healthz", timeout=60, proc=self.proc)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def get(self, path: str, **kw):
        return httpx.get(self.url + path, headers=AUTH, timeout=60, **kw)

    def post(self, path: str, **kw):
        return httpx.post(self.url + path, headers=AUTH, timeout=120, **kw)


def wait_for(fn, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last})")


def toy_config(student: Path, teacher: Path) -> dict:
    return {
        "model": {"student": str(student)},
        "teacher": {"model": str(teacher), "backend": "hf"},
        "rollout": {"num_workers": 1, "prompts_per_step": 8, "max_new_tokens": 4},
        "optim": {"lr": 0.003, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 8},
        "schedule": {"steps": 5000},
        "eval": {"every": 0, "num_prompts": 8, "ood_num_prompts": 4},
        "checkpoint": {"every": 2, "keep": 1},
    }


@pytest.fixture(scope="module")
def api(ray_head, tmp_path_factory):
    a = Api(ray_head, tmp_path_factory.mktemp("control")).start()
    yield a
    # Leave nothing training: stop the run if a test failed half-way, then the API.
    try:
        for r in a.get("/v1/runs").json()["runs"]:
            a.post(f"/v1/runs/{r['id']}/stop")
    except Exception as err:  # noqa: BLE001 -- best effort clean-up
        print(f"clean-up: could not stop the runs: {err}")
    a.kill()


@pytest.fixture(scope="module")
def state():
    return {}


def train_steps(api: Api, run_id: str) -> list[int]:
    return [r["step"] for r in api.get(f"/v1/runs/{run_id}/metrics", params={"kind": "train"}).json()["records"]]


def test_start_run_and_stream_step_events(api, state, tiny_model_dir, tiny_teacher_dir):
    assert httpx.get(api.url + "/v1/runs").status_code == 401
    r = api.post("/v1/runs", json={"config": toy_config(tiny_model_dir, tiny_teacher_dir), "name": "ctl-toy"})
    assert r.status_code == 201, r.text
    run = r.json()
    state["id"] = run_id = run["id"]
    assert run["output_dir"].startswith(str(api.data_dir.resolve()))
    steps_seen: list[int] = []
    with httpx.stream("GET", f"{api.url}/v1/runs/{run_id}/events", headers=AUTH,
                      timeout=httpx.Timeout(240, connect=10)) as resp:
        assert resp.status_code == 200
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "metrics" and '"kind": "train"' in line:
                steps_seen.append(json.loads(line[5:])["step"])
                if len(steps_seen) >= 3:
                    break
    assert steps_seen == [1, 2, 3]
    # the record catches up with the run directory within a reconciler pass (reads come from the record)
    view = wait_for(lambda: (v := api.get(f"/v1/runs/{run_id}").json())["step"] >= 3 and v, 30, "step 3 in the record")
    assert view["status"] == "running"
    assert view["latest_metrics"]["kind"] == "train" and view["policy_version"] >= 3


def test_sigkill_of_the_api_leaves_the_run_training(api, state):
    run_id = state["id"]
    before = max(train_steps(api, run_id))
    api.kill()
    run_dir = api.data_dir.resolve() / "runs" / run_id
    from onpolicy.metrics import read_metrics

    def file_step():
        return max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl", "train"))

    wait_for(lambda: file_step() >= before + 3, 120, "steps while the API is down")  # it trains on
    during = file_step()
    api.start()
    view = wait_for(lambda: (v := api.get(f"/v1/runs/{run_id}").json())["step"] >= during and v, 30,
                    "the restarted API's record to catch up")
    assert view["status"] == "running"
    runs = api.get("/v1/runs").json()["runs"]
    assert [r["id"] for r in runs] == [run_id]  # one record
    code = ("import json, ray; ray.init(address='auto', namespace='onpolicy', log_to_driver=False); "
            "print(json.dumps([a['name'] for a in ray.util.list_named_actors(all_namespaces=True) "
            "if a['namespace'] == 'onpolicy']))")
    out = subprocess.run([sys.executable, "-c", code], env={**ray_env(), "RAY_ADDRESS": api.ray_address},
                         capture_output=True, text=True, timeout=120, check=True)
    names = json.loads(out.stdout.strip().splitlines()[-1])
    assert names == [f"onpolicy-run-{run_id}"]  # one driver actor
    wait_for(lambda: max(train_steps(api, run_id)) > during + 1, 120, "steps after the restart")
    steps = train_steps(api, run_id)
    assert steps == list(range(1, len(steps) + 1))  # strictly increasing, no repeats


def test_a_killed_driver_fails_the_run_and_a_resume_carries_on(api, state):
    """SIGKILL the run's driver actor (its process, by the pid it reports): the reconciler marks the run failed
    (driver lost); a resume restarts it from the last checkpoint, and every step's metrics appear once."""
    run_id = state["id"]
    wait_for(lambda: any(a["name"].startswith("checkpoints/step_")
                         for a in api.get(f"/v1/runs/{run_id}/artifacts").json()["artifacts"]), 120, "a checkpoint")
    code = ("import ray; ray.init(address='auto', namespace='onpolicy', log_to_driver=False); "
            f"print(ray.get(ray.get_actor('onpolicy-run-{run_id}').pid.remote()))")
    out = subprocess.run([sys.executable, "-c", code], env={**ray_env(), "RAY_ADDRESS": api.ray_address},
                         capture_output=True, text=True, timeout=120, check=True)
    t0 = time.monotonic()
    os.kill(int(out.stdout.strip().splitlines()[-1]), signal.SIGKILL)  # the driver of the run this module started
    view = wait_for(lambda: (v := api.get(f"/v1/runs/{run_id}").json())["status"] == "failed" and v, 120,
                    "status failed")
    assert "driver lost" in view["reason"], view["reason"]
    killed_at = max(train_steps(api, run_id))
    r = api.post(f"/v1/runs/{run_id}/resume")
    assert r.status_code == 200, r.text
    wait_for(lambda: max(train_steps(api, run_id)) > killed_at, 300, "steps after the resume")
    print(f"driver killed at step {killed_at}: failed and resumed, training again after {time.monotonic() - t0:.0f}s")
    steps = train_steps(api, run_id)
    assert steps == list(range(1, len(steps) + 1))  # the steps after the checkpoint were logged once, not twice
    assert api.get(f"/v1/runs/{run_id}").json()["status"] == "running"


def test_stop_is_graceful_and_idempotent(api, state):
    run_id = state["id"]
    first = api.post(f"/v1/runs/{run_id}/stop")
    assert first.status_code == 200 and first.json()["status"] in ("stopping", "stopped")
    assert api.post(f"/v1/runs/{run_id}/stop").status_code == 200
    view = wait_for(lambda: (v := api.get(f"/v1/runs/{run_id}").json())["status"] == "stopped" and v, 240,
                    "status stopped")
    again = api.post(f"/v1/runs/{run_id}/stop")
    assert again.status_code == 200 and again.json()["status"] == "stopped" and again.json()["step"] == view["step"]
    arts = {a["name"]: a for a in api.get(f"/v1/runs/{run_id}/artifacts").json()["artifacts"]}
    assert f"checkpoints/step_{view['step']:07d}" in arts and "student.tar.gz" in arts
    tar = api.get(f"/v1/runs/{run_id}/artifacts/student.tar.gz")
    assert tar.status_code == 200 and tar.content[:2] == b"\x1f\x8b"
    state["stopped_at"] = view["step"]
    assert "onpolicy_runs{status=\"stopped\"} 1.0" in api.get("/metrics").text


def test_resume_continues_from_the_checkpoint_and_finishes(api, state):
    run_id, stopped_at = state["id"], state["stopped_at"]
    r = api.post(f"/v1/runs/{run_id}/resume", json={"steps": stopped_at + 3})
    assert r.status_code == 200 and r.json()["status"] in ("starting", "running"), r.text
    assert r.json()["steps"] == stopped_at + 3
    view = wait_for(lambda: (v := api.get(f"/v1/runs/{run_id}").json())["status"] in ("finished", "failed") and v,
                    300, "status finished")
    assert view["status"] == "finished", view
    assert view["step"] == stopped_at + 3
    train = api.get(f"/v1/runs/{run_id}/metrics", params={"kind": "train"}).json()["records"]
    assert [t["step"] for t in train] == list(range(1, stopped_at + 4))
    # the learner's step carried on: the first resumed step serves version stopped_at + 1
    assert [t["policy_version"] for t in train[-3:]] == [stopped_at + 1, stopped_at + 2, stopped_at + 3]
    history = [h["status"] for h in view["history"]]
    assert "stopped" in history and history[-1] == "finished"
    d = httpx.delete(f"{api.url}/v1/runs/{run_id}", headers=AUTH, timeout=60)
    assert d.status_code == 204


def test_readyz_is_503_while_ray_is_unreachable_and_200_once_it_answers(tmp_path):
    """The control API pointed at a Ray address where nothing listens yet: alive (/healthz 200) but not ready
    (/readyz 503 naming Ray); once a head starts there, ready."""
    port = free_port()
    a = Api(f"127.0.0.1:{port}", tmp_path / "control").start()
    temp_dir = None
    try:
        def not_ready():
            r = httpx.get(f"{a.url}/readyz", headers=AUTH, timeout=30)  # the reasons are for a caller with a token
            return r if r.status_code == 503 and any(x.startswith("ray: ") for x in r.json()["reasons"]) else None

        r = wait_for(not_ready, 60, "/readyz 503 naming Ray")
        assert str(port) in r.json()["reasons"][0] and httpx.get(f"{a.url}/healthz", timeout=30).status_code == 200
        _, temp_dir = start_ray_head(port=port)
        wait_for(lambda: httpx.get(f"{a.url}/readyz", timeout=30).status_code == 200, 180, "/readyz 200 with Ray up")
    finally:
        a.kill()
        if temp_dir:
            kill_tree_matching(temp_dir)

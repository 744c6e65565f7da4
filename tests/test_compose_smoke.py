"""docker-compose.yml, run without Docker: each service's own `command` and `environment`, read from
the file, started as a local process on loopback (CI has no Docker engine).

What is translated, and only this:
- `${VAR:-default}` interpolation (defaults, plus ONPOLICY_TEACHER_BACKEND=hf: the transformers
  backend starts faster than a second vLLM engine on 2 cores), and the required secrets
  (`${VAR:?...}`: RAY_AUTH_TOKEN, ONPOLICY_API_TOKENS, ONPOLICY_TEACHER_API_KEY) as fresh random
  tokens, as .env.example tells users to make them;
- every container port (from `ports:` and `--port`/`--dashboard-port` flags) gets a free host port,
  and `service:port` / `127.0.0.1:port` / `0.0.0.0` are rewritten to 127.0.0.1 and that port;
- a service name listed in ONPOLICY_TEACHER_ALLOW_HOSTS becomes 127.0.0.1 (what it resolves to
  here; in compose it is the container's private address, which is why it must be allowed);
- each named volume's mount point (/models, /data, /db) becomes a temp dir;
- `ray start` gets host-local flags that containers do not need (each has its own network
  namespace): node IP 127.0.0.1, a temp dir, and free ports for the client server and agents.
A reference to a port no service exposes fails the test, as it would fail the deployment.

Then: the init step builds the toy models; a Ray head, a second Ray node joined with the worker's
`ray start --address`, the two teacher service replicas and the control API come up and pass their
compose health checks; a 3-step toy run over both replicas posted to the REST API finishes, both
served it, and its rollout worker ran on the joined node (the head offers no CPUs, the run config
asks one per rollout worker). On the way, the secure defaults hold where a process can show them:
Ray's job API and the control API refuse requests without their tokens, and the run reaches the
teachers with the key it names by ONPOLICY_TEACHER_KEY_LOCAL.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.test_deploy_schemas import COMPOSE_FILE, fresh_secrets, interpolate
from tests.test_ray_job import free_port, kill_processes, local_env, short_tmp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("ray-head", "ray-worker", "teacher", "teacher-1", "control")
TERMINAL = ("finished", "stopped", "paused", "failed")
HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d{2,5})\b")
PORT_FLAG = re.compile(r"^(--(?:port|dashboard-port))(=)(\d+)$")
PORT_FLAGS = ("--port", "--dashboard-port")


class Translator:
    """Maps one compose file's services onto local processes (see the module docstring)."""

    def __init__(self, doc: dict, tmp: Path):
        # the monitoring profile runs Prometheus's and Grafana's own images (no onpolicy command to map onto a
        # process); test_deploy_schemas checks their files against the services' metrics
        self.services = {name: svc for name, svc in doc["services"].items()
                         if "monitoring" not in svc.get("profiles", [])}
        self.tmp = tmp
        self.ports: dict[str, dict[int, int]] = {}
        self.paths: dict[str, str] = {}
        for name, svc in self.services.items():
            own = {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in svc.get("ports", [])}
            own |= {int(str(p).split("/")[0]) for p in svc.get("expose", [])}  # reachable by the other services
            args = self.command(name, raw=True)
            for prev, arg in zip(["", *args], args):
                m = PORT_FLAG.match(arg)
                if m or prev in PORT_FLAGS:
                    own.add(int(m.group(3) if m else arg))
            self.ports[name] = {p: free_port() for p in sorted(own)}
            for vol in svc.get("volumes", []):
                source, target = str(vol).split(":")[:2]
                self.paths[target] = str(tmp / "volumes" / source)
        for path in self.paths.values():
            Path(path).mkdir(parents=True, exist_ok=True)

    def command(self, name: str, raw: bool = False) -> list[str]:
        cmd = self.services[name]["command"]
        args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        if raw:
            return args
        return [str(self.port(name, int(a))) if prev in PORT_FLAGS else self.text(name, a)
                for prev, a in zip(["", *args], args)]

    def port(self, name: str, container_port: int) -> int:
        if container_port not in self.ports[name]:
            raise AssertionError(f"port {container_port} of service {name!r} is used but {name} neither "
                                 f"publishes nor listens on it (it has {sorted(self.ports[name])})")
        return self.ports[name][container_port]

    def text(self, name: str, s: str) -> str:
        """One string of service `name` (an argument, a variable, a URL) for the local run."""
        m = PORT_FLAG.match(s)
        if m:
            return f"{m.group(1)}{m.group(2)}{self.port(name, int(m.group(3)))}"

        def host_port(m: re.Match) -> str:
            host, port = m.group("host"), int(m.group("port"))
            if host in self.services:
                return f"127.0.0.1:{self.port(host, port)}"
            if host in ("127.0.0.1", "localhost", "0.0.0.0"):
                return f"127.0.0.1:{self.port(name, port)}"
            return m.group(0)

        s = HOST_PORT.sub(host_port, s).replace("0.0.0.0", "127.0.0.1")
        for target, local in sorted(self.paths.items(), key=lambda kv: -len(kv[0])):
            s = re.sub(rf"(?<![\w.-]){re.escape(target)}(?=/|$|[^\w.-])", local, s)
        return s

    def env(self, name: str) -> dict[str, str]:
        raw = self.services[name].get("environment") or {}
        if isinstance(raw, list):
            raw = dict(item.split("=", 1) for item in raw)
        env = {k: self.text(name, "" if v is None else str(v)) for k, v in raw.items()}
        if "ONPOLICY_TEACHER_ALLOW_HOSTS" in env:
            env["ONPOLICY_TEACHER_ALLOW_HOSTS"] = ",".join(
                "127.0.0.1" if h.strip() in self.services else h
                for h in env["ONPOLICY_TEACHER_ALLOW_HOSTS"].split(","))
        return local_env(**env)

    def healthcheck(self, name: str) -> list[str] | None:
        test = (self.services[name].get("healthcheck") or {}).get("test")
        if not test:
            return None
        assert test[0] == "CMD", f"{name}: healthcheck must be an exec form ['CMD', ...]"
        return [self.text(name, a) for a in test[1:]]


class Stack:
    def __init__(self, tr: Translator, tmp: Path, secrets: dict[str, str]):
        self.tr, self.tmp, self.secrets = tr, tmp, secrets  # secrets: the values compose interpolated
        self.procs: dict[str, subprocess.Popen] = {}
        self.ray_tmp = tmp / "ray"
        self.ray_tmp.mkdir()
        self.markers = [str(tmp)]

    def ray_local_flags(self, name: str, cmd: list[str]) -> list[str]:
        if cmd[:2] != ["ray", "start"]:
            return []
        flags = ["--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}"]
        if "--head" in cmd:
            flags += [f"--temp-dir={self.ray_tmp}", f"--ray-client-server-port={free_port()}"]
        return flags

    def start(self, name: str) -> subprocess.Popen:
        cmd = self.tr.command(name)
        cmd += self.ray_local_flags(name, cmd)
        env = self.tr.env(name)
        env["RAY_TMPDIR"] = str(self.ray_tmp)
        with open(self.tmp / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        proc.cmd = cmd  # type: ignore[attr-defined]
        self.procs[name] = proc
        return proc

    def log(self, name: str, n: int = 3000) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def wait_healthy(self, name: str, timeout: float) -> None:
        """Run the service's compose health check until it passes (its process must stay up)."""
        check = self.tr.healthcheck(name)
        assert check, f"{name} has no healthcheck"
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}): {proc.cmd}\n{self.log(name)}")
            try:
                res = subprocess.run(check, check=False, cwd=REPO, env=self.tr.env(name), capture_output=True, text=True,
                                     timeout=30)
            except subprocess.TimeoutExpired:  # compose counts a slow check as a failed one, and retries
                last = "health check timed out"
                continue
            if res.returncode == 0:
                return
            last = (res.stdout + res.stderr)[-1500:]
            time.sleep(1.0)
        raise AssertionError(f"{name} not healthy after {timeout}s: {check}\n{last}\n{self.log(name)}")

    def stop(self) -> None:
        for name in ("control", "teacher", "teacher-1", "ray-worker", "ray-head"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        gcs = self.tr.ports["ray-head"].get(6379)
        kill_processes(self.markers + ([f"127.0.0.1:{gcs}"] if gcs else []))


@pytest.fixture(scope="module")
def stack():
    tmp = short_tmp("ocs")
    secrets = fresh_secrets()
    doc = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), {**secrets, "ONPOLICY_TEACHER_BACKEND": "hf"})
    tr = Translator(doc, tmp)
    st = Stack(tr, tmp, secrets)
    try:
        init = subprocess.run(tr.command("toy-models"), check=False, cwd=REPO, env=tr.env("toy-models"),
                              capture_output=True, text=True, timeout=300)
        assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
        st.start("ray-head")
        st.wait_healthy("ray-head", 150)
        st.start("ray-worker")
        st.start("teacher")
        st.start("teacher-1")
        st.start("control")
        st.wait_healthy("ray-worker", 150)
        st.wait_healthy("teacher", 180)
        st.wait_healthy("teacher-1", 180)
        st.wait_healthy("control", 120)
        yield st
    finally:
        st.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _state(ray: httpx.Client, resource: str, **filters: str) -> list[dict]:
    """Ray's state API over HTTP (what `ray list ...` calls), with the cluster's token."""
    params = {"limit": 1000, "detail": "true", "filter_keys": list(filters),
              "filter_predicates": ["="] * len(filters), "filter_values": list(filters.values())}
    r = ray.get(f"/api/v0/{resource}", params=params)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]["result"]


def _node_ids(ray: httpx.Client) -> tuple[str | None, list[str]]:
    """(head node, other nodes) alive; the head can be missing while the dashboard starts up."""
    nodes = [n for n in _state(ray, "nodes") if n["state"] == "ALIVE"]
    head = [n["node_id"] for n in nodes if n["is_head_node"]]
    return (head[0] if head else None), [n["node_id"] for n in nodes if not n["is_head_node"]]


def test_toy_run_through_the_rest_api_runs_rollouts_on_the_joined_node(stack):
    tr = stack.tr
    dashboard = f"http://127.0.0.1:{tr.port('ray-head', 8265)}"
    # Ray's job API (what `ray job submit` uses) runs nothing for a caller without the token.
    assert httpx.get(f"{dashboard}/api/jobs/", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert httpx.get(f"{dashboard}/api/jobs/", timeout=30, headers=wrong).status_code == 403
    ray = httpx.Client(base_url=dashboard, timeout=30,
                       headers={"Authorization": f"Bearer {stack.secrets['RAY_AUTH_TOKEN']}"})
    # The teacher answers only with its key (the run below sends it as ONPOLICY_TEACHER_KEY_LOCAL).
    teacher = f"http://127.0.0.1:{tr.port('teacher', 8100)}/v1/info"
    assert httpx.get(teacher, timeout=30).status_code == 401
    key = stack.secrets["ONPOLICY_TEACHER_API_KEY"]
    assert httpx.get(teacher, timeout=30, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    deadline = time.monotonic() + 120
    while True:  # the joined node registers with the head shortly after its health check
        assert stack.procs["ray-worker"].poll() is None, f"ray-worker exited:\n{stack.log('ray-worker')}"
        head_id, workers = _node_ids(ray)
        if (head_id and workers) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert head_id and len(workers) == 1, \
        f"expected the head and the joined ray-worker node: {head_id}, {workers}\n{stack.log('ray-worker')}"

    # The run config users POST in compose (deploy/toy-service.yaml), as the containers would see it.
    cfg = yaml.safe_load((REPO / "deploy" / "toy-service.yaml").read_text())
    cfg = json.loads(tr.text("control", json.dumps(cfg)))
    cfg["rollout"].update(prompts_per_step=16, max_new_tokens=6)
    cfg["optim"].update(warmup_steps=0, micro_batch_size=16)
    cfg["schedule"] = {"steps": 3}
    cfg["eval"] = {"every": 0, "num_prompts": 16, "ood_num_prompts": 8}
    cfg["checkpoint"] = {"every": 0, "keep": 1}
    assert len(cfg["teacher"]["urls"]) == 2  # both teacher replicas, as deploy/toy-service.yaml names them
    base = f"http://127.0.0.1:{tr.port('control', 8000)}"
    assert httpx.get(f"{base}/v1/runs", timeout=30).status_code == 401  # the API wants its token too
    token = stack.secrets["ONPOLICY_API_TOKENS"]
    with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {token}"}) as http:
        r = http.post("/v1/runs", json={"config": cfg})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        deadline, view = time.monotonic() + 240, {}
        while time.monotonic() < deadline:
            view = http.get(f"/v1/runs/{run_id}").json()
            if view["status"] in TERMINAL:
                break
            time.sleep(2)
        assert view.get("status") == "finished", f"{view}\n{stack.log('control')}"
        assert view["step"] == 3
        metrics = http.get(f"/v1/runs/{run_id}/metrics", params={"kind": "train"}).json()["records"]
        assert [m["step"] for m in metrics] == [1, 2, 3]
    # Both replicas scored part of the run (their own counters, from their /metrics).
    for name in ("teacher", "teacher-1"):
        prom = httpx.get(f"http://127.0.0.1:{tr.port(name, 8100)}/metrics", timeout=30,
                         headers={"Authorization": f"Bearer {key}"}).text
        scored = re.search(r"^teacher_sequences_scored_total (\S+)$", prom, re.MULTILINE)
        assert scored and float(scored.group(1)) > 0, (name, prom[-2000:])
    # output landed in the `runs` volume (mounted at /data in the containers)
    assert Path(view["output_dir"]).is_relative_to(Path(tr.paths["/data"]))

    rollout = _state(ray, "actors", class_name="RolloutWorker")
    assert len(rollout) == 1, rollout
    assert rollout[0]["node_id"] == workers[0] != head_id, (rollout, head_id, workers)
    ray.close()


def test_translation_fails_on_a_port_no_service_exposes(tmp_path):
    """A wrong address in the file (here RAY_ADDRESS=ray-head:6380) fails before anything starts."""
    doc = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), fresh_secrets())
    doc["services"]["control"]["environment"]["RAY_ADDRESS"] = "ray-head:6380"
    with pytest.raises(AssertionError, match="port 6380 of service 'ray-head'"):
        Translator(doc, tmp_path).env("control")
    doc["services"]["control"]["environment"]["RAY_ADDRESS"] = "ray-head:6379"
    env = Translator(doc, tmp_path).env("control")
    assert env["RAY_ADDRESS"].startswith("127.0.0.1:") and env["ONPOLICY_CONTROL_DATA"].startswith(str(tmp_path))
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["ONPOLICY_TEACHER_ALLOW_HOSTS"].split(",")[:2] == ["127.0.0.1", "127.0.0.1"]  # teacher, teacher-1

"""The README's commands, run verbatim on loopback in a fresh directory, so the README cannot drift
from what works. A fenced block preceded by `<!-- readme-test: NAME -->` is extracted; its lines run
as they are written, except that `RUN_ID` is replaced by the id `onpolicy runs start` printed.

The environment is a fresh user's: its own HOME holding a Ray auth token (what any earlier local
`onpolicy` run leaves in ~/.ray/auth_token, which turns token auth on for `ray start --head`), no
RAY_* variables, the venv first on PATH. Ray's files go to a temp dir of ours (RAY_TMPDIR), so
only processes we started are killed at the end, by that marker.

The Commands block also carries the checks of what its lines do: a resume continues where the run
stopped, `onpolicy eval` reproduces the run's own final evaluation, the int8 export keeps the student's
behaviour, and none of it is thrown by a stale Ray cluster record (a user's earlier `ray start` whose
processes are gone).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.test_control_ray import kill_tree_matching

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BLOCK = re.compile(r"<!-- readme-test: (?P<name>[\w-]+) -->\s*```bash\n(?P<body>.*?)```", re.DOTALL)


def readme_blocks() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    return {m["name"]: [ln for ln in m["body"].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            for m in BLOCK.finditer(text)}


# The README's long jobs and the smoke variant run here instead ("" : run elsewhere, see the test's doc).
SMOKE = {"onpolicy bench --steps 20": "onpolicy bench --steps 2", "onpolicy demo --out runs/demo": ""}


def test_readme_has_the_tested_blocks():
    blocks = readme_blocks()
    assert {"control-server", "control-client", "commands"} <= set(blocks), blocks.keys()
    assert any(line.startswith("ray start --head") for line in blocks["control-server"])
    long_jobs = {line.split("#")[0].strip() for line in blocks["commands"]} & set(SMOKE)
    assert long_jobs == set(SMOKE), "the README's long jobs changed: update SMOKE"


@pytest.fixture
def fresh_user(tmp_path):
    """(cwd, env): a working directory with the repo's configs and the toy models, and a fresh user's env."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt_", dir="/tmp"))  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ONPOLICY_"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VLLM_LOGGING_LEVEL="WARNING",
               RAY_raylet_start_wait_time_s="300")
    cwd = tmp_path / "work"
    shutil.copytree(ROOT / "configs", cwd / "configs")
    subprocess.run(["onpolicy", "toy", "build", "--out", "toy"], cwd=cwd, env=env, check=True, capture_output=True,
                   timeout=300)
    try:
        yield cwd, env
    finally:
        kill_tree_matching(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_control_plane_commands_verbatim(fresh_user):
    cwd, env = fresh_user
    blocks = readme_blocks()
    server = subprocess.Popen(["bash", "-ec", "\n".join(blocks["control-server"])], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()[-4000:]
            try:
                if httpx.get("http://127.0.0.1:8000/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not come up"
            time.sleep(1)
        run_id, env_now, outputs = None, dict(env), []
        for line in blocks["control-client"]:
            m = re.match(r"export (\w+)=(\S+)", line)
            if m:
                env_now[m[1]] = m[2]
                continue
            cmd = line.replace("RUN_ID", run_id or "RUN_ID")
            res = subprocess.run(["bash", "-ec", cmd], cwd=cwd, env=env_now, capture_output=True, text=True,
                                 timeout=900, check=False)
            assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
            outputs.append(res.stdout)
            if " runs start " in f" {line} ":
                run_id = res.stdout.split()[0]
        show = outputs[-1]
        assert '"status": "finished"' in show and '"step": 30' in show, show[-3000:]
        logs = outputs[-2]  # `runs logs -f`: every step's metrics, then the final status
        assert "[train step 30]" in logs and "[status] finished step=30" in logs, logs[-3000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def leave_a_stale_cluster_record(env: dict[str, str]) -> Path:
    """`ray start --head` as this user, then every process of it SIGKILLed by pid (a reboot, a killed
    terminal): Ray's record of the "current cluster" now points at a dead one. Returns the record."""
    import psutil

    from tests.servers import free_port, kill_procs

    record = Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    port = free_port()
    head = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "1",
                             "--disable-usage-stats", "--include-dashboard=false", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = [psutil.Process(head.pid)]
    deadline = time.monotonic() + 180
    while not (record.exists() and f":{port}" in record.read_text()):
        assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
        time.sleep(0.5)
    time.sleep(2.0)  # let it spawn its processes, then kill them all
    kill_procs(tree + tree[0].children(recursive=True))
    assert f":{port}" in record.read_text()
    return record


def test_commands_verbatim(fresh_user):
    """The README's Commands block, line by line, in a fresh directory holding a stale Ray cluster record:
    build the toy models, train, resume, evaluate, export int8 with its evaluation, bench (smoke). The demo's
    smoke variant is tests/test_demo.py."""
    cwd, env = fresh_user
    record = leave_a_stale_cluster_record(env)
    ran = []
    for line in readme_blocks()["commands"]:
        cmd = line.split("  #")[0].strip()
        cmd = SMOKE.get(cmd, cmd)
        if not cmd:
            continue
        res = subprocess.run(["bash", "-ec", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                             check=False)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        # without RAY_ADDRESS every entry point starts a Ray of its own, never the recorded (dead) cluster
        assert "Failed to connect" not in res.stderr and "ConnectionError" not in res.stderr, res.stderr[-3000:]
        ran.append((cmd, res.stdout))
    assert record.exists()  # the record was there all along
    outputs = dict(ran)
    assert len(ran) == len(readme_blocks()["commands"]) - 1  # every line but the demo ran here
    run = cwd / "runs" / "toy"
    check_resume(run, outputs["onpolicy train configs/toy.yaml schedule.steps=30 --resume"])
    check_eval_reproduces_the_run(run, outputs["onpolicy eval --student runs/toy/student"])
    check_int8_export(run / "student-int8")


def check_resume(run: Path, printed: str) -> None:
    """The resumed run picked up step, prompt stream and optimiser state, and logged every step once."""
    import json

    from onpolicy.metrics import read_metrics

    assert '"steps": 30' in printed
    train = read_metrics(run / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, 31))  # every step once
    # the learner's step came back from the checkpoint: its lr goes on past the warm-up (20 steps) instead of
    # starting it again at lr/20
    assert train[20]["lr"] > 5 * train[0]["lr"], (train[0]["lr"], train[20]["lr"])
    evals = read_metrics(run / "metrics.jsonl", kind="eval")
    assert [e["step"] for e in evals] == [0, 20, 30]  # the resumed run keeps its "before", not a second one
    summary = json.loads((run / "summary.json").read_text())
    assert summary["before"]["heldout_reverse_kl"] == evals[0]["heldout_reverse_kl"]
    state = json.loads((run / "checkpoints" / "step_0000030" / "driver_state.json").read_text())
    assert state == {"step": 30, "prompts_drawn": 30 * 128}  # configs/toy.yaml: 128 prompts a step


def check_eval_reproduces_the_run(run: Path, printed: str) -> None:
    """`onpolicy eval` of the run's final student gives the run's own final greedy accuracy."""
    import json

    from onpolicy.metrics import read_metrics

    metrics = json.loads(printed[printed.index("{"):])
    final = read_metrics(run / "metrics.jsonl", kind="eval")[-1]
    assert metrics["heldout_accuracy"] == final["heldout_accuracy"], (metrics, final)
    assert metrics["heldout_reverse_kl"] >= 0 and "ood_accuracy" in metrics


def check_int8_export(folder: Path) -> None:
    """`onpolicy export --quantize int8 --eval`: the int8 folder ran in a vLLM rollout worker and kept the
    full-precision student's behaviour (bounds and their reasons: tests/test_export.py)."""
    import json

    from tests.test_export import EXACT_MATCH_TOL, MAX_KL_TO_FULL, MIN_GREEDY_AGREEMENT, REVERSE_KL_REL_TOL

    report = json.loads((folder / "export_report.json").read_text())
    full, int8 = report["full"], report["exported"]
    assert report["heldout_prompts"] == 256
    assert abs(int8["heldout_accuracy"] - full["heldout_accuracy"]) <= EXACT_MATCH_TOL, report
    assert report["greedy_agreement"] >= MIN_GREEDY_AGREEMENT, report
    assert 0 <= report["kl_to_full"] <= MAX_KL_TO_FULL, report
    rel = abs(int8["heldout_reverse_kl"] - full["heldout_reverse_kl"]) / full["heldout_reverse_kl"]
    assert rel <= REVERSE_KL_REL_TOL, report
    assert int8["bytes"] < 0.35 * full["bytes"]

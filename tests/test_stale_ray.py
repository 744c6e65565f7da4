"""A stale Ray cluster record cannot break a run: without RAY_ADDRESS every entry point starts its own
local Ray (address `local`), never the cluster `ray start` last recorded in /tmp/ray/ray_current_cluster.

The test makes the stale record as a user would: `ray start --head` (started here), then every process of
it SIGKILLed by pid (a reboot, a killed terminal), leaving the record pointing at a dead cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from fakes.server import free_port

from tests.servers import kill_procs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RECORD = Path("/tmp/ray/ray_current_cluster")


def test_train_without_ray_address_ignores_a_stale_cluster_record(tiny_model_dir, tiny_teacher_dir, tmp_path):
    saved = RECORD.read_text() if RECORD.exists() else None
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    port = free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "1",
         "--disable-usage-stats", "--include-dashboard=false", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree: list[psutil.Process] = [psutil.Process(head.pid)]
    try:
        deadline = time.monotonic() + 180
        while not (RECORD.exists() and f":{port}" in RECORD.read_text()):
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        time.sleep(2.0)  # let it spawn its processes, then kill them all, by pid
        tree += tree[0].children(recursive=True)
        kill_procs(tree)
        assert f":{port}" in RECORD.read_text()  # the record now points at a dead cluster
        res = subprocess.run(
            [sys.executable, "-m", "onpolicy.cli", "train", "configs/toy.yaml", f"model.student={tiny_model_dir}",
             f"teacher.model={tiny_teacher_dir}", f"output_dir={tmp_path / 'run'}", "schedule.steps=2",
             "rollout.prompts_per_step=8", "rollout.max_new_tokens=4", "eval.every=0", "eval.num_prompts=8",
             "eval.ood_num_prompts=0", "checkpoint.every=0", "schedule.max_staleness=0"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        assert '"steps": 2' in res.stdout
        assert "Failed to connect" not in res.stderr and "ConnectionError" not in res.stderr
    finally:
        kill_procs(tree)
        if saved is None:
            RECORD.unlink(missing_ok=True)
        else:
            RECORD.write_text(saved)

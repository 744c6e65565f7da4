"""`onpolicy demo` end to end on the real toy models, cut to a few steps (the full demo is the
15-minute job measured in the README). That `onpolicy eval` reproduces a run's final evaluation is checked
on the README's own eval line (tests/test_readme_commands.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_demo_writes_report_plot_and_student(tmp_path):
    out, toy = tmp_path / "demo", tmp_path / "toy"
    res = subprocess.run(
        [sys.executable, "-m", "onpolicy.cli", "demo", "--out", str(out), "--toy-dir", str(toy),
         "schedule.steps=4", "eval.every=2", "eval.num_prompts=64", "eval.ood_num_prompts=16",
         "rollout.prompts_per_step=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after",
                "heldout_reverse_kl_before", "heldout_reverse_kl_after", "distill_wall_seconds", "steps",
                "ood_teacher_accuracy", "ood_student_accuracy_before", "ood_student_accuracy_after",
                "ood_reverse_kl_before", "ood_reverse_kl_after"):
        assert key in rep, key
    assert rep["steps"] == 4
    assert rep["teacher_accuracy"] >= 0.95  # the prebuilt toy teacher
    assert rep["student_accuracy_before"] <= 0.75  # the mid-trained toy student, well short of the teacher
    assert rep["heldout_reverse_kl_before"] > 0
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "student" / "model.safetensors").is_file()
    assert "gap closed" in res.stdout
    assert (toy / "teacher" / "build.json").is_file()  # built (copied) because it was missing
    # onpolicy's own lines only: no Ray, vLLM or transformers log lines, bars or warnings (--verbose shows them)
    noise = re.compile(r"^(INFO|WARNING|DEBUG) \d\d-\d\d |^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING)|"
                       r"\(raylet\)|\(pid=|Token authentication|Loading weights|Writing model shards|Warning:")
    noisy = [line for line in (res.stdout + res.stderr).splitlines() if noise.search(line)]
    assert not noisy, noisy[:5]

"""Checkpoints that are whole or absent, a resume that trusts only those, and logs that rewind with it.

A real `Learner` writes real checkpoints; damage is done to the files on disk; the kill test SIGKILLs a
child process (started here, killed by pid) while it writes checkpoints in a loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onpolicy.config import AdditionDataConfig, EvalConfig
from onpolicy.learner.checkpoint import MARKER, damage, rotate, step_dirs
from onpolicy.learner.core import Learner
from onpolicy.metrics import MetricsLog, read_metrics
from onpolicy.prompts import PromptSource
from onpolicy.recovery import DRIVER_STATE, NoCheckpoint, require_restored, restore_checkpoint
from tests.test_learner import fixed_rollouts, make_cfg, teacher_scores, tiny_model  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def _save(learner: Learner, root: Path, step: int) -> Path:
    path = root / f"step_{step:07d}"
    learner.save_checkpoint(path, {DRIVER_STATE: {"step": step, "prompts_drawn": 32 * step}})
    return path


def _params(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


def test_a_checkpoint_is_sealed_and_damage_is_named(tiny_model, tmp_path):  # noqa: F811
    learner = Learner(tiny_model, make_cfg())
    path = _save(learner, tmp_path, 1)
    assert damage(path) is None
    files = json.loads((path / MARKER).read_text())["files"]
    assert {"trainer_state.pt", "model.safetensors", DRIVER_STATE} <= set(files)
    assert not list(tmp_path.glob(".step_*"))  # the staging folder was renamed, not left behind
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "model.safetensors has" in damage(path) and "the marker says" in damage(path)
    (path / MARKER).unlink()
    assert "no COMPLETE.json" in damage(path)
    with pytest.raises(ValueError, match="is damaged"):
        learner.load_checkpoint(path)


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tiny_model, tmp_path):  # noqa: F811
    learner = Learner(tiny_model, make_cfg())
    rollouts = fixed_rollouts(learner)
    learner.train_step(rollouts, teacher_scores(rollouts))
    good = _params(learner)
    _save(learner, tmp_path, 1)
    learner.train_step(rollouts, teacher_scores(rollouts))
    newest = _save(learner, tmp_path, 2)
    (newest / "trainer_state.pt").write_bytes(b"half a file")  # a write cut short (size differs from the marker)
    fresh = Learner(tiny_model, make_cfg())
    restored = restore_checkpoint(tmp_path, fresh.load_checkpoint)
    assert restored.path.name == "step_0000001" and restored.state == {"step": 1, "prompts_drawn": 32}
    assert [(p.name, "trainer_state.pt has" in why) for p, why in restored.skipped] == [("step_0000002", True)]
    assert fresh.step == 1 and all(torch.equal(p, good[n]) for n, p in fresh.model.named_parameters())
    # rotation keeps the newest whole ones and never deletes the one a resume would take
    assert rotate(tmp_path, keep=1) == []  # step 1 is the newest whole one; step 2 is newer (kept for a look)
    assert [p.name for p in step_dirs(tmp_path)] == ["step_0000001", "step_0000002"]


def test_resume_with_no_checkpoint_is_an_error(tiny_model, tmp_path):  # noqa: F811
    with pytest.raises(NoCheckpoint, match="--resume: no checkpoint .* Start without --resume"):
        require_restored(restore_checkpoint(tmp_path / "checkpoints", lambda p: None), tmp_path)
    (tmp_path / "checkpoints" / "step_0000003").mkdir(parents=True)  # a folder, never sealed
    with pytest.raises(NoCheckpoint, match="step_0000003: no COMPLETE.json"):
        restore_checkpoint(tmp_path / "checkpoints", lambda p: None)


_WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.test_learner import make_cfg
from onpolicy.learner.core import Learner
learner = Learner({model!r}, make_cfg())
root = Path({root!r})
step = 0
while True:
    step += 1
    learner.step = step
    learner.save_checkpoint(root / f"step_{{step:07d}}", {{"driver_state.json": {{"step": step, "prompts_drawn": step}}}})
    print(step, flush=True)
"""


def test_killed_while_writing_leaves_only_whole_checkpoints(tiny_model, tmp_path):  # noqa: F811
    """SIGKILL a process in the middle of its checkpoint writes, several times at different moments: every
    folder named step_* is whole, and the newest loads."""
    root = tmp_path / "checkpoints"
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(repo=str(REPO), model=tiny_model, root=str(root))],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip()  # one checkpoint written: now it is writing more
            time.sleep(delay)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        folders = step_dirs(root)
        assert folders and all(damage(p) is None for p in folders), [(p.name, damage(p)) for p in folders]
    fresh = Learner(tiny_model, make_cfg())
    restored = restore_checkpoint(root, fresh.load_checkpoint)
    assert restored.skipped == [] and fresh.step == restored.state["step"] >= 1


def test_metrics_rewind_keeps_every_step_once(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", 10, show_progress=False)
    for step in range(1, 6):
        log.train(step, {"loss": float(step)})
    log.write("eval", 4, {"heldout_reverse_kl": 1.0})
    log.fault(5, {"actor": "learner", "action": "restarted"})
    assert log.rewind(3) == 3  # train 4, 5 and the eval at 4
    for step in range(4, 7):
        log.train(step, {"loss": float(step)})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", kind="train")] == [1, 2, 3, 4, 5, 6]
    assert read_metrics(tmp_path / "metrics.jsonl", kind="eval") == []
    assert [r["actor"] for r in read_metrics(tmp_path / "metrics.jsonl", kind="fault")] == ["learner"]


def test_prompt_stream_rewinds_to_a_checkpoint():
    source = PromptSource(AdditionDataConfig(), EvalConfig(num_prompts=8, ood_num_prompts=0), seed=3)
    first = [e.prompt for e in source.batch(40)]
    source.rewind(16)
    assert source.drawn == 16 and [e.prompt for e in source.batch(24)] == first[16:]

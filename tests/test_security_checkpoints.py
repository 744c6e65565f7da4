"""Issue 25, High 2 and Low 14: checkpoints and the final student.

A crafted checkpoint must not run code whatever kind it is: the distributed-checkpoint path (a learner
group's `dcp/`) is taken only when the marker says a group wrote it, its metadata goes through a restricted
unpickler and its byte entries through `weights_only`; the marker's SHA-256s are checked on load, and its
HMAC where a secret is set. Each crafted folder comes with a marker that agrees with its files (in the
format both today's and the previous loader read: COMPLETE.json guards against torn writes, the attacker
can write it too). A real `Learner` writes and loads; the payload is a `touch` we look for.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from onpolicy.learner.checkpoint import MARKER, damage
from onpolicy.learner.core import DCP_DIR, Learner
from onpolicy.recovery import DRIVER_STATE
from tests.test_learner import fixed_rollouts, make_cfg, teacher_scores, tiny_model  # noqa: F401 (fixture)

SECRET_ENV = "ONPOLICY_CHECKPOINT_SECRET"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _forge_marker(ckpt: Path, **extra) -> None:
    """A marker listing every file with its size (what a forger writes; readable by old and new loaders)."""
    files = {str(f.relative_to(ckpt)): f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name != MARKER}
    (ckpt / MARKER).write_text(json.dumps({"files": files, **extra}))


def _trained(tiny_model: str) -> Learner:  # noqa: F811
    learner = Learner(tiny_model, make_cfg())
    rollouts = fixed_rollouts(learner)
    learner.train_step(rollouts, teacher_scores(rollouts))  # the optimiser has state to save
    return learner


def _save(learner: Learner, path: Path) -> Path:
    learner.save_checkpoint(path, {DRIVER_STATE: {"step": learner.step, "prompts_drawn": 4}})
    return path


def _group_folder(learner: Learner, ckpt: Path, poison: object | None = None) -> None:
    """Write `dcp/` the way a learner group does (torch.distributed.checkpoint), in this one process;
    `poison` replaces the optimiser's learning rate, a non-tensor entry DCP stores as pickled bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(learner.model, learner.optimizer)
    if poison is not None:
        optim_sd["param_groups"][0]["lr"] = poison
    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt / DCP_DIR))


def test_a_dcp_folder_in_a_one_rank_checkpoint_is_never_unpickled(tiny_model, tmp_path):  # noqa: F811
    pwned = tmp_path / "pwned"
    learner = _trained(tiny_model)
    ckpt = _save(learner, tmp_path / "step_0000001")
    (ckpt / DCP_DIR).mkdir()
    (ckpt / DCP_DIR / ".metadata").write_bytes(pickle.dumps(Exploit(pwned)))
    _forge_marker(ckpt)  # the marker says nothing of a group
    fresh = Learner(tiny_model, make_cfg())
    with pytest.raises(ValueError, match="1 learner rank.*has a dcp/ folder"):
        fresh.load_checkpoint(ckpt)
    assert not pwned.exists()


def test_crafted_dcp_metadata_is_refused_by_the_restricted_unpickler(tiny_model, tmp_path):  # noqa: F811
    pwned = tmp_path / "pwned"
    learner = _trained(tiny_model)
    ckpt = _save(learner, tmp_path / "step_0000001")
    _group_folder(learner, ckpt)
    (ckpt / DCP_DIR / ".metadata").write_bytes(pickle.dumps(Exploit(pwned)))
    _forge_marker(ckpt, learner_ranks=2)  # the forger claims a group wrote it
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|refusing"):
        Learner(tiny_model, make_cfg()).load_checkpoint(ckpt)
    assert not pwned.exists()


def test_a_pickle_inside_a_dcp_byte_entry_is_refused(tiny_model, tmp_path):  # noqa: F811
    pwned = tmp_path / "pwned"
    learner = _trained(tiny_model)
    ckpt = _save(learner, tmp_path / "step_0000001")
    _group_folder(learner, ckpt, poison=Exploit(pwned))
    _forge_marker(ckpt, learner_ranks=2)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        Learner(tiny_model, make_cfg()).load_checkpoint(ckpt)
    assert not pwned.exists()


def test_a_real_group_checkpoint_loads_through_the_safe_reader(tiny_model, tmp_path):  # noqa: F811
    """What a learner group writes (dcp/, marker with learner_ranks) still loads, weights and moments intact."""
    learner = _trained(tiny_model)
    ckpt = _save(learner, tmp_path / "step_0000001")
    _group_folder(learner, ckpt)
    marker = json.loads((ckpt / MARKER).read_text())
    marker["files"].update({str(f.relative_to(ckpt)): {"bytes": f.stat().st_size, "sha256": sha256(f)}
                            for f in (ckpt / DCP_DIR).iterdir()})
    marker["learner_ranks"] = 2
    (ckpt / MARKER).write_text(json.dumps(marker))
    fresh = Learner(tiny_model, make_cfg())
    fresh.load_checkpoint(ckpt)
    assert fresh.step == learner.step == 1
    assert all(torch.equal(p, dict(learner.model.named_parameters())[n]) for n, p in fresh.model.named_parameters())
    moments = [s["exp_avg"] for s in fresh.optimizer.state.values()]
    assert moments and any(m.abs().sum() > 0 for m in moments)


def test_a_file_changed_in_place_fails_its_sha256(tiny_model, tmp_path):  # noqa: F811
    learner = _trained(tiny_model)
    ckpt = _save(learner, tmp_path / "step_0000001")
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # the last tensor's bytes, same size: the size check cannot see it
    weights.write_bytes(bytes(data))
    assert damage(ckpt) is None
    with pytest.raises(ValueError, match="model.safetensors does not match its SHA-256"):
        Learner(tiny_model, make_cfg()).load_checkpoint(ckpt)


def test_with_a_secret_the_marker_must_be_signed(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv(SECRET_ENV, "cluster-secret")
    learner = _trained(tiny_model)
    ckpt = _save(learner, tmp_path / "step_0000001")
    Learner(tiny_model, make_cfg()).load_checkpoint(ckpt)  # signed by the writer: loads
    marker = json.loads((ckpt / MARKER).read_text())
    assert len(marker["hmac"]) == 64
    torch.save({"step": 99, "rng": {"torch": torch.get_rng_state(), "cuda": [], "python": (3, (0,) * 625, None)},
                "scaler": {}}, ckpt / "trainer_state.pt")
    marker["files"]["trainer_state.pt"] = {"bytes": (ckpt / "trainer_state.pt").stat().st_size,
                                           "sha256": sha256(ckpt / "trainer_state.pt")}
    (ckpt / MARKER).write_text(json.dumps(marker))  # hashes a forger can compute; the HMAC they cannot
    fresh = Learner(tiny_model, make_cfg())
    with pytest.raises(ValueError, match="not signed with this cluster's ONPOLICY_CHECKPOINT_SECRET"):
        fresh.load_checkpoint(ckpt)
    assert fresh.step == 0


def test_the_final_student_is_staged_and_sealed(tiny_model, tmp_path):  # noqa: F811
    """Low 14: the student folder appears whole or not at all (a marker, no staging left), and a second save
    replaces it whole."""
    learner = _trained(tiny_model)
    out = tmp_path / "student"
    learner.save_model(out)
    assert (out / MARKER).is_file() and damage(out) is None
    assert {"config.json", "model.safetensors"} <= set(json.loads((out / MARKER).read_text())["files"])
    learner.save_model(out)
    assert damage(out) is None and [p.name for p in tmp_path.iterdir()] == ["student"]

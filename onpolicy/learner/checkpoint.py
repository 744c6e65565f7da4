"""Checkpoint folders that are whole or absent: written aside, sealed, renamed into place.

A checkpoint is written to a temporary folder next to its final name. `seal` then lists every file
with its size and SHA-256 in `COMPLETE.json` (the completion marker, inside the folder), with how many
learner ranks wrote it, fsyncs the files, the marker and the folder, renames the folder into place and
fsyncs the parent. A crash at any point leaves either the previous state or the whole new checkpoint:
never a folder that looks finished but is not. `damage` re-checks a folder against its marker (missing
marker, missing file, wrong size: cheap, for choosing a checkpoint and rotating); `verify` also checks
every file's SHA-256, and, when the environment holds `ONPOLICY_CHECKPOINT_SECRET`, the marker's HMAC,
so a folder someone else wrote (or edited) is refused before anything in it is unpickled. Without a
secret the hashes catch corruption, not an attacker (who can hash too): the loaders' own restrictions
(`weights_only`, dcp_reader.py) are what stop a crafted file.

Pure file handling: no torch, no Ray; the learner writes the contents, the driver picks one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path
from typing import Any

MARKER = "COMPLETE.json"
PREFIX = "step_"
SECRET_ENV = "ONPOLICY_CHECKPOINT_SECRET"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _mac(marker: dict[str, Any], secret: str) -> str:
    body = json.dumps({k: v for k, v in marker.items() if k != "hmac"}, sort_keys=True).encode()
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def staging_dir(path: Path, *, shared: bool = False, create: bool = True) -> Path:
    """An empty temporary folder next to `path` to write a checkpoint into (a stale one is removed).

    `shared`: one name for every rank of a learner group (they write into the same folder; rank 0
    creates it, `create=False` for the others, who wait at a barrier)."""
    tmp = path.parent / f".{path.name}.tmp-{'group' if shared else os.getpid()}"
    if create:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def seal(tmp: Path, path: Path, learner_ranks: int = 1) -> Path:
    """Write the marker into `tmp` (each file's size and SHA-256, `learner_ranks`, an HMAC when a secret is
    set), fsync everything, and rename `tmp` to `path` (replacing an older folder of that name only once
    the new one is complete)."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    marker: dict[str, Any] = {
        "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files},
        "learner_ranks": learner_ranks,
    }
    if secret := os.environ.get(SECRET_ENV):
        marker["hmac"] = _mac(marker, secret)
    (tmp / MARKER).write_text(json.dumps(marker))
    for p in [*files, tmp / MARKER]:
        _fsync(p)
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda d: -len(d.parts)):
        _fsync(d)
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _fsync(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def read_marker(path: Path) -> dict[str, Any] | None:
    """The folder's marker, or None when it has none or it cannot be read."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def _entry(value: Any) -> tuple[int, str | None]:
    """(bytes, sha256) of a marker entry; a marker from before hashes holds the size alone."""
    if isinstance(value, dict):
        return int(value.get("bytes", -1)), value.get("sha256")
    return int(value), None


def damage(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be trusted (sizes only), or None when it looks whole."""
    if not (path / MARKER).is_file():
        return f"no {MARKER} (the write did not finish)"
    marker = read_marker(path)
    if marker is None:
        return f"{MARKER} is unreadable"
    try:
        for name, value in marker["files"].items():
            f = path / name
            size = _entry(value)[0]
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, the marker says {size}"
    except (TypeError, ValueError):
        return f"{MARKER} is unreadable"
    return None


def verify(path: Path) -> dict[str, Any]:
    """The marker of a folder whose every file matches it (size and SHA-256) and which lists every file the
    folder holds; with ONPOLICY_CHECKPOINT_SECRET set, also signed with it. ValueError says what differs."""
    problem = damage(path)
    if problem:
        raise ValueError(f"checkpoint {path} is damaged: {problem}")
    marker = read_marker(path) or {}
    secret = os.environ.get(SECRET_ENV)
    if secret and not hmac.compare_digest(str(marker.get("hmac", "")), _mac(marker, secret)):
        raise ValueError(f"checkpoint {path}: {MARKER} is not signed with this cluster's {SECRET_ENV}: it was "
                         "written elsewhere or edited; refusing to load it")
    listed = set(marker["files"])
    unlisted = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                      if p.is_file() and p.name != MARKER and str(p.relative_to(path)) not in listed)
    if unlisted:
        raise ValueError(f"checkpoint {path} holds files its {MARKER} does not list ({', '.join(unlisted[:3])}); "
                         "refusing to load it")
    for name, value in marker["files"].items():
        digest = _entry(value)[1]
        if digest is not None and not hmac.compare_digest(sha256(path / name), str(digest)):
            raise ValueError(f"checkpoint {path} is damaged: {name} does not match its SHA-256 in {MARKER}")
    return marker


def learner_ranks(marker: dict[str, Any]) -> int:
    """How many learner ranks wrote the checkpoint (a marker from before says nothing: one)."""
    value = marker.get("learner_ranks", 1)
    return value if isinstance(value, int) and value >= 1 else 1


def step_dirs(root: Path) -> list[Path]:
    """Every `step_*` folder under `root`, oldest first."""
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())


def whole_checkpoints(root: Path) -> list[tuple[Path, str | None]]:
    """(folder, damage) for every step folder under `root`, newest first: a resume takes the first
    folder whose damage is None and reports the others it skipped."""
    return [(p, damage(p)) for p in reversed(step_dirs(root))]


def rotate(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` whole checkpoints, any damaged folder older than the newest
    whole one, and leftovers of interrupted writes; returns what was deleted."""
    whole = [p for p, bad in whole_checkpoints(root) if bad is None]
    keep_set = set(whole[:keep])
    newest = whole[0] if whole else None
    doomed = [p for p in step_dirs(root) if p not in keep_set and (newest is None or p.name < newest.name)]
    doomed += [p for p in root.glob(f".{PREFIX}*") if p.is_dir()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed

"""Checkpoint folders that are whole or absent: written aside, sealed, renamed into place.

A checkpoint is written to a temporary folder next to its final name. `seal` then lists every file
with its size in `COMPLETE.json` (the completion marker, inside the folder), fsyncs the files, the
marker and the folder, renames the folder into place and fsyncs the parent. A crash at any point
leaves either the previous state or the whole new checkpoint: never a folder that looks finished
but is not. `damage` re-checks a folder against its marker (missing marker, missing file, wrong
size), and `whole_checkpoints` lists the ones a resume may trust, newest first.

Pure file handling: no torch, no Ray; the learner writes the contents, the driver picks one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "COMPLETE.json"
PREFIX = "step_"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def seal(tmp: Path, path: Path) -> Path:
    """Write the marker into `tmp`, fsync everything, and rename `tmp` to `path` (replacing an older
    folder of that name only once the new one is complete)."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    (tmp / MARKER).write_text(json.dumps({"files": {str(p.relative_to(tmp)): p.stat().st_size for p in files}}))
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


def damage(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be trusted, or None when it is whole."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the write did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the marker says {size}"
    return None


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

"""`onpolicy toy build`: produce the toy teacher and student model folders, with caching.

For each model, in order of preference:
1. `out_dir/<name>/build.json` already records the current spec hash: keep it (nothing to do).
2. The prebuilt copy committed under `onpolicy/toy/assets/<name>` has the current spec hash:
   copy it (seconds instead of minutes of CPU training).
3. Train it from scratch (also whenever `force=True`).

The spec hash covers the architecture, the training recipe, the task and a code version, so
changing any of them makes both the cache and the committed assets stale, and they retrain.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets"
BUILD_FILE = "build.json"


def read_build_info(model_dir: str | Path) -> dict | None:
    """The build.json of a model folder, or None if absent or unreadable."""
    path = Path(model_dir) / BUILD_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_current(model_dir: str | Path, spec) -> bool:
    """True when `model_dir` holds a complete build of exactly `spec`."""
    info = read_build_info(model_dir)
    return (
        info is not None
        and info.get("spec_hash") == spec.spec_hash()
        and (Path(model_dir) / "model.safetensors").is_file()
        and (Path(model_dir) / "config.json").is_file()
    )


def _train_into(spec, dest: Path, log) -> dict:
    from onpolicy.toy.models import save_model, train_model

    model, info = train_model(spec, log=log)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    info = {
        "name": spec.name,
        "spec_hash": spec.spec_hash(),
        "spec": dataclasses.asdict(spec),
        **info,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (tmp / BUILD_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # a half-written folder never looks like a finished build
    return info


def build_toy_models(
    out_dir: str | Path, force: bool = False, specs=None, assets_dir: Path | None = None, log=print
) -> dict[str, dict]:
    """Make `out_dir/teacher` and `out_dir/student`; returns each model's build.json contents.

    `specs` (name -> ToyModelSpec) and `assets_dir` default to the shipped ones; tests override
    them. `force=True` retrains even when a cached build or a matching prebuilt copy exists.
    """
    from onpolicy.toy.models import SPECS

    specs = SPECS if specs is None else specs
    assets_dir = ASSETS_DIR if assets_dir is None else Path(assets_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, spec in specs.items():
        dest = out_dir / name
        asset = assets_dir / name
        if not force and is_current(dest, spec):
            log(f"[{name}] {dest} is up to date (spec {spec.spec_hash()}); nothing to do")
        elif not force and is_current(asset, spec):
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(asset, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            log(
                f"[{name}] used the prebuilt copy from {asset} (spec {spec.spec_hash()}); "
                "pass --force to retrain from scratch"
            )
        else:
            why = "--force" if force else "no cached build or prebuilt copy matches the spec"
            log(f"[{name}] training ({why}) -> {dest}")
            _train_into(spec, dest, log)
        results[name] = read_build_info(dest)
        log(f"[{name}] heldout exact match {results[name]['heldout_accuracy']:.3f}")
    return results

"""Build-and-cache for model folders: a folder whose `build.json` records the current build hash is
reused; otherwise it is copied from a prebuilt folder with that hash, or made from scratch.

A build is written to `<dest>.tmp` and renamed into place at the end, so a half-written folder
never looks like a finished build.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from onpolicy.kit.spec import ModelSpec, random_model

BUILD_FILE = "build.json"


def read_build_info(model_dir: str | Path) -> dict | None:
    """The build.json of a model folder, or None if absent or unreadable."""
    try:
        return json.loads((Path(model_dir) / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_current(model_dir: str | Path, build_hash: str) -> bool:
    """True when `model_dir` holds a complete build whose hash is `build_hash`."""
    info = read_build_info(model_dir)
    return (
        info is not None
        and info.get("spec_hash") == build_hash
        and (Path(model_dir) / "model.safetensors").is_file()
        and (Path(model_dir) / "config.json").is_file()
    )


def save_model(model, tokenizer, out_dir: str | Path) -> None:
    """Weights (safetensors, as the model's dtype), config and tokenizer: a Hugging Face model folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def save_random_model(out_dir: str | Path, spec: ModelSpec, tokenizer, seed: int | None = None,
                      init_std: float | None = None) -> Path:
    """A seeded random-init `spec` (see `spec.random_model`) saved as a model folder: the untrained models
    of the tests and benches. Returns the folder."""
    save_model(random_model(spec, tokenizer, seed=seed, init_std=init_std), tokenizer, out_dir)
    return Path(out_dir)


def _replace(dest: Path, fill: Callable[[Path], None]) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def build_cached(dest: str | Path, name: str, build_hash: str, make: Callable[[Path], dict], *,
                 force: bool = False, prebuilt: Path | None = None, log=print) -> dict:
    """Make `dest` a current build named `name` and return its build.json contents.

    In order: keep `dest` if it is current; copy `prebuilt` if that is current; else call
    `make(folder)`, which writes the model folder and returns what build.json should record besides the
    name and hash (accuracy, timings, the spec). `force=True` always makes.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not force and is_current(dest, build_hash):
        log(f"[{name}] {dest} is up to date (spec {build_hash}); nothing to do")
    elif not force and prebuilt is not None and is_current(prebuilt, build_hash):
        _replace(dest, lambda tmp: shutil.copytree(prebuilt, tmp))
        log(f"[{name}] used the prebuilt copy from {prebuilt} (spec {build_hash}); "
            "pass --force to retrain from scratch")
    else:
        why = "--force" if force else "no cached build or prebuilt copy matches the spec"
        log(f"[{name}] training ({why}) -> {dest}")

        def fill(tmp: Path) -> None:
            info = {"name": name, "spec_hash": build_hash, **make(tmp), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / BUILD_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

        _replace(dest, fill)
    return read_build_info(dest)


def build_task_models(out_dir: str | Path, specs: dict, assets_dir: Path, train_model: Callable, tokenizer: Callable,
                      *, force: bool = False, log=print, label: str = "held-out exact match") -> dict[str, dict]:
    """`build_cached` for each of an embedded task's model specs (name -> spec with `spec_hash()`): keep a
    current `out_dir/<name>`, else copy `assets_dir/<name>`, else `train_model(spec, log=log)` -> (model, info)
    and save it with `tokenizer()`. Returns each model's build.json contents."""
    import dataclasses

    results = {}
    for name, spec in specs.items():

        def make(folder: Path, spec=spec) -> dict:
            model, info = train_model(spec, log=log)
            save_model(model, tokenizer(), folder)
            return {"spec": dataclasses.asdict(spec), **info}

        results[name] = build_cached(Path(out_dir) / name, name, spec.spec_hash(), make, force=force,
                                     prebuilt=assets_dir / name, log=log)
        log(f"[{name}] {label} {results[name]['heldout_accuracy']:.3f}")
    return results

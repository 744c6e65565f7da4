"""`onpolicy toy build`: produce the toy teacher and student model folders, with caching.

For each model, in order of preference (the kit's build-and-cache):
1. `out_dir/<name>/build.json` already records the current spec hash: keep it (nothing to do).
2. The prebuilt copy committed under `onpolicy/toy/assets/<name>` has the current spec hash:
   copy it (seconds instead of minutes of CPU training).
3. Train it from scratch (also whenever `force=True`).

The spec hash covers the architecture, the training recipe, the task and a code version, so
changing any of them makes both the cache and the committed assets stale, and they retrain.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from onpolicy.kit import build as kit_build

ASSETS_DIR = Path(__file__).parent / "assets"


def is_current(model_dir: str | Path, spec) -> bool:
    """True when `model_dir` holds a complete build of exactly `spec`."""
    return kit_build.is_current(model_dir, spec.spec_hash())


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
    results = {}
    for name, spec in specs.items():

        def make(folder: Path, spec=spec) -> dict:
            from onpolicy.toy.models import shared_tokenizer, train_model

            model, info = train_model(spec, log=log)
            kit_build.save_model(model, shared_tokenizer(), folder)
            return {"spec": dataclasses.asdict(spec), **info}

        results[name] = kit_build.build_cached(Path(out_dir) / name, name, spec.spec_hash(), make, force=force,
                                               prebuilt=assets_dir / name, log=log)
        log(f"[{name}] heldout exact match {results[name]['heldout_accuracy']:.3f}")
    return results

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

from pathlib import Path

from onpolicy.kit import build as kit_build

ASSETS_DIR = Path(__file__).parent / "assets"


def is_current(model_dir: str | Path, spec) -> bool:
    """True when `model_dir` holds a complete build of exactly `spec`."""
    return kit_build.is_current(model_dir, spec.spec_hash())


def build_toy_models(
    out_dir: str | Path, force: bool = False, specs=None, assets_dir: Path | None = None, log=print,
    with_bpe_teacher: bool | None = None,
) -> dict[str, dict]:
    """Make `out_dir/teacher`, `out_dir/student` and `out_dir/teacher-bpe` (the teacher with a byte-level BPE
    tokenizer, `toy/bpe_teacher.py`); returns each model's build.json contents.

    `specs` (name -> ToyModelSpec) and `assets_dir` default to the shipped ones; tests override
    them (and then get no BPE teacher unless `with_bpe_teacher`). `force=True` retrains even when a cached build
    or a matching prebuilt copy exists.
    """
    with_bpe_teacher = specs is None if with_bpe_teacher is None else with_bpe_teacher
    from onpolicy.toy.models import SPECS, shared_tokenizer, train_model

    assets_dir = ASSETS_DIR if assets_dir is None else Path(assets_dir)
    results = kit_build.build_task_models(out_dir, SPECS if specs is None else specs, assets_dir, train_model,
                                          shared_tokenizer, force=force, log=log, label="heldout exact match")
    if with_bpe_teacher:  # the teacher with another tokenizer (cross-tokenizer distillation, docs/teachers.md)
        from onpolicy.toy import bpe_teacher

        name = bpe_teacher.NAME
        results[name] = bpe_teacher.build(Path(out_dir) / name, force=force, prebuilt=assets_dir / name, log=log)
        log(f"[{name}] heldout exact match {results[name]['heldout_accuracy']:.3f}")
    return results

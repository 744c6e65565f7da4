"""`onpolicy toy build --task working`: the working task's teacher and student folders, with the kit's
build-and-cache (keep a current build, else copy the prebuilt one committed under
`onpolicy/working/assets/<name>`, else train; `force=True` always trains)."""

from __future__ import annotations

from pathlib import Path

from onpolicy.kit import build as kit_build

ASSETS_DIR = Path(__file__).parent / "assets"


def build_working_models(out_dir: str | Path, force: bool = False, specs=None, assets_dir: Path | None = None,
                         log=print) -> dict[str, dict]:
    """Make `out_dir/teacher` and `out_dir/student`; returns each model's build.json contents. `specs`
    (name -> WorkingModelSpec) and `assets_dir` default to the shipped ones."""
    from onpolicy.working.models import SPECS, shared_tokenizer, train_model

    return kit_build.build_task_models(out_dir, SPECS if specs is None else specs,
                                       ASSETS_DIR if assets_dir is None else Path(assets_dir), train_model,
                                       shared_tokenizer, force=force, log=log,
                                       label="held-out exact match (long working)")

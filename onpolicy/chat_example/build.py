"""Build the chat example: the word-problem data set (Parquet), a BPE tokenizer with a ChatML
template trained on it, and a Qwen2-architecture teacher and student trained on it.

Layout (the defaults; `scripts/build_chat_example.py --help` moves them):
    examples/chat/data/train.parquet, test.parquet   conversations + answers (small, committed)
    examples/chat/models/teacher, student            Hugging Face folders (built here, git-ignored)

A model whose folder already records the current build hash (architecture, recipe, data set,
tokenizer, code version) is kept, so running the script again costs seconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from onpolicy.chat_example.models import SPECS, ChatModelSpec
from onpolicy.chat_example.problems import make_dataset, read_parquet, write_parquet
from onpolicy.chat_example.tokenizer import render_chatml, train_tokenizer

DATA_DIR = Path("examples/chat/data")
MODELS_DIR = Path("examples/chat/models")
BUILD_FILE = "build.json"
# File names `datasets` reads as the `train` and `test` splits of a data folder.
SPLIT_FILES = {"train": "train.parquet", "test": "test.parquet"}


@dataclass(frozen=True)
class ChatExampleSpec:
    """Everything a build depends on besides the code."""

    n_train: int = 4000
    n_heldout: int = 256
    seed: int = 0
    vocab_size: int = 512
    models: tuple[ChatModelSpec, ...] = (SPECS["teacher"], SPECS["student"])

    def model_hash(self, model: ChatModelSpec) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "models"}
        return model.spec_hash(json.dumps(data, sort_keys=True))


FULL = ChatExampleSpec()
# For tests: the same code path in seconds (2- and 1-layer 64-wide models trained for a few steps).
SMALL = ChatExampleSpec(
    n_train=300, n_heldout=32, vocab_size=320,
    models=(ChatModelSpec("teacher", 2, 64, 2, 1, 128, steps=3, batch_size=16, warmup_steps=1),
            ChatModelSpec("student", 1, 64, 2, 2, 128, steps=2, batch_size=16, warmup_steps=1, seed=1)),
)


def write_data(spec: ChatExampleSpec, data_dir: Path, log=print) -> dict[str, list[dict]]:
    """Write the splits unless identical rows are already there (a committed file stays byte-identical)."""
    train, heldout = make_dataset(spec.n_train, spec.n_heldout, spec.seed)
    rows = {"train": train, "test": heldout}
    for split, name in SPLIT_FILES.items():
        path = data_dir / name
        if path.is_file() and read_parquet(path) == rows[split]:
            log(f"[data] {path} is up to date ({len(rows[split])} rows)")
        else:
            write_parquet(rows[split], path)
            log(f"[data] wrote {path} ({len(rows[split])} rows, {path.stat().st_size / 1024:.0f} KiB)")
    return rows


def _is_current(model_dir: Path, build_hash: str) -> bool:
    try:
        info = json.loads((model_dir / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return info.get("build_hash") == build_hash and (model_dir / "model.safetensors").is_file()


def build_chat_example(models_dir: str | Path = MODELS_DIR, data_dir: str | Path = DATA_DIR,
                       spec: ChatExampleSpec = FULL, force: bool = False, log=print) -> dict[str, dict]:
    """Write the data set and build `models_dir/teacher` and `models_dir/student`; returns each
    model's build.json contents."""
    models_dir, data_dir = Path(models_dir), Path(data_dir)
    rows = write_data(spec, data_dir, log)
    tokenizer = None
    results = {}
    for model in spec.models:
        dest = models_dir / model.name
        build_hash = spec.model_hash(model)
        if not force and _is_current(dest, build_hash):
            log(f"[{model.name}] {dest} is up to date (build {build_hash}); pass --force to retrain")
        else:
            if tokenizer is None:  # one tokenizer for both: the run checks teacher and student share it
                tokenizer = train_tokenizer((render_chatml(r["messages"]) for r in rows["train"]),
                                            spec.vocab_size)
            _train_into(model, build_hash, tokenizer, rows, dest, log)
        results[model.name] = json.loads((dest / BUILD_FILE).read_text())
    return results


def _train_into(model_spec: ChatModelSpec, build_hash: str, tokenizer, rows, dest: Path, log) -> None:
    from onpolicy.chat_example.models import train_model

    model, info = train_model(model_spec, tokenizer, rows["train"], rows["test"], log=log)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    info = {"name": model_spec.name, "build_hash": build_hash, "spec": dataclasses.asdict(model_spec), **info,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (tmp / BUILD_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)  # a half-written folder never looks like a finished build


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
from dataclasses import dataclass
from pathlib import Path

from onpolicy.chat_example.models import CODE_VERSION, SPECS, chat_spec, train_model
from onpolicy.chat_example.problems import make_dataset, read_parquet, write_parquet
from onpolicy.chat_example.tokenizer import render_chatml, train_tokenizer
from onpolicy.kit.build import build_cached, save_model
from onpolicy.kit.spec import ModelSpec, spec_hash

DATA_DIR = Path("examples/chat/data")
MODELS_DIR = Path("examples/chat/models")
# File names `datasets` reads as the `train` and `test` splits of a data folder.
SPLIT_FILES = {"train": "train.parquet", "test": "test.parquet"}


@dataclass(frozen=True)
class ChatExampleSpec:
    """Everything a build depends on besides the code."""

    n_train: int = 4000
    n_heldout: int = 256
    seed: int = 0
    vocab_size: int = 512
    models: tuple[ModelSpec, ...] = (SPECS["teacher"], SPECS["student"])

    def model_hash(self, model: ModelSpec) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "models"}
        return spec_hash(model, CODE_VERSION, data=json.dumps(data, sort_keys=True))


FULL = ChatExampleSpec()
# For tests: the same code path in seconds (2- and 1-layer 64-wide models trained for a few steps).
SMALL = ChatExampleSpec(
    n_train=300, n_heldout=32, vocab_size=320,
    models=(chat_spec(name="teacher", num_layers=2, hidden=64, heads=2, kv_heads=1, intermediate=128, steps=3,
                      batch_size=16, warmup_steps=1),
            chat_spec(name="student", num_layers=1, hidden=64, heads=2, kv_heads=2, intermediate=128, steps=2,
                      batch_size=16, warmup_steps=1, seed=1)),
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


def build_chat_example(models_dir: str | Path = MODELS_DIR, data_dir: str | Path = DATA_DIR,
                       spec: ChatExampleSpec = FULL, force: bool = False, log=print) -> dict[str, dict]:
    """Write the data set and build `models_dir/teacher` and `models_dir/student`; returns each
    model's build.json contents."""
    rows = write_data(spec, Path(data_dir), log)
    tokenizer = None

    def make(folder: Path, model_spec: ModelSpec) -> dict:
        nonlocal tokenizer
        if tokenizer is None:  # one tokenizer for both: the run checks teacher and student share it
            tokenizer = train_tokenizer((render_chatml(r["messages"]) for r in rows["train"]), spec.vocab_size)
        model, info = train_model(model_spec, tokenizer, rows["train"], rows["test"], log=log)
        save_model(model, tokenizer, folder)
        return {"spec": dataclasses.asdict(model_spec), **info}

    return {m.name: build_cached(Path(models_dir) / m.name, m.name, spec.model_hash(m),
                                 lambda folder, m=m: make(folder, m), force=force, log=log)
            for m in spec.models}

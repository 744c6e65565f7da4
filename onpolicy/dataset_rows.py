"""Prompts from anything the `datasets` library reads (data.task=dataset).

`data.source` is a local .jsonl/.json/.parquet/.csv file, a dataset folder (written by `save_to_disk`,
or holding data files per split), or a hub id. Each row becomes an `Example`: `data.prompt_field` gives
plain text; `data.messages_field` an OpenAI-style conversation ([{role, content}]) whose final assistant
turn, if any, is dropped (the student writes that turn). `data.answer_field`, when set, is what exact
match expects.

Every row is checked when the source is read, before any engine starts: a missing column, an empty
or malformed value, a conversation without a user turn -> ValueError naming the row and the field. A
streamed split (`data.streaming`) is checked as it is read: its held-out rows up front, training rows
when they are drawn.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onpolicy.config import DataConfig
from onpolicy.types import Example

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant", "tool")
HELDOUT_SEED = 20_241_128  # which rows are held out does not depend on the run seed
SHUFFLE_BUFFER = 10_000  # rows a streamed split is shuffled within


def _load(data: DataConfig, split: str, streaming: bool) -> Any:
    """One split of `data.source` as a `Dataset` (or `IterableDataset` when streaming)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    src = data.source or ""
    path = Path(src).expanduser()
    try:
        if path.is_file():
            fmt = FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise ValueError(f"data.source {src}: unknown file type {path.suffix!r}; use one of "
                                 f"{', '.join(FORMATS)}, a dataset folder or a hub id")
            if split != "train":
                raise ValueError(f"data.source {src} is one file, so its only split is `train` (got {split!r}); "
                                 "hold out rows with data.heldout_fraction instead")
            return load_dataset(fmt, data_files=str(path), split="train", streaming=streaming)
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            ds = load_from_disk(str(path))
            if isinstance(ds, DatasetDict):
                if split not in ds:
                    raise ValueError(f"data.source {src} has no split {split!r} (it has {', '.join(ds)})")
                ds = ds[split]
            elif split != "train":
                raise ValueError(f"data.source {src} holds one split, `train` (got {split!r})")
            return ds.to_iterable_dataset() if streaming else ds
        if path.is_dir():  # data files per split (train.parquet, test.parquet, ...): `datasets` names the splits
            return load_dataset(str(path), split=split, streaming=streaming)
        if path.is_absolute() or src.startswith(".") or path.suffix.lower() in FORMATS:
            raise FileNotFoundError(f"data.source not found: {src}")
        return load_dataset(src, split=split, streaming=streaming)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 - datasets/pyarrow raise many types for unreadable data
        hint = _first_bad_json_line(path) if path.is_file() and FORMATS.get(path.suffix.lower()) == "json" else None
        raise ValueError(hint or f"data.source {src}: could not read split {split!r}: {type(err).__name__}: {err}") \
            from None


def _first_bad_json_line(path: Path) -> str | None:
    """For a JSON-lines file `datasets` could not read: the first line that is not a JSON object."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path}:{n}: not valid JSON ({err.msg}); each line must be one JSON object (a row)"
        if not isinstance(rec, dict):
            return f"{path}:{n}: expected a JSON object (a row), got a {type(rec).__name__}"
    return None


def _check_columns(ds: Any, data: DataConfig, where: str) -> None:
    columns = ds.column_names
    if columns is None:  # a stream whose columns are not known before reading
        return
    for name in ("prompt_field", "messages_field", "answer_field"):
        field = getattr(data, name)
        if field is not None and field not in columns:
            raise ValueError(f"{where}: no column {field!r} (data.{name}); the columns are {', '.join(columns)}")


def row_to_example(row: Any, data: DataConfig, where: str) -> Example:
    """One dataset row -> `Example`; ValueError naming `where` (the row) and the field for anything wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a row of named fields, got a {type(row).__name__}")  # noqa: TRY004

    def get(field: str) -> Any:
        if field not in row:
            raise ValueError(f"{where}: field {field!r} is missing")
        if row[field] is None:
            raise ValueError(f"{where}: field {field!r} is empty (null)")
        return row[field]

    answer = None
    if data.answer_field is not None:
        value = get(data.answer_field)
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: field {data.answer_field!r} must be text (got a {type(value).__name__})")
        answer = str(value)
    if data.prompt_field is not None:
        prompt = get(data.prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: field {data.prompt_field!r} must be a non-empty string (got {prompt!r})")
        return Example(prompt=prompt, answer=answer, where=where)
    field = data.messages_field or ""
    messages = _conversation(get(field), f"{where}: field {field!r}")
    last_user = next(c for r, c in reversed(messages) if r == "user")
    return Example(prompt=last_user, answer=answer, messages=messages, where=where)


def _conversation(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """[{role, content}, ...] -> ((role, content), ...) without a final assistant turn; needs a user turn."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages, got {value!r:.80}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {i} is a {type(m).__name__}, not a {{role, content}} object")  # noqa: TRY004
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {i} ({role}) has no text content (got {content!r:.80})")  # noqa: TRY004
        out.append((role, content))
    if out[-1][0] == "assistant":
        out.pop()
    if not any(role == "user" for role, _ in out):
        raise ValueError(f"{where}: the conversation has no user turn (before the final assistant turn), so "
                         "there is nothing to answer")
    return tuple(out)


def _examples(ds: Any, data: DataConfig, where: str, limit: int | None = None) -> list[Example]:
    fields = [f for f in (data.prompt_field, data.messages_field, data.answer_field) if f is not None]
    if not data.streaming:
        ds = ds.select_columns(fields)
    out = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        out.append(row_to_example(row, data, f"{where} row {i}"))
    return out


class DatasetSource:
    """The held-out examples and an endless, seeded stream of training examples of one dataset source."""

    def __init__(self, data: DataConfig, num_heldout: int, seed: int):
        self.data, self.seed = data, seed
        where = f"{data.source} (split {data.split!r})"
        train = _load(data, data.split, data.streaming)
        _check_columns(train, data, where)
        self.heldout: list[Example] = []
        if data.heldout_split is not None:
            held = _load(data, data.heldout_split, data.streaming)
            _check_columns(held, data, f"{data.source} (split {data.heldout_split!r})")
            self.heldout = _examples(held, data, f"{data.source} (split {data.heldout_split!r})", num_heldout)
        self.train: list[Example] | None = None
        self._stream_ds, self._stream_skip = None, 0
        if data.streaming:
            if data.heldout_split is None and data.heldout_fraction > 0:
                self.heldout = _examples(train, data, where, num_heldout)
                self._stream_skip = len(self.heldout)
            self._stream_ds = train
            self._where = where
            return
        examples = _examples(train, data, where)
        if data.heldout_split is None and data.heldout_fraction > 0 and examples:
            order = list(range(len(examples)))
            random.Random(HELDOUT_SEED).shuffle(order)
            n_held = min(math.ceil(data.heldout_fraction * len(examples)), len(examples) - 1)
            held = set(order[:n_held])
            self.heldout = [examples[i] for i in sorted(held)][:num_heldout]
            examples = [e for i, e in enumerate(examples) if i not in held]
        if not examples:
            raise ValueError(f"{where}: no training rows")
        self.train = examples

    def stream(self) -> Iterator[Example]:
        """Training examples forever, epoch after epoch, each epoch shuffled with the run seed: the same
        sequence for the same (source, seed), so a resumed run skips what it drew and goes on."""
        for epoch in range(1_000_000_000):
            if self.train is not None:
                order = list(range(len(self.train)))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
                yield from (self.train[i] for i in order)
                continue
            ds = self._stream_ds.skip(self._stream_skip).shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
            ds.set_epoch(epoch)
            n = 0
            for n, row in enumerate(ds, 1):
                yield row_to_example(row, self.data, f"{self._where} streamed row {n - 1} (epoch {epoch})")
            if n == 0:
                raise ValueError(f"{self._where}: no training rows")

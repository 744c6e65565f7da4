"""Prompt sources: where training prompts and the held-out splits come from.

`addition` is the embedded toy task; `jsonl` reads `{"prompt", "answer"?, "split"?}` lines
(split is `train` (default), `heldout` or `ood`). Every example is checked by exact match of
the decoded completion against its answer.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from onpolicy.config import DataConfig, EvalConfig
from onpolicy.toy.task import AdditionTask
from onpolicy.types import Example


class PromptSource:
    """Training prompt stream plus the fixed held-out (`heldout`) and out-of-distribution (`ood`) sets.

    The stream is deterministic in (seed, number drawn), so a resumed run continues where it
    stopped: pass `skip` = prompts already consumed.
    """

    def __init__(self, data: DataConfig, evalc: EvalConfig, seed: int, *, skip: int = 0):
        if data.task == "addition":
            task = AdditionTask(data.min_digits, data.max_digits, data.ood_digits)
            self.heldout = task.heldout(evalc.num_prompts)
            self.ood = task.ood(evalc.ood_num_prompts) if evalc.ood_num_prompts else []
            stream: Iterator[Example] = task.train_stream(seed, exclude=self.heldout)
        else:
            train, self.heldout, self.ood = _read_jsonl(Path(data.prompts_path or ""))
            self.heldout = self.heldout[: evalc.num_prompts]
            self.ood = self.ood[: evalc.ood_num_prompts]
            stream = itertools.cycle(train)
        self._stream = stream
        self.drawn = 0
        for _ in range(skip):
            self.next()

    def next(self) -> Example:
        self.drawn += 1
        return next(self._stream)

    def batch(self, n: int) -> list[Example]:
        return [self.next() for _ in range(n)]


def _read_jsonl(path: Path) -> tuple[list[Example], list[Example], list[Example]]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path} (set data.prompts_path)")
    splits: dict[str, list[Example]] = {"train": [], "heldout": [], "ood": []}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            split = rec.get("split", "train")
            splits[split].append(Example(prompt=rec["prompt"], answer=str(rec.get("answer", ""))))
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{path}:{n}: expected {{\"prompt\": str, \"answer\"?: str, "
                             f"\"split\"?: train|heldout|ood}}: {err}") from None
    if not splits["train"]:
        raise ValueError(f"{path}: no training prompts (lines without split or with split=train)")
    return splits["train"], splits["heldout"], splits["ood"]


def encode_prompts(tokenizer, examples: list[Example]) -> list[list[int]]:
    return [list(tokenizer(e.prompt)["input_ids"]) for e in examples]


def exact_match(tokenizer, completion_ids: list[int], example: Example) -> bool:
    text = tokenizer.decode(completion_ids, skip_special_tokens=True)
    return text.strip() == example.answer.strip()

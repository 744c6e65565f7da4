"""Prompt sources: where training prompts and the held-out splits come from.

`addition` is the embedded toy task, `working` the second (arithmetic with the working written out);
`jsonl` reads `{"prompt", "answer"?, "split"?}` lines (split is `train` (default), `heldout` or `ood`);
`dataset` reads anything the `datasets` library does, plain text or chat conversations
(`onpolicy.dataset_rows`). Every example with an answer is checked by exact match of the decoded
completion against it; a split reports accuracy only when every example has one (a JSONL line without
`answer` has none: an empty answer is `"answer": ""`).

Everything is checked when the source is built, before any engine starts: each file line (an
object, a non-empty `prompt` string, a known split; errors name file:line), and, with
`check_lengths`, every prompt against the longest prompt the student and the teacher accept
(their max length minus `rollout.max_new_tokens`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from onpolicy.chat import render_ids
from onpolicy.config import DataConfig, EvalConfig
from onpolicy.dataset_rows import DatasetSource
from onpolicy.toy.task import AdditionTask
from onpolicy.types import Example
from onpolicy.working.task import WorkingTask

SPLITS = ("train", "heldout", "ood")


class PromptSource:
    """Training prompt stream plus the fixed held-out (`heldout`) and out-of-distribution (`ood`) sets.

    The stream is deterministic in (seed, number drawn), so a resumed run continues where it
    stopped: pass `skip` (or call `advance`) with the prompts already consumed.
    """

    def __init__(self, data: DataConfig, evalc: EvalConfig, seed: int, *, skip: int = 0):
        self.data = data
        self.skipped_long = 0
        self.unseen: list[Example] = []  # an OOD split no model was trained on (the embedded tasks' `unseen_digits`)
        if data.task == "addition":
            task = AdditionTask(data.min_digits, data.max_digits, data.ood_digits)
            self.heldout = task.heldout(evalc.num_prompts)
            self.ood = task.ood(evalc.ood_num_prompts) if evalc.ood_num_prompts else []
            if data.unseen_digits is not None and evalc.ood_num_prompts:
                self.unseen = task.unseen(evalc.ood_num_prompts, data.unseen_digits)
            self._train: list[Example] | None = None
            # The longest training prompt the task can draw (both operands at max_digits).
            self._longest = [Example(prompt=f"{'9' * data.max_digits}+{'9' * data.max_digits}=", answer="")]
            self._make_stream = lambda: task.train_stream(seed, exclude=self.heldout)
        elif data.task == "working":
            work = WorkingTask(data.operation, data.min_digits, data.max_digits, data.ood_digits, data.unseen_digits or 0)
            self.heldout = work.heldout(evalc.num_prompts)
            self.ood = work.ood(evalc.ood_num_prompts) if evalc.ood_num_prompts else []
            if data.unseen_digits is not None and evalc.ood_num_prompts:
                self.unseen = work.unseen(evalc.ood_num_prompts)
            self._train, self._longest = None, [work.longest_prompt()]
            self._make_stream = lambda: work.train_stream(seed, exclude=self.heldout)
        elif data.task == "dataset":
            ds = DatasetSource(data, evalc.num_prompts, seed)
            self.heldout, self.ood, self._train, self._longest = ds.heldout, [], ds.train, []
            self._make_stream = lambda: filter(self._short_enough, ds.stream())
        else:
            train, heldout, ood = read_prompts_file(Path(data.prompts_path or ""))
            self.heldout = heldout[: evalc.num_prompts]
            self.ood = ood[: evalc.ood_num_prompts]
            self._train = train
            self._longest = []
            self._make_stream = lambda: itertools.cycle(self._train)
        self._too_long: Callable[[Example], bool] | None = None  # streamed training prompts, checked when drawn
        self._limit = ""
        self._stream: Iterator[Example] = self._make_stream()
        self.drawn = 0
        self.advance(skip)

    def rewind(self, n: int) -> None:
        """Back to the state after `n` prompts (a learner restarted from a checkpoint redoes the steps after it)."""
        self._stream = self._make_stream()
        self.drawn = 0
        self.advance(n)

    def advance(self, n: int) -> None:
        """Skip `n` prompts (a resumed run continues the stream where it stopped)."""
        for _ in range(n):
            self.next()

    def next(self) -> Example:
        self.drawn += 1
        return next(self._stream)

    def batch(self, n: int) -> list[Example]:
        return [self.next() for _ in range(n)]

    @property
    def chat(self) -> bool:
        """Whether prompts are conversations (rendered with the chat template)."""
        return self.data.task == "dataset" and self.data.messages_field is not None

    def _short_enough(self, e: Example) -> bool:
        """(A streamed split's training prompts are length-checked as they are drawn.)"""
        if self._too_long is None or not self._too_long(e):
            return True
        if not self.data.skip_long_prompts:
            raise ValueError(f"a streamed training prompt is longer than {self._limit}: {e.prompt[:80]!r}; "
                             "set data.skip_long_prompts=true to drop such prompts (they are counted)")
        self.skipped_long += 1
        return False

    def check_lengths(self, tokenizer, max_prompt_tokens: int | None, limit_by: str) -> None:
        """Refuse a prompt that encodes to no tokens (vLLM cannot prefill it), and refuse (or, with
        `data.skip_long_prompts`, drop and count) prompts over `max_prompt_tokens` (None: no limit known).

        `limit_by` says whose limit it is (student/teacher max length minus max_new_tokens), for the message."""
        if self.drawn:
            raise RuntimeError("check_lengths must run before the first prompt is drawn")
        limit = max_prompt_tokens if max_prompt_tokens is not None else float("inf")

        def too_long(e: Example) -> bool:
            return encoded_length(tokenizer, e) > limit

        named = [("training", self._train if self._train is not None else self._longest),
                 ("held-out", self.heldout), ("ood", self.ood), ("unseen", self.unseen)]
        for split, examples in named:
            long = [e for e in examples if too_long(e)]
            if not long:
                continue
            if not self.data.skip_long_prompts or examples is self._longest:
                n = len(prompt_ids(tokenizer, long[0]))
                raise ValueError(
                    f"{len(long)} {split} prompt(s) are longer than {max_prompt_tokens} tokens ({limit_by}); the "
                    f"first has {n} tokens: {long[0].prompt[:80]!r}. Shorten them, lower rollout.max_new_tokens, "
                    f"or set data.skip_long_prompts=true to drop them (they are counted)."
                )
            self.skipped_long += len(long)
            keep = [e for e in examples if not too_long(e)]
            examples[:] = keep
        if self._train is not None and not self._train:
            raise ValueError(f"no training prompt is {max_prompt_tokens} tokens or shorter ({limit_by})")
        if self._train is None and not self._longest:  # a streamed split: its prompts are checked when drawn
            previous = self._too_long
            self._too_long = lambda e: too_long(e) or (previous is not None and previous(e))
            self._limit = f"{max_prompt_tokens} tokens ({limit_by})"
        self._stream = self._make_stream()


def read_prompts_file(path: Path) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, heldout, ood) from a JSONL file; ValueError naming file:line for any bad line."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path} (set data.prompts_path)")
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    shape = '{"prompt": "<non-empty text>", "answer"?: "<text>", "split"?: "train"|"heldout"|"ood"}'
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}); expected one object per line: {shape}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got a {type(rec).__name__}; each line is {shape}")  # noqa: TRY004
        prompt, split, answer = rec.get("prompt"), rec.get("split", "train"), rec.get("answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: `prompt` must be a non-empty string (got {prompt!r}); each line is {shape}")
        if split not in splits:
            raise ValueError(f"{where}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise ValueError(f"{where}: `answer` must be text (got a {type(answer).__name__})")
        # no answer: nothing to check (a split reports accuracy only when every line has one, and its
        # evaluation then samples once, at temperature 1, instead of greedily as well)
        splits[split].append(Example(prompt=prompt, answer=None if answer is None else str(answer), where=where))
    if not splits["train"]:
        raise ValueError(f"{path}: no training prompts (lines without split or with split=train)")
    return splits["train"], splits["heldout"], splits["ood"]


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """The token ids the student samples from (and the teacher scores): a conversation rendered with the
    tokenizer's chat template, ready for the assistant's turn; plain text tokenized as it is."""
    if example.messages is not None:
        return render_ids(tokenizer, [{"role": r, "content": c} for r, c in example.messages])
    return list(tokenizer(example.prompt)["input_ids"])


def encoded_length(tokenizer, example: Example) -> int:
    """How many tokens the prompt encodes to; ValueError naming it (and its source) if none: a tokenizer whose
    normaliser drops its characters leaves nothing for vLLM to prefill ("The decoder prompt cannot be empty")."""
    n = len(prompt_ids(tokenizer, example))
    if n == 0:
        where = f"{example.where}: " if example.where else ""
        raise ValueError(
            f"{where}the prompt {example.prompt[:80]!r} encodes to no tokens with the student's tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '?')}): it drops every character of it. Remove or rewrite the "
            "prompt, or use a tokenizer that covers its characters."
        )
    return n


def encode_prompts(tokenizer, examples: list[Example]) -> list[list[int]]:
    return [prompt_ids(tokenizer, e) for e in examples]


def exact_match(tokenizer, completion_ids: list[int], example: Example) -> bool:
    text = tokenizer.decode(completion_ids, skip_special_tokens=True)
    return example.answer is not None and text.strip() == example.answer.strip()

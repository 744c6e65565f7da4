"""A data mixture (`data.task=mixture`): several prompt sources, each batch drawn from them by weight, each
prompt going to its source's teacher; and held-out evaluation per source.

Which source a draw comes from is a function of (run seed, draw number) only, so a resumed run draws the same
prompts as one that never stopped (the sources advance with it), and the shares follow the weights in
expectation (each draw is an independent weighted choice; a batch of 128 at 0.8 / 0.2 holds ~102 / ~26).

Every code path that knows one prompt source keeps working: `MixtureSource` has `PromptSource`'s interface
(`batch`, `heldout`, `ood`, `check_lengths`, `advance`, ...), with the held-out sets of all sources together;
`draw` and `evaluate_sources` are what know about sources.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from onpolicy.config import DataConfig, EvalConfig, MixtureDataConfig
from onpolicy.heldout import evaluate
from onpolicy.prompts import PromptSource
from onpolicy.types import Example


@dataclass
class Part:
    name: str
    teacher: str
    weight: float
    source: PromptSource


class MixtureSource:
    """`PromptSource` over several sources; `next_tagged()` also says which source a prompt came from."""

    def __init__(self, data: MixtureDataConfig, evalc: EvalConfig, seed: int, *, skip: int = 0) -> None:
        self.data, self.seed = data, seed
        # each source streams with a seed of its own, so two sources of one task do not draw the same prompts
        self.parts = [Part(s.name, s.teacher, s.weight, PromptSource(s.data, evalc, seed * 7919 + k))
                      for k, s in enumerate(data.sources)]
        self._weights = [p.weight for p in self.parts]
        self.drawn = 0
        self.advance(skip)

    @property
    def heldout(self) -> list[Example]:
        return [e for p in self.parts for e in p.source.heldout]

    @property
    def ood(self) -> list[Example]:
        return [e for p in self.parts for e in p.source.ood]

    @property
    def unseen(self) -> list[Example]:
        return [e for p in self.parts for e in getattr(p.source, "unseen", [])]

    @property
    def skipped_long(self) -> int:
        return sum(p.source.skipped_long for p in self.parts)

    @property
    def chat(self) -> bool:
        return any(p.source.chat for p in self.parts)

    def _choice(self, draw: int) -> Part:
        return random.Random(self.seed * 1_000_003 + draw).choices(self.parts, weights=self._weights)[0]

    def next_tagged(self) -> tuple[Part, Example]:
        part = self._choice(self.drawn)
        self.drawn += 1
        return part, part.source.next()

    def next(self) -> Example:
        return self.next_tagged()[1]

    def batch(self, n: int) -> list[Example]:
        return [self.next() for _ in range(n)]

    def advance(self, n: int) -> None:
        for _ in range(n):
            self.next()

    def rewind(self, n: int) -> None:
        for p in self.parts:
            p.source.rewind(0)
        self.drawn = 0
        self.advance(n)

    def check_lengths(self, tokenizer, max_prompt_tokens: int | None, limit_by: str) -> None:
        for p in self.parts:
            p.source.check_lengths(tokenizer, max_prompt_tokens, f"{limit_by}; source {p.name}")


def make_source(data: DataConfig, evalc: EvalConfig, seed: int) -> PromptSource | MixtureSource:
    """The prompt source `data` describes: a mixture, or one source."""
    if isinstance(data, MixtureDataConfig):
        return MixtureSource(data, evalc, seed)
    return PromptSource(data, evalc, seed)


@dataclass
class Drawn:
    """A batch's prompts, each with the source it came from and the teacher it goes to."""

    examples: list[Example]
    sources: list[str]
    teachers: list[str]
    mixture: bool = False  # drawn from a mixture's sources (else from the one source, named `data`)


def draw(source: PromptSource | MixtureSource, n: int, default_teacher: str) -> Drawn:
    """`n` prompts; from one source, every prompt goes to `default_teacher` (source name `data`)."""
    if isinstance(source, MixtureSource):
        tagged = [source.next_tagged() for _ in range(n)]
        return Drawn([e for _, e in tagged], [p.name for p, _ in tagged], [p.teacher for p, _ in tagged], True)
    return Drawn(source.batch(n), ["data"] * n, [default_teacher] * n)


def source_metrics(drawn: Drawn, rollouts: list, scores: list) -> dict[str, float]:
    """Per source of a mixture (`source_<name>_...`): sequences, mean completion tokens, and the sampled reverse
    KL to its own teacher per token (log q - the teacher's per-token target: 0 when nothing was scored). Nothing
    for one source (the batch's own metrics are its)."""
    out: dict[str, float] = {}
    if not drawn.mixture:
        return out
    for name in dict.fromkeys(drawn.sources):
        idx = [i for i, r in enumerate(rollouts) if drawn.sources[r.prompt_index] == name]
        tokens = sum(len(rollouts[i].completion_ids) for i in idx)
        kl = sum(q - p for i in idx for q, p in zip(rollouts[i].sampler_logprobs, scores[i].logprobs))
        out[f"source_{name}_sequences"] = float(len(idx))
        out[f"source_{name}_completion_tokens"] = tokens / max(len(idx), 1)
        out[f"source_{name}_teacher_kl"] = kl / max(tokens, 1)
    return out


def evaluate_sources(source: PromptSource | MixtureSource, teacher_of: Callable[[str], Any],
                     default_teacher: str, **eval_kw: Any) -> dict[str, float]:
    """`heldout.evaluate` of each source with its own teacher (`teacher_of(name)`), keys prefixed with
    `source_<name>_`, plus each split's accuracy and reverse KL over all sources (weighted by their number of
    examples; the retention probes once). One source: `evaluate` as it is."""
    workers, tokenizer = eval_kw.pop("workers"), eval_kw.pop("tokenizer")
    if not isinstance(source, MixtureSource):
        return evaluate(workers, teacher_of(default_teacher), tokenizer, source.heldout, source.ood, **eval_kw)
    retention = eval_kw.pop("retention", None)
    eval_kw.pop("unseen", None)
    out: dict[str, float] = {}
    sizes: dict[str, dict[str, int]] = {}
    for p in source.parts:
        unseen = getattr(p.source, "unseen", [])
        res = evaluate(workers, teacher_of(p.teacher), tokenizer, p.source.heldout, p.source.ood, unseen=unseen,
                       **eval_kw)
        out.update({f"source_{p.name}_{k}": v for k, v in res.items()})
        sizes[p.name] = {"heldout": len(p.source.heldout), "ood": len(p.source.ood), "unseen": len(unseen)}
    for split in ("heldout", "ood", "unseen"):
        for metric in (f"{split}_accuracy", f"{split}_reverse_kl"):
            have = [(p.name, sizes[p.name][split]) for p in source.parts if f"source_{p.name}_{metric}" in out]
            total = sum(n for _, n in have)
            if have and total:
                out[metric] = sum(out[f"source_{name}_{metric}"] * n for name, n in have) / total
    if retention is not None:
        out.update(evaluate(workers, teacher_of(default_teacher), tokenizer, [], [], retention=retention, **eval_kw))
    return out

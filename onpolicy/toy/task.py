"""The embedded toy task: multi-digit addition with checkable answers.

A prompt is `"<a>+<b>="` and the expected completion is the sum written **least significant
digit first** (e.g. `"57+68="` -> `"521"`, since 57+68=125). Reversed output is the known
trick that lets a small transformer add: every output digit depends only on two input digits
and the carry it has just produced (Lee et al., "Teaching Arithmetic to Small Transformers").

Splits are deterministic: `heldout` and `ood` are fixed sets drawn from their own seeds;
`train` draws fresh prompts forever and skips anything in `heldout`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from onpolicy.types import Example


def render(a: int, b: int) -> Example:
    return Example(prompt=f"{a}+{b}=", answer=str(a + b)[::-1])


def is_correct(completion: str, example: Example) -> bool:
    """Exact match of the completion (EOS and anything after it already stripped)."""
    return completion.strip() == example.answer


def _operand(rng: random.Random, digits: int) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def _draw(rng: random.Random, min_digits: int, max_digits: int) -> tuple[int, int]:
    return (
        _operand(rng, rng.randint(min_digits, max_digits)),
        _operand(rng, rng.randint(min_digits, max_digits)),
    )


@dataclass(frozen=True)
class AdditionTask:
    """Addition with operands of `min_digits..max_digits` digits; OOD uses `ood_digits`."""

    min_digits: int = 1
    max_digits: int = 3
    ood_digits: int = 4

    def heldout(self, n: int, seed: int = 1_000_003) -> list[Example]:
        rng = random.Random(seed)
        seen: set[tuple[int, int]] = set()
        out: list[Example] = []
        while len(out) < n:
            pair = _draw(rng, self.min_digits, self.max_digits)
            if pair not in seen:
                seen.add(pair)
                out.append(render(*pair))
        return out

    def ood(self, n: int, seed: int = 2_000_003) -> list[Example]:
        rng = random.Random(seed)
        return [render(*_draw(rng, self.ood_digits, self.ood_digits)) for _ in range(n)]

    def unseen(self, n: int, digits: int, seed: int = 3_000_003) -> list[Example]:
        """`n` prompts with `digits`-digit operands: a length neither toy model learnt (5: the teacher knows 1-4).
        (The length is an argument, not a field: the fields are part of the committed models' spec hash.)"""
        rng = random.Random(seed)
        return [render(*_draw(rng, digits, digits)) for _ in range(n)]

    def train_stream(self, seed: int, exclude: list[Example]) -> Iterator[Example]:
        """Endless training prompts, never one of `exclude` (the held-out set)."""
        rng = random.Random(seed)
        banned = {e.prompt for e in exclude}
        while True:
            ex = render(*_draw(rng, self.min_digits, self.max_digits))
            if ex.prompt not in banned:
                yield ex

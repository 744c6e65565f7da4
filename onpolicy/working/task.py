"""The second embedded task: column addition with the working written out, where errors compound.

A prompt is `"<a>+<b>="`; the completion works column by column from the units, one column per
`x+y+c=kd,` (the column's digits, the carry in, then the carry out and the result digit), and gives the
result least significant digit first (as the toy does) after a `|`:

    4821+377=  ->  1+7+0=08,2+7+0=09,8+3+0=11,4+0+1=05,|8915        (4821 + 377 = 5198)

About 10 tokens a column: operands of 5-6 digits (the distillation task) give 51-62 token answers, of 1-2
digits 11-22 (the answer-length sweep runs the same working on operands of 1-2, 3-4 and 5-6 digits). A
subtraction (`a-b`, a >= b; the second skill the mid-trained student keeps) writes its borrow where an addition
writes its carry: `52-17=` -> `2-7-0=15,5-1-1=03,|53`. Every column's carry comes from the column before, so one
wrong digit early in the working derails every column after it: the compounding that on-policy sampling is
meant to fix (the student learns on its own mistakes, not only on the teacher's perfect prefixes).

Exact match is of the whole completion: the working is deterministic, so the completion is right exactly
when every column and the result are. Splits are deterministic as in the toy: `heldout`, `ood` and
`unseen` are fixed sets from their own seeds (`ood`: a length the teacher learnt and the student did not;
`unseen`: a length no model learnt); `train_stream` never draws a held-out prompt.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from onpolicy.types import Example

Operation = Literal["add", "subtract"]
SIGN = {"add": "+", "subtract": "-"}
CHARS = "0123456789+-=,|"  # every character a prompt or a completion holds (the tokenizer's alphabet)


def columns(a: int, b: int, operation: Operation) -> list[tuple[int, int, int, int, int]]:
    """(digit of a, digit of b, carry in, carry out, result digit) per column, units first; a subtraction
    carries its borrow. The shorter operand is padded with zeros."""
    da, db = str(a)[::-1], str(b)[::-1]
    out, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if operation == "add":
            total = x + y + carry
            cout, digit = total // 10, total % 10
        else:
            total = x - y - carry
            cout, digit = int(total < 0), total % 10
        out.append((x, y, carry, cout, digit))
        carry = cout
    return out


def completion(a: int, b: int, operation: Operation = "add") -> str:
    """The expected completion of `a op b` (module docstring)."""
    sign = SIGN[operation]
    steps = "".join(f"{x}{sign}{y}{sign}{cin}={c}{d}," for x, y, cin, c, d in columns(a, b, operation))
    return f"{steps}|{str(a + b if operation == 'add' else a - b)[::-1]}"


def render(a: int, b: int, operation: Operation = "add") -> Example:
    if operation == "subtract" and a < b:
        a, b = b, a  # a difference is never negative
    return Example(prompt=f"{a}{SIGN[operation]}{b}=", answer=completion(a, b, operation))


def _operand(rng: random.Random, digits: int) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


@dataclass(frozen=True)
class WorkingTask:
    """`operation` on operands of `min_digits..max_digits` digits (each drawn on its own); `ood_digits`: the OOD
    split's operands (a length the teacher learnt and the student did not); `unseen_digits`: the unseen split's
    (a length no model learnt)."""

    operation: Operation = "add"
    min_digits: int = 5
    max_digits: int = 6
    ood_digits: int = 7
    unseen_digits: int = 8

    def _draw(self, rng: random.Random, lo: int, hi: int) -> Example:
        a, b = (_operand(rng, rng.randint(lo, hi)) for _ in range(2))
        return render(a, b, self.operation)

    def _fixed(self, n: int, seed: int, lo: int, hi: int) -> list[Example]:
        rng, seen, out = random.Random(seed), set(), []
        while len(out) < n:
            ex = self._draw(rng, lo, hi)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                out.append(ex)
        return out

    def heldout(self, n: int, seed: int = 1_000_003) -> list[Example]:
        return self._fixed(n, seed, self.min_digits, self.max_digits)

    def ood(self, n: int, seed: int = 2_000_003) -> list[Example]:
        return self._fixed(n, seed, self.ood_digits, self.ood_digits)

    def unseen(self, n: int, seed: int = 3_000_003) -> list[Example]:
        return self._fixed(n, seed, self.unseen_digits, self.unseen_digits)

    def longest_prompt(self) -> Example:
        """The longest prompt `train_stream` can draw (both operands at max_digits)."""
        nines = int("9" * self.max_digits)
        return render(nines, nines, self.operation)

    def train_stream(self, seed: int, exclude: list[Example]) -> Iterator[Example]:
        """Endless training prompts, never one of `exclude` (the held-out set)."""
        rng, banned = random.Random(seed), {e.prompt for e in exclude}
        while True:
            ex = self._draw(rng, self.min_digits, self.max_digits)
            if ex.prompt not in banned:
                yield ex

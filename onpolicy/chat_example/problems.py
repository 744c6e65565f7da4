"""Arithmetic word problems as chat conversations: the data set of the chat example.

Each row is an OpenAI-style conversation plus its answer:
`{"messages": [{"role": "system"?, ...}, {"role": "user", ...}, {"role": "assistant", "content": "7"}],
"answer": "7"}`. The assistant replies with the number only, so exact match of the student's
reply against `answer` is the task metric. Everything is a pure function of the seed.

The held-out rows are problems whose text never appears in the training rows, so a held-out
score measures the arithmetic, not recall of a memorised sentence.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PROMPTS = (
    "You are a careful math tutor. Reply with the number only.",
    "Answer with a single number.",
)
# Half the conversations open with a system turn, half do not: the template must handle both.
SYSTEM_FRACTION = 0.5

NAMES = ("Sam", "Ana", "Lee", "Mia", "Omar", "Zoe", "Ravi", "Ines", "Tom", "Yuki", "Kofi", "Lena", "Ben",
         "Nora", "Ivan", "Sara")
OBJECTS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "shells", "cards",
           "balloons", "stamps", "eggs")


@dataclass(frozen=True)
class Template:
    """One phrasing of one operation; `numbers` draws the operands so the answer is a whole number >= 0."""

    op: str  # "+", "-" or "*"
    text: str


TEMPLATES = (
    Template("+", "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?"),
    Template("+", "There are {a} {obj} in a box and {b} {obj} in a bag. How many {obj} are there in all?"),
    Template("+", "{name} found {a} {obj} on Monday and {b} {obj} on Tuesday. How many {obj} did {name} find?"),
    Template("+", "What is {a} plus {b}?"),
    Template("-", "{name} has {a} {obj} and gives away {b}. How many {obj} are left?"),
    Template("-", "A shelf holds {a} {obj}. {name} takes {b} of them. How many {obj} stay on the shelf?"),
    Template("-", "What is {a} minus {b}?"),
    Template("*", "{name} has {a} bags with {b} {obj} in each bag. How many {obj} is that in total?"),
    Template("*", "What is {a} times {b}?"),
)

OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                             "*": lambda a, b: a * b}


def draw_operands(op: str, rng: random.Random) -> tuple[int, int]:
    """Facts with one-digit answers: a + b <= 9, a - b with 0 <= b <= a <= 9, a * b <= 9 (133 facts
    behind many phrasings). Measured on 2 busy CPU cores: a 1.4M-parameter model learns these to
    ~60% held-out exact match in 200 steps; with sums up to 9 + 9 and products up to 9 x 9 it was at
    ~13% after 200 steps and ~12% after 400."""
    a = rng.randint(0, 9) if op != "*" else rng.randint(1, 9)
    if op == "+":
        return a, rng.randint(0, 9 - a)
    if op == "-":
        return a, rng.randint(0, a)
    return a, rng.randint(1, 9 // a)


def make_problem(rng: random.Random) -> dict:
    """One conversation row: messages (optional system, user, assistant) and the answer as text."""
    tpl = rng.choice(TEMPLATES)
    a, b = draw_operands(tpl.op, rng)
    answer = str(OPS[tpl.op](a, b))
    user = tpl.text.format(name=rng.choice(NAMES), obj=rng.choice(OBJECTS), a=a, b=b)
    messages = []
    if rng.random() < SYSTEM_FRACTION:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "answer": answer}


def make_dataset(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, heldout) rows, deterministic in the arguments; no held-out user text is in train."""
    rng = random.Random(seed)
    heldout: list[dict] = []
    seen: set[str] = set()
    while len(heldout) < n_heldout:  # held-out first, so its size does not depend on n_train
        row = make_problem(rng)
        key = row["messages"][-2]["content"]
        if key not in seen:
            seen.add(key)
            heldout.append(row)
    train = []
    while len(train) < n_train:
        row = make_problem(rng)
        if row["messages"][-2]["content"] not in seen:
            train.append(row)
    return train, heldout


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    """Rows as a Parquet file (a `messages` list-of-struct column and an `answer` string column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({"messages": pa.array([r["messages"] for r in rows], type=msg),
                      "answer": pa.array([r["answer"] for r in rows], type=pa.string())})
    pq.write_table(table, path, compression="zstd")
    return path


def read_parquet(path: str | Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()

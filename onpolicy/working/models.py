"""The working task's teacher and student: Llama kit models trained on column arithmetic with working.

One teacher and one student serve every length of the answer-length sweep (`LENGTHS`: the same working on
operands of 1-2, 3-4 and 5-6 digits), so the sweep compares lengths of one skill from one starting point. Both
are ordinary Hugging Face folders (config.json + model.safetensors + a character tokenizer).

- The teacher learns addition on operands of 1-7 digits (every length of the sweep, and the OOD split's 7) to
  near-perfect exact match. Its label smoothing is small (0.001, where the toy teacher's is 0.1): a completion
  is ~60 tokens, and a teacher that put 10 % on wrong tokens at each would sample a correct one 0.9^60 = 0.2 %
  of the time, which would leave `sft` (trained on the teacher's samples) nothing right to learn from; at 0.001
  a wrong token still costs ~10 nats, not the ~20 of an unsmoothed model.
- The student is smaller and stopped early ("mid-trained"): it writes the working in the right shape and
  gets part of it right, on operands of 5-6 digits (never 7: the OOD split is a length the teacher learnt and
  the student did not; no model sees 8, the unseen split). It also learns a **second skill** the distillation
  data never trains: subtraction (1-3 digit operands), which `eval.retention` watches.

Training sees only the tasks' `train_stream` prompts (never a held-out, OOD or unseen one) and puts the loss
on completion tokens only.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from onpolicy.kit.spec import ModelSpec, spec_hash
from onpolicy.types import Example
from onpolicy.working.task import CHARS, WorkingTask

# Bump when the training code changes in a way that changes the trained weights.
CODE_VERSION = 1
MAX_NEW_TOKENS = 96  # the longest completion: the unseen split's 8-digit operands, 82 tokens + EOS (rollout.max_new_tokens)
HELDOUT_N = 256
OOD_N = 128
TRAIN_SEED_OFFSET = 17
# The distillation task's splits (5-6 digit held-out, 7-digit OOD, 8-digit unseen); no model trains on them.
SPLITS = WorkingTask()

# (operation, min digits, max digits, weight): what a model is trained on.
Mix = tuple[tuple[str, int, int, float], ...]


@dataclass(frozen=True, kw_only=True)
class WorkingModelSpec(ModelSpec):
    """A kit spec plus the task mixture it is trained on; its hash covers the mixture and the splits."""

    arch: str = "llama"
    max_positions: int = 128
    mix: Mix = ()

    def spec_hash(self) -> str:
        return spec_hash(self, CODE_VERSION, task=dataclasses.asdict(SPLITS), chars=CHARS)

    def tasks(self) -> list[tuple[WorkingTask, float]]:
        return [(WorkingTask(op, lo, hi), w) for op, lo, hi, w in self.mix]


# Small, because everything downstream (the demo, every arm of bench/quality.py) trains, samples and scores
# ~60-token completions on two shared cores: 128 wide with two heads of 64 (the kit's shape rule). The teacher
# is at 1.000 held-out exact match from step 750 of its 1000 (docs/quality.md).
TEACHER = WorkingModelSpec(name="teacher", num_layers=4, hidden=128, heads=2, intermediate=512, steps=1000,
                           batch_size=64, lr=1e-3, warmup_steps=100, eval_every=250, label_smoothing=0.001,
                           mix=(("add", 1, 7, 1.0),))
# Mid-trained: 800 steps, half of them subtraction, stop it at 0.48 held-out exact match with subtraction at 0.90
# (docs/quality.md has the runs that chose this: 1000 steps at 3 addition batches in 4 reach 1.000).
STUDENT = WorkingModelSpec(name="student", num_layers=2, hidden=128, heads=2, intermediate=512, steps=800,
                           batch_size=64, lr=1e-3, warmup_steps=50, eval_every=0, seed=1,
                           mix=(("add", 5, 6, 0.5), ("subtract", 1, 3, 0.5)))
SPECS = {"teacher": TEACHER, "student": STUDENT}
# The second skill the student has and the distillation data does not train (configs/working.yaml watches it).
SECOND_SKILL = WorkingTask("subtract", 1, 3, ood_digits=4, unseen_digits=5)
# The answer-length sweep (bench/quality.py --lengths): the same working on operands of more digits, so more
# columns, so longer answers (~10 tokens a column); `long` is the distillation task itself.
LENGTHS = {"short": (1, 2), "medium": (3, 4), "long": (SPLITS.min_digits, SPLITS.max_digits)}


@functools.cache
def shared_tokenizer():
    from onpolicy.kit.chars import char_tokenizer

    return char_tokenizer(CHARS, model_max_length=128)


@functools.cache
def _vocab() -> dict[str, int]:
    return shared_tokenizer().get_vocab()


def encode(ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): BOS + the prompt's characters, then the answer's characters + EOS."""
    vocab, tok = _vocab(), shared_tokenizer()
    return [tok.bos_token_id] + [vocab[c] for c in ex.prompt], [vocab[c] for c in ex.answer] + [tok.eos_token_id]


def greedy_accuracy(model_or_dir, examples: Sequence[Example], batch_size: int = 256) -> float:
    """Fraction of `examples` whose greedy completion is exactly the expected answer."""
    from onpolicy.kit.train import greedy_accuracy as kit_accuracy
    from onpolicy.kit.train import load_model

    tok = shared_tokenizer()
    return kit_accuracy(load_model(model_or_dir), [encode(e)[0] for e in examples], [e.answer for e in examples],
                        tok.decode, tok.eos_token_id, MAX_NEW_TOKENS, batch_size)


def never_trained() -> list[Example]:
    """Every evaluation prompt: the held-out split of each length of the sweep, the distillation task's OOD and
    unseen splits, and the second skill's held-out split."""
    out = [e for lo, hi in LENGTHS.values() for e in dataclasses.replace(SPLITS, min_digits=lo, max_digits=hi)
           .heldout(HELDOUT_N)]
    return out + SPLITS.ood(OOD_N) + SPLITS.unseen(OOD_N) + SECOND_SKILL.heldout(HELDOUT_N)


def mixture_stream(spec: WorkingModelSpec, exclude: list[Example]) -> Iterator[Example]:
    """`spec.mix`'s tasks, each batch (`spec.batch_size` examples in a row) drawn from one of them with its
    weight (seeded). One task a batch: a batch is padded to its longest sequence, and a long working's is ~4x
    a short one's, so mixing them in a batch would spend a third of the compute on padding."""
    tasks = spec.tasks()
    streams = [t.train_stream(seed=spec.seed + TRAIN_SEED_OFFSET + i, exclude=exclude) for i, (t, _) in enumerate(tasks)]
    rng, weights = random.Random(spec.seed), [w for _, w in tasks]
    while True:
        stream = streams[rng.choices(range(len(streams)), weights=weights)[0]]
        for _ in range(spec.batch_size):
            yield next(stream)


def probe_sets(n: int = HELDOUT_N) -> dict[str, list[Example]]:
    """What the build reports: held-out exact match at each length of the sweep, the OOD split and the second
    skill."""
    sets = {name: dataclasses.replace(SPLITS, min_digits=lo, max_digits=hi).heldout(n)
            for name, (lo, hi) in LENGTHS.items()}
    return {**sets, "ood": SPLITS.ood(min(n, OOD_N)), "subtraction": SECOND_SKILL.heldout(n)}


def train_model(spec: WorkingModelSpec, log=print, steps: int | None = None):
    """Train `spec` from its seeded random init; returns (model, info with exact match per probe set)."""
    from onpolicy.kit.train import train_model as kit_train

    if steps is not None:
        spec = dataclasses.replace(spec, steps=steps)
    heldout = SPLITS.heldout(HELDOUT_N)
    model, info = kit_train(spec, shared_tokenizer(), map(encode, mixture_stream(spec, never_trained())),
                            lambda m: greedy_accuracy(m, heldout), log=log)
    probes = {name: round(greedy_accuracy(model, ex), 4) for name, ex in probe_sets().items()}
    log(f"[{spec.name}] exact match {probes}")
    return model, {**info, "probes": probes}

"""The toy teacher and student: Llama-architecture kit models trained on the addition task.

Both are ordinary Hugging Face model folders (config.json + model.safetensors + tokenizer), so
transformers, vLLM and every other part of the system load them as they would a real model.

Why these shapes (the kit's shape rule sets head_dim; 256 wide with 4 heads gives 64):
- The teacher is trained to near-perfect held-out accuracy so its log-probs are a good target.
- The student is large enough to learn the task (600 supervised steps reach 0.99), but is
  stopped at 450: "mid-trained", it has the skill in part (0.59 held-out exact match, the units
  digit right 62 % of the time) and makes mistakes, which is where on-policy distillation with
  reverse KL starts in practice (after SFT or mid-training). From a student that lacks the skill
  (250 steps, 0.13) reverse KL learns only after a long, seed-dependent plateau: its push on the
  right token is proportional to the student's probability of it (docs/losses.md).

Training sees only `AdditionTask.train_stream` prompts (which skip the held-out set) and puts
the loss on completion tokens (reversed answer digits + EOS) only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from onpolicy.kit.spec import ModelSpec, spec_hash
from onpolicy.toy.task import AdditionTask, Example

# Bump when the training code changes in a way that changes the trained weights, so cached
# builds and the committed assets are recognised as stale.
CODE_VERSION = 2
MAX_NEW_TOKENS = 8
HELDOUT_N = 256
OOD_N = 128
TRAIN_SEED_OFFSET = 17  # train_stream seed = spec.seed + offset (kept apart from torch's seed)


@dataclass(frozen=True, kw_only=True)
class ToyModelSpec(ModelSpec):
    """A kit spec plus the operand length the model is trained on; its hash also covers the task."""

    arch: str = "llama"
    warmup_steps: int = 100
    max_digits: int = 3  # training operands have 1..max_digits digits

    def spec_hash(self) -> str:
        return spec_hash(self, CODE_VERSION, task=dataclasses.asdict(AdditionTask()))


# The teacher knows more than the student is ever prompted with (operands of up to 4 digits; the
# distillation prompts have up to 3), so the OOD split measures whether a capability transfers. Label
# smoothing keeps it calibrated the way an LLM is on plausible tokens: a wrong digit gets log-prob
# ~ -5, not ~ -15, which is what made the sampled reverse-KL advantages blow up (docs/maths.md).
TEACHER = ToyModelSpec(name="teacher", num_layers=4, hidden=256, heads=4, intermediate=512, steps=2500,
                       batch_size=128, lr=1e-3, eval_every=500, max_digits=4, label_smoothing=0.1)
STUDENT = ToyModelSpec(name="student", num_layers=2, hidden=256, heads=4, intermediate=512, steps=450,
                       batch_size=128, lr=1e-3, warmup_steps=50, seed=1)
SPECS = {"teacher": TEACHER, "student": STUDENT}


@functools.cache
def shared_tokenizer():
    """The toy's character tokenizer (one shared instance: building it takes milliseconds, training asks often)."""
    from onpolicy.toy.tokenizer import build_tokenizer

    return build_tokenizer()


@functools.cache
def _vocab() -> dict[str, int]:
    return shared_tokenizer().get_vocab()


def encode(ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): BOS + the prompt's characters, then the answer's characters + EOS,
    as the tokenizer encodes them (a dictionary look-up here: training encodes ~300k examples)."""
    vocab, tok = _vocab(), shared_tokenizer()
    return [tok.bos_token_id] + [vocab[c] for c in ex.prompt], [vocab[c] for c in ex.answer] + [tok.eos_token_id]


def greedy_decode(model_or_dir, examples: Sequence[Example], batch_size: int = 256) -> list[str]:
    """Greedy completions (text before EOS, at most MAX_NEW_TOKENS tokens) for each example."""
    from onpolicy.kit.train import greedy_completions, load_model

    tok = shared_tokenizer()
    replies = greedy_completions(load_model(model_or_dir), [encode(e)[0] for e in examples], tok.eos_token_id,
                                 MAX_NEW_TOKENS, batch_size)
    return [tok.decode(r) for r in replies]


def greedy_accuracy(model_or_dir, examples: Sequence[Example], batch_size: int = 256) -> float:
    """Fraction of `examples` whose greedy completion is exactly the expected answer."""
    from onpolicy.kit.train import greedy_accuracy as kit_accuracy
    from onpolicy.kit.train import load_model

    tok = shared_tokenizer()
    return kit_accuracy(load_model(model_or_dir), [encode(e)[0] for e in examples], [e.answer for e in examples],
                        tok.decode, tok.eos_token_id, MAX_NEW_TOKENS, batch_size)


def train_model(spec: ToyModelSpec, task: AdditionTask | None = None, log=print, steps: int | None = None):
    """Train `spec` from a seeded random init; returns (model, info dict).

    `steps` overrides spec.steps (for experiments; builds always use spec.steps). Progress is
    logged every `spec.eval_every` steps (held-out greedy accuracy, for monitoring only).
    """
    from onpolicy.kit.train import train_model as kit_train

    task = task or AdditionTask(max_digits=spec.max_digits)
    if steps is not None:
        spec = dataclasses.replace(spec, steps=steps)
    # The distillation task's evaluation splits (1-3 digit held-out, 4-digit OOD) are never trained on.
    splits = AdditionTask()
    heldout = splits.heldout(HELDOUT_N)
    stream = task.train_stream(seed=spec.seed + TRAIN_SEED_OFFSET, exclude=heldout + splits.ood(OOD_N))
    model, info = kit_train(spec, shared_tokenizer(), map(encode, stream), lambda m: greedy_accuracy(m, heldout),
                            log=log)
    ood_acc = greedy_accuracy(model, splits.ood(OOD_N))
    log(f"[{spec.name}] OOD (4-digit operands) exact match {ood_acc:.3f}")
    return model, {**info, "ood_accuracy": ood_acc}

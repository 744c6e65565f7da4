"""A second toy teacher with another tokenizer: byte-level BPE (GPT-2 style) instead of the student's characters.

It solves the same addition task as the character teacher (operands of up to 4 digits, so it holds the same
skill the student is never prompted with), but its tokens are bytes merged into digit pairs and triples: the
student's tokens and its own only share boundaries where a BPE token ends. It is what cross-tokenizer
(span-aligned) distillation is measured with (docs/teachers.md).

The tokenizer is trained here with the `tokenizers` library on a fixed corpus of the task's text, saved with
the model as `tokenizer.json` like a real model's, so vLLM and transformers load it from the folder. Prompts
and answers are tokenized apart (prompt: BOS + its tokens; completion: the answer's tokens + EOS), as the
cross-tokenizer scorer tokenizes them (onpolicy/teacher/spans.py), so the teacher is trained on the split
it is asked to score.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path

from onpolicy.toy.task import AdditionTask, Example

NAME = "teacher-bpe"
ASSET = Path(__file__).parent / "assets" / NAME  # the committed build (`onpolicy toy build` copies it)
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# 256 byte symbols + 3 specials + 16 merges (digit pairs): about one answer token in five is two digits. A larger
# merge budget (360: every digit pair and a few triples, "00001" -> 00|0|01) made the task too hard for the
# teacher's recipe: held-out exact match 0.07 after 1000 of its 2500 steps (this one: see build.json).
VOCAB_SIZE = 275
CORPUS_SIZE = 20_000
CORPUS_SEED = 4242


def _corpus() -> list[str]:
    """The BPE's training text: prompts and answers of the task as the teacher sees them."""
    stream = AdditionTask(max_digits=4).train_stream(CORPUS_SEED, exclude=[])
    out = []
    for ex in itertools.islice(stream, CORPUS_SIZE):
        out += [ex.prompt, ex.answer]
    return out


@functools.cache
def bpe_tokenizer():
    """The BPE teacher's tokenizer: the committed asset's when it is current (loading takes milliseconds, training
    seconds), else trained (`train_bpe_tokenizer`)."""
    from onpolicy.kit.build import is_current

    if is_current(ASSET, spec_hash()):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(ASSET))
    return train_bpe_tokenizer()


def train_bpe_tokenizer():
    """A `PreTrainedTokenizerFast` over a byte-level BPE trained on the task's text; encoding prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=128, clean_up_tokenization_spaces=False)


def encode(ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): BOS + the prompt's BPE tokens; the answer's BPE tokens + EOS."""
    tok = bpe_tokenizer()
    return list(tok(ex.prompt)["input_ids"]), list(tok(ex.answer, add_special_tokens=False)["input_ids"]) + [
        tok.eos_token_id]


def spec():
    """The BPE teacher's kit spec: the character teacher's shape and recipe, under its own name."""
    from onpolicy.toy.models import TEACHER

    return dataclasses.replace(TEACHER, name=NAME)


def spec_hash() -> str:
    """The build hash: the spec, the task and the tokenizer's training (vocabulary size, corpus)."""
    from onpolicy.kit.spec import spec_hash as kit_hash
    from onpolicy.toy.models import CODE_VERSION

    return kit_hash(spec(), CODE_VERSION, task=dataclasses.asdict(AdditionTask()),
                    tokenizer={"kind": "byte-level-bpe", "vocab": VOCAB_SIZE, "corpus": [CORPUS_SIZE, CORPUS_SEED]})


def greedy_accuracy(model_or_dir, examples: list[Example], batch_size: int = 256) -> float:
    from onpolicy.kit.train import greedy_accuracy as kit_accuracy
    from onpolicy.kit.train import load_model
    from onpolicy.toy.models import MAX_NEW_TOKENS

    tok = bpe_tokenizer()
    return kit_accuracy(load_model(model_or_dir), [encode(e)[0] for e in examples], [e.answer for e in examples],
                        tok.decode, tok.eos_token_id, MAX_NEW_TOKENS, batch_size)


def train(log=print):
    """Train the BPE teacher on the task (as `toy.models.train_model` trains the character one); (model, info)."""
    from onpolicy.kit.train import train_model as kit_train
    from onpolicy.toy.models import HELDOUT_N, OOD_N, TRAIN_SEED_OFFSET

    s = spec()
    splits = AdditionTask()
    heldout = splits.heldout(HELDOUT_N)
    stream = AdditionTask(max_digits=s.max_digits).train_stream(seed=s.seed + TRAIN_SEED_OFFSET,
                                                                 exclude=heldout + splits.ood(OOD_N))
    model, info = kit_train(s, bpe_tokenizer(), map(encode, stream), lambda m: greedy_accuracy(m, heldout), log=log)
    ood = greedy_accuracy(model, splits.ood(OOD_N))
    log(f"[{s.name}] OOD (4-digit operands) exact match {ood:.3f}")
    return model, {**info, "ood_accuracy": ood, "spec": dataclasses.asdict(s), "vocab_size": len(bpe_tokenizer())}


def build(dest: str | Path, *, force: bool = False, prebuilt: Path | None = None, log=print) -> dict:
    """Make `dest` the BPE teacher's folder (kept if current, else copied from `prebuilt`, else trained)."""
    from onpolicy.kit import build as kit_build

    def make(folder: Path) -> dict:
        model, info = train(log=log)
        kit_build.save_model(model, train_bpe_tokenizer(), folder)
        return info

    return kit_build.build_cached(Path(dest), NAME, spec_hash(), make, force=force, prebuilt=prebuilt,
                                  log=log)

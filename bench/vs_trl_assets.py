"""The two model pairs of `bench/vs_trl.py` and their prompt files.

- toy: the prebuilt addition models in onpolicy/toy/assets (1.3M student / 2.6M teacher Llama,
  character tokenizer); prompts from `AdditionTask` (training stream + its held-out set).
- mid: Qwen2 models with random (seeded) weights, ~6M student / ~45M teacher, sharing one BPE
  tokenizer (vocab 300) trained here on a generated corpus of made-up words. Built into the
  cache folder once; a `build.json` with the spec marks a finished build. Neither model ever samples
  EOS (`never_eos`), so every completion is exactly the cap long on every side: a random model would
  otherwise stop after ~1/p(EOS) = ~300 tokens, and the sweep over lengths would not be one.

Every system reads the same JSONL file: `steps x prompts_per_step` training lines, in the order
they are used (batch i = lines i*B .. (i+1)*B-1), then the held-out lines (`"split": "heldout"`).
Runs in the project venv; torch and transformers are imported only to build the mid models.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from onpolicy.kit.build import save_model
from onpolicy.kit.spec import ModelSpec, random_model

REPO = Path(__file__).resolve().parent.parent
TOY_ASSETS = REPO / "onpolicy" / "toy" / "assets"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


@dataclass(frozen=True)
class Pair:
    name: str
    student: str
    teacher: str
    prompts_path: str
    prompts_per_step: int
    max_new_tokens: int
    heldout: int
    default_steps: int


# 2,048 positions: room for a prompt and the sweep's longest completion (1,024). Rotary positions, so the
# limit adds no parameters.
MID_STUDENT = ModelSpec(name="student", arch="qwen2", num_layers=4, hidden=384, heads=6, intermediate=768,
                        max_positions=2048, seed=1)
MID_TEACHER = ModelSpec(name="teacher", arch="qwen2", num_layers=8, hidden=768, heads=12, intermediate=1408,
                        max_positions=2048, seed=2)


@dataclass(frozen=True)
class MidSpec:
    """The mid pair: random-init Qwen2 kit models (head_dim 64: the kit's vLLM shape rule) over one BPE
    tokenizer trained here. A model's seed is `seed * 1000 + its own`."""

    vocab_size: int = 300
    student: ModelSpec = MID_STUDENT
    teacher: ModelSpec = MID_TEACHER
    seed: int = 0
    corpus_sentences: int = 4000
    never_eos: bool = True
    version: int = 3


# ---- the generated language of the mid pair ----------------------------------------------------
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "l", "m"]


def _lexicon(rng: random.Random, n: int = 400) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.choice([1, 1, 2, 2, 2, 3])
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)))
    return sorted(words)


def _sentence(rng: random.Random, lexicon: list[str], lo: int, hi: int) -> str:
    # Zipf-like word frequencies, so BPE finds frequent words worth merging.
    words = rng.choices(lexicon, weights=[1.0 / (r + 1) for r in range(len(lexicon))], k=rng.randint(lo, hi))
    return " ".join(words) + rng.choice([".", ".", "?", "!"])


def _build_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE trained with exactly the normaliser and pre-tokeniser that transformers' `Qwen2Tokenizer`
    rebuilds from vocab + merges (AutoTokenizer picks that class for a qwen2 model folder, whatever
    tokenizer.json says), so transformers and vLLM both encode the way it was trained. No BOS, as in Qwen2."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                         for m in model["merges"]],
                          bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=256)


def never_eos(model, eos_id: int, level: float = 0.1, gap: float = 150.0, probes: int = 4) -> float:
    """Make `model` (a transformers Qwen2/Llama, untied head) never sample `eos_id`, in place; returns the
    highest log p(EOS) seen afterwards on `probes` random sequences of the model's full length.

    Residual coordinate 0 is held at `level` for every token at every layer (the embeddings' column 0 is
    `level`; no attention or MLP output writes to it: row 0 of every `o_proj` and `down_proj` is zero), so after
    the final RMSNorm it is positive at every position, though smaller where the other coordinates grew through
    the layers. The head's EOS row is `-scale` there and zero elsewhere, with `scale` set from the smallest
    value seen on the probes so that EOS's logit is `gap` below zero there (the other logits are O(1)):
    p(EOS) < 1e-40, zero in fp32. Refuses (ValueError) a model where a probe still gives EOS more than e^-60.
    The same weights load in vLLM and transformers, so every side samples the same way; no shape changes."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = level
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (probes, model.config.max_position_embeddings), generator=g)
        # hidden_states[-1] of a transformers Llama/Qwen2 is after the final norm: what the head reads.
        normed = model(ids, output_hidden_states=True).hidden_states[-1][..., 0]
        smallest = float(normed.min())
        if smallest <= 0:
            raise ValueError(f"residual coordinate 0 reads {smallest} after the final norm: it must stay positive")
        model.lm_head.weight[eos_id, :] = 0.0
        model.lm_head.weight[eos_id, 0] = -gap / smallest
        worst = float(torch.log_softmax(model(ids).logits, -1)[..., eos_id].max())
    if worst > -60:
        raise ValueError(f"EOS keeps log-probability {worst:.1f} after never_eos: raise `gap`")
    return worst


def build_mid_models(root: Path, spec: MidSpec = MidSpec(), log=print) -> tuple[Path, Path, dict]:
    """`root/student`, `root/teacher` (cached: rebuilt only when the spec changed); returns their paths and sizes."""
    student_dir, teacher_dir, info_path = root / "student", root / "teacher", root / "build.json"
    want = asdict(spec)
    if info_path.is_file() and (student_dir / "model.safetensors").is_file() and (teacher_dir / "model.safetensors").is_file():
        info = json.loads(info_path.read_text())
        if info.get("spec") == want:
            return student_dir, teacher_dir, info
    log(f"[mid] building the Qwen2 pair and its BPE tokenizer into {root}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rng = random.Random(spec.seed)
    lexicon = _lexicon(rng)
    corpus = [_sentence(rng, lexicon, 4, 20) for _ in range(spec.corpus_sentences)]
    tokenizer = _build_tokenizer(corpus, spec.vocab_size)
    if len(tokenizer) != spec.vocab_size:
        raise RuntimeError(f"BPE gave {len(tokenizer)} tokens, wanted {spec.vocab_size}: enlarge the corpus")
    shutil.rmtree(root, ignore_errors=True)
    sizes = {}
    for model, dest in ((spec.student, student_dir), (spec.teacher, teacher_dir)):
        made = random_model(model, tokenizer, seed=spec.seed * 1000 + model.seed)
        if spec.never_eos:
            never_eos(made, tokenizer.eos_token_id)
        save_model(made, tokenizer, dest)
        sizes[model.name] = _count_params(dest)
    info = {"spec": want, "parameters": sizes, "lexicon_seed": spec.seed}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    (root / "lexicon.json").write_text(json.dumps(lexicon))
    log(f"[mid] student {sizes['student'] / 1e6:.2f}M, teacher {sizes['teacher'] / 1e6:.2f}M parameters")
    return student_dir, teacher_dir, info


def _write_prompts(path: Path, train: list[dict], heldout: list[dict]) -> None:
    lines = [json.dumps(r) for r in train] + [json.dumps({**r, "split": "heldout"}) for r in heldout]
    path.write_text("\n".join(lines) + "\n")


def prepare_pair(name: str, cache: Path, steps: int | None, log=print, *, max_new_tokens: int | None = None,
                 prompts_per_step: int | None = None) -> tuple[Pair, dict]:
    """Build (or reuse) the pair's models and write its prompt file for `steps` steps; `max_new_tokens` and
    `prompts_per_step` replace the pair's defaults (the mid pair's length sweep)."""
    cache.mkdir(parents=True, exist_ok=True)
    if name == "toy":
        from onpolicy.toy.task import AdditionTask

        batch, cap, n_heldout, default_steps = prompts_per_step or 64, max_new_tokens or 8, 64, 30
        steps = steps or default_steps
        task = AdditionTask(1, 3, 4)
        heldout = task.heldout(n_heldout)
        stream = task.train_stream(0, exclude=heldout)
        train = [{"prompt": e.prompt, "answer": e.answer} for e in (next(stream) for _ in range(steps * batch))]
        path = cache / f"toy_prompts_{steps}x{batch}.jsonl"
        _write_prompts(path, train, [{"prompt": e.prompt, "answer": e.answer} for e in heldout])
        pair = Pair("toy", str(TOY_ASSETS / "student"), str(TOY_ASSETS / "teacher"), str(path), batch, cap,
                    n_heldout, default_steps)
        info = {"parameters": {k: _count_params(TOY_ASSETS / k) for k in ("student", "teacher")}}
        return pair, info
    if name == "mid":
        batch, cap, n_heldout, default_steps = prompts_per_step or 32, max_new_tokens or 64, 32, 10
        steps = steps or default_steps
        student, teacher, info = build_mid_models(cache / "mid", log=log)
        lexicon = json.loads((cache / "mid" / "lexicon.json").read_text())
        # Prompts come from streams apart from the tokenizer's corpus; the held-out set does not depend on `steps`.
        heldout_rng, train_rng = random.Random(11), random.Random(7)
        heldout = [{"prompt": _sentence(heldout_rng, lexicon, 6, 12)} for _ in range(n_heldout)]
        train = [{"prompt": _sentence(train_rng, lexicon, 6, 12)} for _ in range(steps * batch)]
        path = cache / f"mid_prompts_{steps}x{batch}.jsonl"
        _write_prompts(path, train, heldout)
        return Pair("mid", str(student), str(teacher), str(path), batch, cap, n_heldout, default_steps), info
    raise ValueError(f"unknown pair {name!r}: use toy or mid")


def _count_params(model_dir: Path) -> int:
    """Parameters in a model folder, read from the safetensors header (no torch needed)."""
    import struct

    with open(model_dir / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = 0
    for key, meta in header.items():
        if key != "__metadata__":
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
    return total

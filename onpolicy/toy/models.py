"""The toy teacher and student: Llama-architecture models trained on the addition task.

Both are ordinary Hugging Face model folders (config.json + model.safetensors + tokenizer), so
transformers, vLLM and every other part of the system load them as they would a real model.

Why these shapes:
- `head_dim` is set explicitly to 32 or more because vLLM's CPU attention only supports
  head sizes {32, 64, 80, 96, 112, 128}; a 128-wide model with 4 heads has head_dim 32.
- The teacher is trained to near-perfect held-out accuracy so its log-probs are a good target.
- The student is large enough to learn the task (600 supervised steps reach 0.99), but is
  stopped at 450: "mid-trained", it has the skill in part (0.59 held-out exact match, the units
  digit right 62 % of the time) and makes mistakes, which is where on-policy distillation with
  reverse KL starts in practice (after SFT or mid-training). From a student that lacks the skill
  (250 steps, 0.13) reverse KL learns only after a long, seed-dependent plateau: its push on the
  right token is proportional to the student's probability of it (README, "What the loss choice does").

Training sees only `AdditionTask.train_stream` prompts (which skip the held-out set) and puts
the loss on completion tokens (reversed answer digits + EOS) only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from onpolicy.toy.task import AdditionTask, Example, is_correct

if TYPE_CHECKING:  # torch/transformers are imported lazily: `onpolicy --help` must stay fast
    import torch

# Bump when the training code changes in a way that changes the trained weights, so cached
# builds and the committed assets are recognised as stale.
CODE_VERSION = 2
MAX_NEW_TOKENS = 8
HELDOUT_N = 256
OOD_N = 128
TRAIN_SEED_OFFSET = 17  # train_stream seed = spec.seed + offset (kept apart from torch's seed)


@dataclass(frozen=True)
class ToyModelSpec:
    """Architecture + training recipe of one toy model; its hash names a build."""

    name: str
    num_layers: int
    hidden: int
    heads: int
    intermediate: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    max_positions: int = 64
    eval_every: int = 0  # 0: evaluate only at the end
    max_digits: int = 3  # training operands have 1..max_digits digits
    label_smoothing: float = 0.0  # spread over the vocabulary: a calibrated teacher, not a one-hot one

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def spec_hash(self) -> str:
        """Hash of every field plus the code version and the task; equal hash = same build."""
        blob = json.dumps(
            {
                "spec": dataclasses.asdict(self),
                "code": CODE_VERSION,
                "task": dataclasses.asdict(AdditionTask()),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The teacher knows more than the student is ever prompted with (operands of up to 4 digits; the
# distillation prompts have up to 3), so the OOD split measures whether a capability transfers. Label
# smoothing keeps it calibrated the way an LLM is on plausible tokens: a wrong digit gets log-prob
# ~ -5, not ~ -15, which is what made the sampled reverse-KL advantages blow up (README, the maths).
TEACHER = ToyModelSpec(
    name="teacher",
    num_layers=4,
    hidden=256,
    heads=4,
    intermediate=512,
    steps=2500,
    batch_size=128,
    lr=1e-3,
    eval_every=500,
    max_digits=4,
    label_smoothing=0.1,
)
STUDENT = ToyModelSpec(
    name="student",
    num_layers=2,
    hidden=256,
    heads=4,
    intermediate=512,
    steps=450,
    batch_size=128,
    lr=1e-3,
    warmup_steps=50,
    seed=1,
)
SPECS = {"teacher": TEACHER, "student": STUDENT}


def llama_config(spec: ToyModelSpec):
    """A LlamaConfig for `spec`, with the tokenizer's special ids."""
    from transformers import LlamaConfig

    from onpolicy.toy.tokenizer import build_tokenizer

    if spec.hidden % spec.heads or spec.head_dim not in (32, 64, 80, 96, 112, 128):
        raise ValueError(
            f"{spec.name}: hidden={spec.hidden}/heads={spec.heads} gives head_dim={spec.head_dim}; "
            "vLLM's CPU attention needs head_dim in {32, 64, 80, 96, 112, 128}"
        )
    tok = build_tokenizer()
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )


class _Codec:
    """Char -> id map taken from the real tokenizer, so training ids match what it encodes."""

    def __init__(self):
        from onpolicy.toy.tokenizer import build_tokenizer

        tok = build_tokenizer()
        self.vocab = tok.get_vocab()
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self.inv = {i: t for t, i in self.vocab.items()}

    def prompt_ids(self, ex: Example) -> list[int]:
        return [self.bos] + [self.vocab[c] for c in ex.prompt]

    def completion_ids(self, ex: Example) -> list[int]:
        return [self.vocab[c] for c in ex.answer] + [self.eos]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if i == self.eos:
                break
            out.append(self.inv.get(int(i), ""))
        return "".join(out)


def make_batch(codec: _Codec, examples: Sequence[Example]):
    """Right-padded (input_ids, attention_mask, loss_mask); loss_mask marks target positions.

    loss_mask[b, t] = 1 when token t+1 is a completion token, i.e. the logits at t are scored.
    """
    import torch

    seqs = [(codec.prompt_ids(e), codec.completion_ids(e)) for e in examples]
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), codec.pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for b, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[b, :n] = torch.tensor(p + c)
        attn[b, :n] = 1
        loss_mask[b, len(p) - 1 : n - 1] = 1.0
    return ids, attn, loss_mask


def completion_loss(model, ids, attn, loss_mask, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens only (optionally label-smoothed)."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none",
                          label_smoothing=label_smoothing)
    return (nll * loss_mask.reshape(-1)).sum() / loss_mask.sum()


def _load(model_or_dir):
    if isinstance(model_or_dir, (str, Path)):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(model_or_dir), dtype=torch.float32)
    return model_or_dir


def greedy_decode(model_or_dir, examples: Sequence[Example], batch_size: int = 256) -> list[str]:
    """Greedy completions (text before EOS, at most MAX_NEW_TOKENS tokens) for each example.

    Prompts are grouped by length, so no padding is needed and positions are exactly those of
    training; with sequences this short, recomputing the whole prefix each step (no KV cache)
    costs little and avoids any dependence on `generate()`'s padding conventions.
    """
    import torch

    model = _load(model_or_dir)
    was_training = model.training
    model.eval()
    codec = _Codec()
    out: list[str | None] = [None] * len(examples)
    by_len: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(len(codec.prompt_ids(ex)), []).append(i)
    with torch.no_grad():
        for idxs in by_len.values():
            for s in range(0, len(idxs), batch_size):
                chunk = idxs[s : s + batch_size]
                ids = torch.tensor([codec.prompt_ids(examples[i]) for i in chunk])
                start = ids.shape[1]
                done = torch.zeros(len(chunk), dtype=torch.bool)
                for _ in range(MAX_NEW_TOKENS):
                    nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
                    nxt = torch.where(done, torch.full_like(nxt, codec.eos), nxt)
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                    done |= nxt == codec.eos
                    if bool(done.all()):
                        break
                for row, i in enumerate(chunk):
                    out[i] = codec.decode(ids[row, start:].tolist())
    model.train(was_training)
    return out  # type: ignore[return-value]


def greedy_accuracy(model_or_dir, examples: Sequence[Example], batch_size: int = 256) -> float:
    """Fraction of `examples` whose greedy completion is exactly the expected answer."""
    if not examples:
        raise ValueError("greedy_accuracy needs at least one example")
    completions = greedy_decode(model_or_dir, examples, batch_size=batch_size)
    return sum(is_correct(c, e) for c, e in zip(completions, examples)) / len(examples)


def _lr_at(spec: ToyModelSpec, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(spec: ToyModelSpec, task: AdditionTask | None = None, log=print, steps: int | None = None):
    """Train `spec` from a seeded random init; returns (model, info dict).

    `steps` overrides spec.steps (for experiments; builds always use spec.steps). Progress is
    printed every `spec.eval_every` steps (loss + held-out greedy accuracy, for monitoring
    only: nothing is selected or stopped on it).
    """
    import torch
    from transformers import LlamaForCausalLM

    task = task or AdditionTask(max_digits=spec.max_digits)
    if steps is not None:
        spec = dataclasses.replace(spec, steps=steps)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(llama_config(spec))
    model.train()
    codec = _Codec()
    # The distillation task's evaluation splits (1-3 digit held-out, 4-digit OOD) are never trained on.
    splits = AdditionTask()
    heldout = splits.heldout(HELDOUT_N)
    stream = task.train_stream(seed=spec.seed + TRAIN_SEED_OFFSET, exclude=heldout + splits.ood(OOD_N))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"[{spec.name}] {spec.num_layers} layers x {spec.hidden} wide, {n_params / 1e6:.2f}M params, "
        f"{spec.steps} steps x batch {spec.batch_size}"
    )
    t0 = time.time()
    running = None
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(spec, step)
        batch = make_batch(codec, [next(stream) for _ in range(spec.batch_size)])
        loss = completion_loss(model, *batch, label_smoothing=spec.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        last = step + 1 == spec.steps
        if (spec.eval_every and (step + 1) % spec.eval_every == 0) or last:
            acc = greedy_accuracy(model, heldout)
            log(
                f"[{spec.name}] step {step + 1}/{spec.steps} loss {running:.4f} "
                f"heldout exact match {acc:.3f} ({time.time() - t0:.0f}s)"
            )
    train_seconds = time.time() - t0
    model.eval()
    ood_acc = greedy_accuracy(model, splits.ood(OOD_N))
    log(f"[{spec.name}] OOD (4-digit operands) exact match {ood_acc:.3f}")
    return model, {"heldout_accuracy": acc, "ood_accuracy": ood_acc, "train_seconds": round(train_seconds, 1),
                   "params": n_params}


def save_model(model, out_dir: str | Path) -> None:
    """Write weights (safetensors, fp32) + config + tokenizer into `out_dir`."""
    from onpolicy.toy.tokenizer import save_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(out_dir)

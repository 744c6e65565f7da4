"""The chat example's teacher and student: Qwen2-architecture models trained on the word problems.

Both are ordinary Hugging Face folders (config.json, model.safetensors, tokenizer with its chat
template), so transformers, vLLM and every part of the run load them as they would
`Qwen/Qwen3-1.7B`. Why these shapes and recipes:
- `head_dim` is 32: vLLM's CPU attention supports head sizes {32, 64, 80, 96, 112, 128}.
  Grouped-query attention (fewer KV heads than query heads) as in the real Qwen2 models.
- Untied input and output embeddings, like the toy models the weight push is tested with.
- Sizes are set by CPU time, not by what the task could use: the teacher (1.4M parameters) trains
  in ~3 minutes on one free core (0.4 s a step; a 3.4M-parameter, 4 x 256 model took 3 s a step
  on the shared machine). With label smoothing it is right on ~58% of held-out problems and
  calibrated on the rest (a wrong digit at log-prob ~ -5, not ~ -15: the toy's lesson on what
  makes sampled reverse-KL advantages blow up).
- The student is smaller and trains for a tenth of the teacher's steps: it knows the format (a
  digit, then `<|im_end|>`) and gets ~23% right, which leaves distillation room.
Training puts the loss on the assistant's tokens only (its digits and the closing `<|im_end|>`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

# Bump when the training code changes the weights it produces, so cached builds go stale.
CODE_VERSION = 1
MAX_NEW_TOKENS = 4  # answers are one digit, then <|im_end|>; room for a student that rambles


@dataclass(frozen=True)
class ChatModelSpec:
    """Architecture and training recipe of one model; its hash (with the data's) names a build."""

    name: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    eval_every: int = 0  # log held-out exact match every N steps (monitoring only; 0: at the end)
    seed: int = 0
    max_positions: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def spec_hash(self, data_key: str = "") -> str:
        blob = json.dumps({"spec": dataclasses.asdict(self), "code": CODE_VERSION, "data": data_key},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


TEACHER = ChatModelSpec(name="teacher", num_layers=3, hidden=192, heads=6, kv_heads=2, intermediate=512,
                        steps=400, label_smoothing=0.1)
STUDENT = ChatModelSpec(name="student", num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256,
                        steps=40, warmup_steps=10, seed=1)
SPECS = {"teacher": TEACHER, "student": STUDENT}


def qwen2_config(spec: ChatModelSpec, tokenizer):
    """A Qwen2Config for `spec` with the tokenizer's vocabulary and special ids."""
    from transformers import Qwen2Config

    if spec.hidden % spec.heads or spec.head_dim not in (32, 64, 80, 96, 112, 128) or spec.heads % spec.kv_heads:
        raise ValueError(
            f"{spec.name}: hidden={spec.hidden}, heads={spec.heads}, kv_heads={spec.kv_heads} give "
            f"head_dim={spec.hidden / spec.heads:g}; vLLM's CPU attention needs head_dim in "
            "{32, 64, 80, 96, 112, 128} and heads must be a multiple of kv_heads"
        )
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def encode_rows(tokenizer, rows: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per row: the chat template up to the assistant's turn, then the
    assistant's reply and `<|im_end|>` (what a generation that stops at EOS produces)."""
    out = []
    for row in rows:
        *context, reply = row["messages"]
        text = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        completion = tokenizer(reply["content"], add_special_tokens=False)["input_ids"]
        out.append((list(prompt), list(completion) + [tokenizer.eos_token_id]))
    return out


def make_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input_ids, attention_mask, loss_mask); loss_mask[b, t] = 1 when token t+1 is a
    completion token (the logits at t predict it)."""
    import torch

    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(pairs), width - 1), dtype=torch.float32)
    for b, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        ids[b, :n] = torch.tensor(p + c)
        attn[b, :n] = 1
        loss_mask[b, len(p) - 1 : n - 1] = 1.0
    return ids, attn, loss_mask


def greedy_accuracy(model, tokenizer, rows: Sequence[dict], batch_size: int = 256) -> float:
    """Exact match of the greedy reply (up to `<|im_end|>`, MAX_NEW_TOKENS at most) against `answer`.

    Prompts are grouped by length so no padding is needed; with replies this short, recomputing
    the prefix each step (no KV cache) costs little.
    """
    import torch

    pairs = encode_rows(tokenizer, rows)
    by_len: dict[int, list[int]] = {}
    for i, (p, _) in enumerate(pairs):
        by_len.setdefault(len(p), []).append(i)
    correct = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idxs in by_len.values():
            for s in range(0, len(idxs), batch_size):
                chunk = idxs[s : s + batch_size]
                ids = torch.tensor([pairs[i][0] for i in chunk])
                start = ids.shape[1]
                for _ in range(MAX_NEW_TOKENS):
                    ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
                for row, i in enumerate(chunk):
                    reply = ids[row, start:].tolist()
                    reply = reply[: reply.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in reply else reply
                    correct += tokenizer.decode(reply).strip() == rows[i]["answer"]
    model.train(was_training)
    return correct / max(len(rows), 1)


def _lr_at(spec: ChatModelSpec, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(spec: ChatModelSpec, tokenizer, train_rows: Sequence[dict], heldout_rows: Sequence[dict],
                log=print):
    """Train `spec` from a seeded random init on `train_rows`; returns (model, info)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from onpolicy.toy.models import completion_loss

    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(qwen2_config(spec, tokenizer))
    model.train()
    pairs = encode_rows(tokenizer, train_rows)
    rng = random.Random(spec.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{spec.name}] Qwen2, {spec.num_layers} layers x {spec.hidden} wide, {n_params / 1e6:.2f}M params, "
        f"{spec.steps} steps x batch {spec.batch_size}")
    t0, running, order = time.time(), None, []
    for step in range(spec.steps):
        if len(order) < spec.batch_size:  # epochs over a fresh shuffle each
            order += rng.sample(range(len(pairs)), len(pairs))
        batch, order = [pairs[i] for i in order[: spec.batch_size]], order[spec.batch_size :]
        for g in opt.param_groups:
            g["lr"] = _lr_at(spec, step)
        loss = completion_loss(model, *make_batch(batch, tokenizer.pad_token_id),
                               label_smoothing=spec.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == spec.steps:
            acc = ""
            if spec.eval_every and (step + 1) % spec.eval_every == 0:
                acc = f" held-out exact match {greedy_accuracy(model, tokenizer, heldout_rows[:128]):.3f}"
            log(f"[{spec.name}] step {step + 1}/{spec.steps} loss {running:.3f}{acc} ({time.time() - t0:.0f}s)")
    train_seconds = time.time() - t0
    acc = greedy_accuracy(model, tokenizer, heldout_rows)
    log(f"[{spec.name}] held-out exact match {acc:.3f}")
    model.eval()
    return model, {"heldout_accuracy": acc, "train_seconds": round(train_seconds, 1), "params": n_params}

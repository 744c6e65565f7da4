"""Supervised training and greedy evaluation of a tiny model over (prompt_ids, completion_ids) pairs.

One loop for every kit model: AdamW (no decay on embeddings, norms and biases), the lr of
`onpolicy.learner.schedule.lr_at`, gradients clipped to norm 1, cross-entropy on completion
tokens only. A task hands it an endless iterator of pairs and a held-out scorer; nothing else
about the task reaches this module.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from onpolicy.kit.spec import ModelSpec, param_count, random_model
from onpolicy.learner.schedule import lr_at

if TYPE_CHECKING:  # torch is imported lazily: `onpolicy --help` must stay fast
    import torch

Pair = tuple[list[int], list[int]]  # (prompt ids, completion ids ending with EOS)
LOG_EVERY = 50  # steps between loss lines


def make_batch(pairs: Sequence[Pair], pad_id: int):
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


def completion_loss(model, ids, attn, loss_mask, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens only (optionally label-smoothed)."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none",
                          label_smoothing=label_smoothing)
    return (nll * loss_mask.reshape(-1)).sum() / loss_mask.sum()


def shuffled_epochs(pairs: Sequence[Pair], seed: int) -> Iterator[Pair]:
    """`pairs` forever, each pass in a fresh seeded order (for a finite training set)."""
    rng = random.Random(seed)
    while True:
        for i in rng.sample(range(len(pairs)), len(pairs)):
            yield pairs[i]


def load_model(model_or_dir):
    """`model_or_dir` itself, or the float32 model of a Hugging Face folder."""
    if not isinstance(model_or_dir, (str, Path)):
        return model_or_dir
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_or_dir), dtype=torch.float32)


def greedy_completions(model, prompts: Sequence[list[int]], eos_id: int, max_new_tokens: int,
                       batch_size: int = 256) -> list[list[int]]:
    """Greedy completion ids of each prompt, up to (not including) EOS, at most `max_new_tokens`.

    Prompts are grouped by length, so no padding is needed and positions are exactly those of
    training (no dependence on `generate()`'s padding conventions); each step feeds one token against
    the key/value cache of the prefix (the working task's completions run to ~90 tokens).
    """
    import torch

    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idxs in by_len.values():
            for s in range(0, len(idxs), batch_size):
                chunk = idxs[s : s + batch_size]
                ids = torch.tensor([list(prompts[i]) for i in chunk])
                start = ids.shape[1]
                done = torch.zeros(len(chunk), dtype=torch.bool)
                step_in, cache = ids, None
                for _ in range(max_new_tokens):
                    res = model(input_ids=step_in, past_key_values=cache, use_cache=True)
                    cache, nxt = res.past_key_values, res.logits[:, -1].argmax(-1)
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    step_in = nxt[:, None]
                    ids = torch.cat([ids, step_in], dim=1)
                    done |= nxt == eos_id
                    if bool(done.all()):
                        break
                for row, i in enumerate(chunk):
                    reply = ids[row, start:].tolist()
                    out[i] = reply[: reply.index(eos_id)] if eos_id in reply else reply
    model.train(was_training)
    return out


def greedy_accuracy(model, prompts: Sequence[list[int]], answers: Sequence[str], decode: Callable[[list[int]], str],
                    eos_id: int, max_new_tokens: int, batch_size: int = 256) -> float:
    """Fraction of prompts whose decoded greedy completion, stripped, is exactly its answer."""
    if not prompts:
        raise ValueError("greedy_accuracy needs at least one prompt")
    replies = greedy_completions(model, prompts, eos_id, max_new_tokens, batch_size)
    return sum(decode(r).strip() == a for r, a in zip(replies, answers)) / len(prompts)


def lr_for(spec: ModelSpec, step: int) -> float:
    """The lr of update `step`: `lr_at`'s warm-up and cosine, reaching min_lr_ratio x lr at update `spec.steps`
    (one past the last). That end point is the schedule the committed toy assets were trained with, so
    they rebuild bit for bit (tests/test_kit.py pins the values)."""
    return lr_at(step, spec, spec.steps + 1)


def train_model(spec: ModelSpec, tokenizer, pairs: Iterator[Pair], heldout_accuracy: Callable[[object], float],
                log=print):
    """Train `spec` from its seeded random init on `spec.batch_size` pairs a step from `pairs`; returns
    (model in eval mode, info with heldout_accuracy, train_seconds, params).

    `heldout_accuracy(model)` runs every `spec.eval_every` steps and after the last one, for
    monitoring only: nothing is selected or stopped on it.
    """
    import torch

    model = random_model(spec, tokenizer)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98))
    n_params = param_count(model)
    log(f"[{spec.name}] {spec.arch}, {spec.num_layers} layers x {spec.hidden} wide, {n_params / 1e6:.2f}M params, "
        f"{spec.steps} steps x batch {spec.batch_size}")
    t0, running, acc = time.time(), None, None
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = lr_for(spec, step)
        batch = make_batch([next(pairs) for _ in range(spec.batch_size)], tokenizer.pad_token_id)
        loss = completion_loss(model, *batch, label_smoothing=spec.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        last = step + 1 == spec.steps
        evaluate = last or (spec.eval_every and (step + 1) % spec.eval_every == 0)
        if evaluate:
            acc = heldout_accuracy(model)
        if evaluate or (step + 1) % LOG_EVERY == 0:
            shown = f" held-out exact match {acc:.3f}" if evaluate else ""
            log(f"[{spec.name}] step {step + 1}/{spec.steps} loss {running:.4f}{shown} ({time.time() - t0:.0f}s)")
    train_seconds = time.time() - t0
    if acc is None:  # steps = 0: the random init
        acc = heldout_accuracy(model)
    model.eval()
    return model, {"heldout_accuracy": acc, "train_seconds": round(train_seconds, 1), "params": n_params}

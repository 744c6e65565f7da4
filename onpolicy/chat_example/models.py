"""The chat example's teacher and student: Qwen2-architecture kit models trained on the word problems.

Both are ordinary Hugging Face folders (config.json, model.safetensors, tokenizer with its chat
template), so transformers, vLLM and every part of the run load them as they would
`Qwen/Qwen3-1.7B`. Why these shapes and recipes:
- `head_dim` is 32 (the kit's shape rule: vLLM's CPU attention). Grouped-query attention (fewer
  KV heads than query heads) as in the real Qwen2 models.
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

from collections.abc import Sequence

from onpolicy.kit.spec import ModelSpec

# Bump when the training code changes the weights it produces, so cached builds go stale.
CODE_VERSION = 1
MAX_NEW_TOKENS = 4  # answers are one digit, then <|im_end|>; room for a student that rambles


def chat_spec(**fields) -> ModelSpec:
    """A Qwen2 kit spec with the chat example's defaults (256 positions, lr 3e-3, 30 warm-up steps)."""
    return ModelSpec(**{"arch": "qwen2", "max_positions": 256, "lr": 3e-3, "warmup_steps": 30, **fields})


TEACHER = chat_spec(name="teacher", num_layers=3, hidden=192, heads=6, kv_heads=2, intermediate=512, steps=400,
                    label_smoothing=0.1)
STUDENT = chat_spec(name="student", num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, steps=40,
                    warmup_steps=10, seed=1)
SPECS = {"teacher": TEACHER, "student": STUDENT}


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


def greedy_accuracy(model, tokenizer, rows: Sequence[dict], batch_size: int = 256) -> float:
    """Exact match of the greedy reply (up to `<|im_end|>`, MAX_NEW_TOKENS at most) against `answer`."""
    from onpolicy.kit.train import greedy_accuracy as kit_accuracy

    prompts = [p for p, _ in encode_rows(tokenizer, rows)]
    return kit_accuracy(model, prompts, [r["answer"] for r in rows], tokenizer.decode, tokenizer.eos_token_id,
                        MAX_NEW_TOKENS, batch_size)


def train_model(spec: ModelSpec, tokenizer, train_rows: Sequence[dict], heldout_rows: Sequence[dict], log=print):
    """Train `spec` from a seeded random init on `train_rows` (epochs, each freshly shuffled); returns
    (model, info)."""
    from onpolicy.kit.train import shuffled_epochs
    from onpolicy.kit.train import train_model as kit_train

    pairs = shuffled_epochs(encode_rows(tokenizer, train_rows), seed=spec.seed)
    return kit_train(spec, tokenizer, pairs, lambda m: greedy_accuracy(m, tokenizer, heldout_rows), log=log)

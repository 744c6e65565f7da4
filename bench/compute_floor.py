"""The compute floor of `bench/vs_trl.py`: one on-policy distillation step's pure compute, in one process.

    .venv/bin/python bench/compute_floor.py SPEC.json

SPEC: {"student", "teacher", "prompts_path", "steps", "batch", "max_new_tokens", "lr", "beta1", "beta2",
       "weight_decay", "grad_clip", "seed", "save_to", "result", "warmup": 2}.

Each step, with plain torch + transformers in fp32 and no framework around it:
1. the student samples with HF `generate` (KV cache, temperature 1, top_k 0, top_p 1), the batch's prompts
   left-padded, up to `max_new_tokens` (a sequence stops at EOS, which counts as a sampled token);
2. the teacher scores the sampled sequences in one forward (no grad);
3. the student runs forward + backward of the sampled per-token reverse KL in REINFORCE form,
       loss = sum_t m_t (log q(y_t) - log p_T(y_t)).detach() * log q(y_t) / sum_t m_t,
   then the gradient norm is clipped and AdamW steps (onpolicy's objective at ratio 1, same optimizer).
Nothing runs concurrently and nothing is copied between processes, so it is what a step costs at
least on this machine with these libraries; onpolicy's step time divided by it is its overhead factor.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def token_logprobs(model, ids_BT, mask_BT, pos_BT, n_prompt: int):
    """log p(y_t) of each completion token y_t = ids[:, n_prompt + t] under `model`, shape (B, C)."""
    import torch

    logits = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT).logits
    logp_BCV = torch.log_softmax(logits[:, n_prompt - 1 : -1].float(), dim=-1)
    return logp_BCV.gather(-1, ids_BT[:, n_prompt:].unsqueeze(-1)).squeeze(-1)


def main() -> None:
    t_process = time.perf_counter()
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["student"])
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=spec["lr"], betas=(spec["beta1"], spec["beta2"]),
                            weight_decay=spec["weight_decay"])
    prompts = [json.loads(line) for line in Path(spec["prompts_path"]).read_text().splitlines()]
    prompts = [r["prompt"] for r in prompts if r.get("split", "train") == "train"]
    B, steps, eos, pad = spec["batch"], spec["steps"], tok.eos_token_id, tok.pad_token_id

    per_step, phases, counts, end_epochs = [], [], [], []
    t_train, first_step_epoch = time.perf_counter(), time.time()
    for step in range(steps):
        t0 = time.perf_counter()
        ids = [list(tok(p)["input_ids"]) for p in prompts[step * B : (step + 1) * B]]  # as onpolicy encodes
        P = max(len(x) for x in ids)
        prompt_ids = torch.tensor([[pad] * (P - len(x)) + x for x in ids])
        prompt_mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in ids])
        student.eval()
        out = student.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0,
                               top_k=0, top_p=1.0, max_new_tokens=spec["max_new_tokens"], use_cache=True,
                               pad_token_id=pad, eos_token_id=eos)
        t1 = time.perf_counter()
        completion = out[:, P:]
        # Completion tokens up to and including the first EOS.
        after_eos = (completion == eos).int().cumsum(dim=1) - (completion == eos).int()
        comp_mask = (after_eos == 0).long()
        mask = torch.cat([prompt_mask, comp_mask], dim=1)
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            teacher_lp = token_logprobs(teacher, out, mask, pos, P)
        t2 = time.perf_counter()
        student.train()
        student_lp = token_logprobs(student, out, mask, pos, P)
        m = comp_mask.float()
        loss = ((student_lp - teacher_lp).detach() * student_lp * m).sum() / m.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), spec["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        per_step.append(t3 - t0)
        end_epochs.append(time.time())
        phases.append({"generate": t1 - t0, "teacher": t2 - t1, "learn": t3 - t2})
        counts.append((len(ids), int(comp_mask.sum())))
        print(f"floor step {step + 1}/{steps}: {t3 - t0:.3f} s, {counts[-1][1]} tokens, "
              f"sampled KL {float(((student_lp - teacher_lp).detach() * m).sum() / m.sum()):.4f}", flush=True)
    train_seconds = time.perf_counter() - t_train
    student.save_pretrained(spec["save_to"])
    tok.save_pretrained(spec["save_to"])
    src = Path(spec["student"]) / "generation_config.json"
    if src.is_file():
        (Path(spec["save_to"]) / "generation_config.json").write_text(src.read_text())

    warmup = spec.get("warmup", 2)
    if steps <= warmup:
        raise SystemExit(f"{steps} steps, none left after {warmup} warm-up steps: raise --steps")
    kept = range(warmup, steps)
    result = {
        "steady": {
            "steps": len(kept),
            "sequences": sum(counts[i][0] for i in kept),
            "sampled_tokens": sum(counts[i][1] for i in kept),
            "interval_seconds": sum(per_step[i] for i in kept),
            "phase_seconds": {k: sum(phases[i][k] for i in kept) for k in ("generate", "teacher", "learn")},
            "window_epochs": [end_epochs[warmup - 1] if warmup else first_step_epoch, end_epochs[-1]],
        },
        "per_step_seconds": per_step,
        "per_step_counts": counts,
        "train_seconds": train_seconds,
        "first_step_started_at": first_step_epoch,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "process_seconds_to_end_of_save": time.perf_counter() - t_process,
        "student_out": spec["save_to"],
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

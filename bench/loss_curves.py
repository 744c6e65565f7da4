"""How fast each loss learns on the toy, without the service around it: one process, strictly on-policy.

    .venv/bin/python bench/loss_curves.py NAME STEPS [key=value ...]
    .venv/bin/python bench/loss_curves.py topk_1e-3 200 loss.kind=topk_reverse_kl optim.lr=1e-3

Each step: the student samples `rollout.prompts_per_step` toy prompts with transformers `generate`
(temperature 1, the learner's current weights), the toy teacher scores them (`HFTeacher`, top-k as in
configs/toy.yaml), and onpolicy's `Learner` takes one step of `loss.kind`. The overrides are applied
to configs/toy.yaml. Every 50 steps it prints the held-out greedy exact match (256 prompts), the mean
sampled reverse KL of the last 50 batches and, teacher-forced on the correct answers, the student's
probability of the right token and its argmax accuracy at each answer position (`d1` = the units
digit, ..., `eos`) with its mean entropy there: where the student is wrong, is it unsure or confidently
wrong? At the end one `RESULT` line. Same objective code as a run,
none of the engines: the losses are compared on learning speed per step, not on wall time (for that,
`onpolicy train`). `THREADS=1` to share the machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def answer_batch(examples):
    """The held-out prompts with their correct answers, tokenised once for `answer_positions`:
    (input ids, attention mask, answer-target mask, end-token id)."""
    from onpolicy.kit.train import make_batch
    from onpolicy.toy.models import encode, shared_tokenizer

    tok = shared_tokenizer()
    return (*make_batch([encode(e) for e in examples], tok.pad_token_id), tok.eos_token_id)


def answer_positions(model, batch) -> dict:
    """Teacher-forced on the correct answers: per answer position (d1 = first emitted digit, the units),
    (mean p(right token), argmax accuracy); `eos` for the end token; `ent` = mean entropy (nats)."""
    import torch

    ids_BT, attn_BT, mask_BT, eos = batch
    with torch.no_grad():
        logp_BTV = torch.log_softmax(model(input_ids=ids_BT, attention_mask=attn_BT).logits.float(), -1)[:, :-1]
    target_BT, mask_BT = ids_BT[:, 1:], mask_BT.bool()
    p_right_BT = logp_BTV.gather(-1, target_BT.unsqueeze(-1)).squeeze(-1).exp()
    right_BT = logp_BTV.argmax(-1) == target_BT
    index_BT = mask_BT.long().cumsum(1)  # 1 = first answer token
    is_eos_BT = mask_BT & (target_BT == eos)
    out = {}
    for name, sel in [*((f"d{k}", mask_BT & (index_BT == k) & ~is_eos_BT) for k in range(1, 6)), ("eos", is_eos_BT)]:
        if sel.any():
            out[name] = (round(p_right_BT[sel].mean().item(), 3), round(right_BT[sel].float().mean().item(), 3))
    out["ent"] = round(-(logp_BTV.exp() * logp_BTV).sum(-1)[mask_BT].mean().item(), 3)
    return out


def main() -> None:
    import torch

    from onpolicy.config import load_config
    from onpolicy.learner.core import Learner
    from onpolicy.prompts import PromptSource, encode_prompts
    from onpolicy.teacher.local.engines import HFTeacher
    from onpolicy.toy.build import build_toy_models
    from onpolicy.toy.models import greedy_accuracy
    from onpolicy.types import Rollout, ScoreRequestItem

    name, steps, *overrides = sys.argv[1:]
    threads = os.environ.get("THREADS", "2")
    torch.set_num_threads(int(threads))
    build_toy_models(REPO / "toy")
    cfg = load_config(REPO / "configs" / "toy.yaml", [
        f"model.student={REPO / 'toy' / 'student'}", f"teacher.model={REPO / 'toy' / 'teacher'}",
        f"schedule.steps={steps}", "schedule.max_staleness=0", "resources.learner_device=cpu",
        f"resources.torch_threads={threads}", *overrides])
    torch.manual_seed(cfg.seed)
    learner = Learner(cfg.model.student, cfg)
    sampler = HFTeacher(cfg.model.student, batch_size=256)  # generate() with the learner's weights
    teacher = HFTeacher(cfg.teacher.model, batch_size=256)
    source = PromptSource(cfg.data, cfg.eval, cfg.seed)
    t0, curve, kls = time.time(), [(0, greedy_accuracy(learner.model, source.heldout))], []
    answers = answer_batch(source.heldout)
    print(f"{name} step 0: held-out exact match {curve[0][1]:.3f}, (p right, accuracy) by answer position "
          f"{answer_positions(learner.model, answers)}", flush=True)
    for step in range(1, int(steps) + 1):
        prompts = encode_prompts(learner.tokenizer, source.batch(cfg.rollout.prompts_per_step))
        sampler.model.load_state_dict(learner.model.state_dict())
        gens = sampler.generate(prompts, max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0, seed=step)
        rollouts = [Rollout(prompt_ids=prompts[g.prompt_index], completion_ids=g.completion_ids,
                            sampler_logprobs=g.logprobs, policy_version=learner.step, finish_reason=g.finish_reason)
                    for g in gens]
        items = [ScoreRequestItem(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids) for r in rollouts]
        metrics = learner.train_step(rollouts, teacher.score(items, top_k=cfg.teacher.top_k))
        kls.append(metrics["teacher_kl"])
        if step % 50 == 0:
            curve.append((step, greedy_accuracy(learner.model, source.heldout)))
            print(f"{name} step {step}: held-out exact match {curve[-1][1]:.3f}, sampled reverse KL (last 50) "
                  f"{sum(kls[-50:]) / 50:.3f}, completion length {metrics['completion_len_mean']:.2f} "
                  f"({time.time() - t0:.0f}s); by answer position {answer_positions(learner.model, answers)}",
                  flush=True)
    print("RESULT", name, json.dumps([(s, round(a, 3)) for s, a in curve]),
          "kl_first20", round(sum(kls[:20]) / 20, 3), "kl_last20", round(sum(kls[-20:]) / 20, 3), flush=True)


if __name__ == "__main__":
    main()

"""Why exact reverse KL stalls on the toy: the same divergence without sampling, on fixed answer tokens.

    .venv/bin/python bench/first_digit.py {rkl,fkl} {first,forced} STEPS [LR] [STUDENT_STEPS]

The student is the toy student's recipe stopped after STUDENT_STEPS supervised steps (default 250: the
weak student the toy shipped before the mid-trained one, 0.125 held-out exact match; built once into
toy/student-STUDENT_STEPS). No rollouts: each step draws 128 training prompts, puts the *correct* answer after them (teacher
forcing), and takes one AdamW step (clip 1.0, no warm-up) of the exact per-token divergence between the
toy student and the toy teacher over the whole vocabulary:
- `rkl`: reverse KL(student || teacher), what `topk_reverse_kl` computes with top_k = the vocabulary;
- `fkl`: forward KL(teacher || student), what `jsd` with beta = 0 (the demo's loss) computes;
- `first`: on the first answer token only (d1, the units digit: the position the student gets wrong most);
- `forced`: on every answer token (d1 ... EOS), all of them after a correct prefix.
Every 50 steps it prints the held-out argmax accuracy and mean p(right token) at d1, so the two
divergences can be compared on the one position that decides most exact matches, with and without the
other positions sharing the gradient. `THREADS` (default 1) sets torch's threads.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch
    from loss_curves import answer_batch, answer_positions  # bench/ is on sys.path when run as a script

    from onpolicy.config import load_config
    from onpolicy.kit.train import load_model, make_batch
    from onpolicy.prompts import PromptSource
    from onpolicy.toy.build import build_toy_models
    from onpolicy.toy.models import STUDENT, encode, shared_tokenizer

    kind, where, steps, *rest = sys.argv[1:]
    lr = float(rest[0]) if rest else 1e-3
    student_steps = int(rest[1]) if len(rest) > 1 else 250
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    build_toy_models(REPO / "toy")
    weak = REPO / "toy" / f"student-{student_steps}"
    build_toy_models(weak, specs={"student": dataclasses.replace(STUDENT, steps=student_steps)})
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "toy.yaml")
    source, pad_id = PromptSource(cfg.data, cfg.eval, cfg.seed), shared_tokenizer().pad_token_id
    teacher, student = load_model(REPO / "toy" / "teacher").eval(), load_model(weak / "student").train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)

    def logprobs(model, examples, first_only: bool):
        ids, attn, mask_BT = make_batch([encode(e) for e in examples], pad_id)
        logits_BTV = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        if first_only:  # the logits that predict the first answer token
            return torch.log_softmax(logits_BTV[torch.arange(len(examples)), mask_BT.argmax(1)], -1)
        return torch.log_softmax(logits_BTV[mask_BT.bool()], -1)

    answers = answer_batch(source.heldout)
    for step in range(int(steps) + 1):
        if step % 50 == 0:
            p_right, accuracy = answer_positions(student, answers)["d1"]
            print(f"{kind} {where} lr {lr:g} step {step}: held-out d1 accuracy {accuracy:.3f}, p(right) {p_right:.3f}",
                  flush=True)
        examples = source.batch(128)
        with torch.no_grad():
            logp_teacher = logprobs(teacher, examples, where == "first")
        logp_student = logprobs(student, examples, where == "first")
        if kind == "rkl":
            loss = (logp_student.exp() * (logp_student - logp_teacher)).sum(-1).mean()
        else:
            loss = (logp_teacher.exp() * (logp_teacher - logp_student)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()


if __name__ == "__main__":
    main()

"""Where a working-task student goes wrong, and what each objective's gradient does about it.

    .venv/bin/python bench/working_errors.py STUDENT_DIR [--teacher working/teacher] [--n 256]

Greedy completions of the held-out split (5-6 digit operands); for every wrong one, the first position that
differs from the answer, named by its column and field (`x+y+c=kd,`: the column's digit of a, of b, the carry
in, the carry out, the result digit; or the result after `|`), the operand lengths, and the probabilities the
student and the teacher give the right token and the student's own at that position (the teacher reading the
student's prefix, which is right up to there). Then the gradient, at the median such position, of the two
full-distribution objectives with respect to the student's logits: reverse KL's is scaled by the student's
own probability of each token, so it vanishes where the student is confidently wrong; forward KL's is q - p.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

FIELDS = "x+y+c=kd,"  # one column of the working; single characters, so 9 positions a column


def first_error(got: str, want: str) -> tuple[int, str]:
    """(position of the first difference, what is written there: a field of a column, or the result)."""
    i = next((j for j in range(min(len(got), len(want))) if got[j] != want[j]), min(len(got), len(want)))
    if i >= want.index("|"):
        return i, "result"
    col, off = divmod(i, len(FIELDS))
    return i, f"column {col} {FIELDS[off]}"


def logit_gradients(q_own: float, q_right: float, p_right: float, vocab: int) -> dict[str, float]:
    """Gradient norms of KL(q||p) and KL(p||q) wrt the student's logits, for a student with `q_own` on a wrong
    token and `q_right` on the right one, a teacher with `p_right` on the right one; the rest spread evenly."""
    import torch

    def dist(on: dict[int, float]) -> torch.Tensor:
        rest = (1.0 - sum(on.values())) / (vocab - len(on))
        d = torch.full((vocab,), rest, dtype=torch.float64)
        for k, v in on.items():
            d[k] = v
        return d

    q, p = dist({0: q_own, 1: q_right}), dist({1: p_right})
    out = {}
    for name in ("reverse", "forward"):
        z = q.log().clone().requires_grad_()
        lq = torch.log_softmax(z, -1)
        loss = (lq.exp() * (lq - p.log())).sum() if name == "reverse" else (p * (p.log() - lq)).sum()
        (g,) = torch.autograd.grad(loss, z)
        out[f"{name}_kl"], out[f"{name}_grad_norm"] = loss.item(), g.norm().item()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("student")
    ap.add_argument("--teacher", default="working/teacher")
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args(argv)

    import torch

    from onpolicy.kit.train import greedy_completions, load_model
    from onpolicy.working.models import MAX_NEW_TOKENS, SPLITS, encode, shared_tokenizer

    tok = shared_tokenizer()
    vocab = tok.get_vocab()
    student, teacher = load_model(args.student), load_model(args.teacher)
    examples = SPLITS.heldout(args.n)
    prompts = [encode(e)[0] for e in examples]
    outs = greedy_completions(student, prompts, tok.eos_token_id, MAX_NEW_TOKENS)
    where, lengths, probs = Counter(), Counter(), []
    for e, ids, out in zip(examples, prompts, outs):
        got, want = tok.decode(out).strip(), e.answer
        a, b = e.prompt[:-1].split("+")
        lengths[(len(a), len(b), got == want)] += 1
        if got == want:
            continue
        i, field = first_error(got, want)
        where[field] += 1
        prefix = torch.tensor([ids + [vocab[c] for c in got[:i]]])
        right = vocab[want[i]] if i < len(want) else tok.eos_token_id
        own = vocab[got[i]] if i < len(got) else tok.eos_token_id
        with torch.no_grad():
            q = torch.softmax(student(prefix).logits[0, -1].double(), -1)
            p = torch.softmax(teacher(prefix).logits[0, -1].double(), -1)
        probs.append({"q_own": q[own].item(), "q_right": q[right].item(), "p_right": p[right].item(),
                      "p_own": p[own].item()})
    wrong = sum(where.values())
    print(f"held-out exact match {1 - wrong / args.n:.3f} ({wrong} of {args.n} wrong)")
    print("first error at: " + ", ".join(f"{k} {v}" for k, v in where.most_common()))
    print("by operand lengths (a, b): " + ", ".join(
        f"{la}+{lb} {lengths[(la, lb, True)]}/{lengths[(la, lb, True)] + lengths[(la, lb, False)]} right"
        for la, lb in sorted({(la, lb) for la, lb, _ in lengths})))
    summary: dict = {"exact_match": 1 - wrong / args.n, "first_error": dict(where)}
    if probs:
        med = {k: statistics.median(p[k] for p in probs) for k in probs[0]}
        print("median at the first error: student p(own) {q_own:.3f}, p(right) {q_right:.4f}; teacher p(right) "
              "{p_right:.4f}, p(student's) {p_own:.2e}".format(**med))
        grads = logit_gradients(med["q_own"], med["q_right"], med["p_right"], len(vocab))
        print("there, wrt the student's logits: reverse KL {reverse_kl:.2f} with gradient norm {reverse_grad_norm:.4f}; "
              "forward KL {forward_kl:.2f} with gradient norm {forward_grad_norm:.4f}".format(**grads))
        summary |= {"median": med, "gradients": grads}
    return summary


if __name__ == "__main__":
    main()

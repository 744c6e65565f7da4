"""Distillation methods side by side at equal teacher cost: on-policy vs sequence-level KD vs Hinton soft
targets vs GKD mixing, all from the same toy student, against teacher tokens processed.

    .venv/bin/python bench/quality.py [--methods on_policy,on_policy_sampled,sft,soft_targets,gkd]
                                      [--steps 600] [--lrs 3e-4,1e-3,3e-3] [--sampled-lrs 1e-4,3e-4,1e-3]
                                      [--out runs/quality]

Each (method, lr) is one `onpolicy train` of configs/toy.yaml in a fresh process, evaluated every
`--eval-every` steps on the held-out split (256 prompts, 1-3 digit operands) and the OOD split (4-digit
operands: a capability the teacher has and no distillation prompt asks for). The x axis is teacher
tokens processed: prompt + completion tokens of every sequence the teacher scored or generated for
training (`teacher_tokens_processed` in metrics.jsonl); evaluation is not counted. Every method gets
the same small lr sweep and is reported at its best lr (the one reaching the highest held-out exact
match, ties: earliest). Prints a table and writes `<out>/quality.json` and `<out>/quality.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    # name: (what it is, overrides)
    "on_policy": ("student samples, exact top-k reverse KL (the demo's objective)", []),
    "on_policy_sampled": ("student samples, sampled reverse KL (needs only the sampled token's log-prob)",
                          ["loss.kind=reverse_kl", "teacher.top_k=0"]),  # its lr: --sampled-lrs
    "sft": ("teacher samples, cross-entropy (sequence-level KD)", ["loss.kind=sft", "teacher.top_k=0"]),
    "soft_targets": ("teacher samples, T=2 KL over the top-16 + 0.5 CE (Hinton)",
                     ["loss.kind=soft_targets", "loss.temperature=2.0", "loss.alpha=0.5"]),
    "gkd": ("student samples half the batches, teacher the other half, generalised JSD beta=0.5 (GKD)",
            ["loss.kind=gkd", "loss.lmbda=0.5", "loss.beta=0.5"]),
}


def run_one(method: str, lr: float, args, out: Path) -> list[dict]:
    """Train one method at one lr; returns its eval points with the teacher tokens spent so far."""
    run_dir = out / f"{method}_lr{lr:g}"
    overrides = [f"output_dir={run_dir}", f"optim.lr={lr}", f"schedule.steps={args.steps}",
                 f"eval.every={args.eval_every}", "checkpoint.every=0", "schedule.max_wall_seconds=null",
                 *METHODS[method][1]]
    cmd = [sys.executable, "-m", "onpolicy.cli", "train", str(REPO / "configs" / "toy.yaml"), *overrides]
    log = out / f"{method}_lr{lr:g}.log"
    with log.open("w") as f:
        res = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy(), check=False)
    if res.returncode != 0:
        raise SystemExit(f"{method} lr={lr} failed (exit {res.returncode}); see {log}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens_at = {0: 0}
    for r in records:
        if r["kind"] == "train":
            tokens_at[r["step"]] = r["teacher_tokens_processed"]
    return [{"step": r["step"], "teacher_tokens": tokens_at.get(r["step"], 0), **{k: r[k] for k in (
        "heldout_accuracy", "heldout_reverse_kl", "ood_accuracy", "ood_reverse_kl") if k in r}}
            for r in records if r["kind"] == "eval"]


def tokens_to_reach(points: list[dict], target: float) -> float | None:
    for p in points:
        if p["heldout_accuracy"] >= target:
            return p["teacher_tokens"]
    return None


def at_budget(points: list[dict], budget: float, key: str) -> float | None:
    """The metric at the last eval point within `budget` teacher tokens."""
    within = [p for p in points if p["teacher_tokens"] <= budget]
    return within[-1][key] if within else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="on_policy,on_policy_sampled,sft,soft_targets,gkd")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--sampled-lrs", default="1e-4,3e-4,1e-3",
                    help="lrs for on_policy_sampled (a one-sample estimator wants smaller steps)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--teacher-accuracy", type=float, default=None,
                    help="the teacher's held-out exact match (default: measured)")
    ap.add_argument("--out", default="runs/quality")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from onpolicy.config import load_config
    from onpolicy.prompts import PromptSource
    from onpolicy.toy.build import build_toy_models
    from onpolicy.toy.models import greedy_accuracy

    build_toy_models(REPO / "toy")
    cfg = load_config(str(REPO / "configs" / "toy.yaml"))
    src = PromptSource(cfg.data, cfg.eval, cfg.seed)
    teacher_acc = args.teacher_accuracy or greedy_accuracy(REPO / "toy" / "teacher", src.heldout)
    teacher_ood = greedy_accuracy(REPO / "toy" / "teacher", src.ood)
    target = 0.9 * teacher_acc
    results: dict[str, dict] = {}
    for method in args.methods.split(","):
        sweep = {}
        lrs = args.sampled_lrs if method == "on_policy_sampled" else args.lrs
        for lr in (float(x) for x in lrs.split(",")):
            print(f"[{method}] lr={lr:g}: training {args.steps} steps ...", flush=True)
            points = run_one(method, lr, args, out)
            best = max(p["heldout_accuracy"] for p in points)
            print(f"[{method}] lr={lr:g}: best held-out exact match {best:.3f}, reaches {target:.3f} after "
                  f"{tokens_to_reach(points, target)} teacher tokens", flush=True)
            sweep[lr] = points
        best_lr = max(sweep, key=lambda lr: (max(p["heldout_accuracy"] for p in sweep[lr]),
                                             -(tokens_to_reach(sweep[lr], target) or float("inf"))))
        results[method] = {"what": METHODS[method][0], "best_lr": best_lr, "points": sweep[best_lr],
                           "sweep": {str(k): v for k, v in sweep.items()}}
    summary = {"teacher_heldout_accuracy": teacher_acc, "teacher_ood_accuracy": teacher_ood, "target": target,
               "steps": args.steps, "methods": results}
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    plot(results, target, out / "quality.png")
    print(format_table(summary))


def format_table(summary: dict) -> str:
    res, target = summary["methods"], summary["target"]
    budgets = sorted({p["teacher_tokens"] for m in res.values() for p in m["points"]})
    budgets = [b for b in (2.5e5, 5e5, 1e6, 2e6, 4e6) if budgets and b <= budgets[-1]] or budgets[-1:]
    head = ["method", "best lr", f"teacher tokens to {target:.2f} EM"] + [f"EM / KL @ {b / 1e6:g}M" for b in budgets]
    head += ["final EM", "final KL", "OOD EM"]
    rows = [head]
    for name, m in res.items():
        pts = m["points"]
        reach = tokens_to_reach(pts, target)
        row = [name, f"{m['best_lr']:g}", f"{reach / 1e6:.2f}M" if reach is not None else "not reached"]
        for b in budgets:
            em, kl = at_budget(pts, b, "heldout_accuracy"), at_budget(pts, b, "heldout_reverse_kl")
            row.append("-" if em is None else f"{em:.3f} / {kl:.3f}")
        row += [f"{pts[-1]['heldout_accuracy']:.3f}", f"{pts[-1]['heldout_reverse_kl']:.4f}",
                f"{pts[-1].get('ood_accuracy', float('nan')):.3f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"teacher held-out EM {summary['teacher_heldout_accuracy']:.3f}, OOD EM "
                 f"{summary['teacher_ood_accuracy']:.3f}; target = 90% of the teacher's held-out EM")
    return "\n".join(lines)


def plot(results: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_em, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in results.items():
        xs = [max(p["teacher_tokens"], 1) / 1e6 for p in m["points"]]
        ax_em.plot(xs, [p["heldout_accuracy"] for p in m["points"]], "-o", ms=3, label=f"{name} (lr {m['best_lr']:g})")
        ax_kl.plot(xs, [p["heldout_reverse_kl"] for p in m["points"]], "-o", ms=3, label=name)
    ax_em.axhline(target, ls=":", c="grey")
    ax_em.set(xlabel="teacher tokens processed (M)", ylabel="held-out exact match", ylim=(0, 1.02),
              title="Task accuracy vs teacher cost")
    ax_kl.set(xlabel="teacher tokens processed (M)", ylabel="held-out reverse KL (nats/token)", yscale="log",
              title="Reverse KL to the teacher vs teacher cost")
    for ax in (ax_em, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Distillation methods side by side at equal teacher cost: on-policy vs sequence-level KD vs Hinton soft
targets vs GKD mixing, from the same student, against teacher tokens processed; and the same at three answer
lengths of one skill.

    .venv/bin/python bench/quality.py [--config configs/working.yaml] [--lengths long]
        [--methods on_policy,on_policy_fkl,on_policy_sampled,sft,soft_targets,gkd] [--lrs 3e-4,1e-3] [--sampled-lrs 1e-4,3e-4]
        [--seeds 0,1] [--steps 300] [--eval-prompts 128] [--out runs/quality] [--png docs/quality_vs_length.png]

Every arm (length, method, lr, seed) is one `onpolicy train` of `--config` in this process (its own engines;
`runs/...` keeps each run folder, and an arm whose run finished is read back, not run again, so a sweep that
stops can be resumed). For each length and method: the lrs at the first seed, then the other seeds at the best
lr (the one reaching the target on the fewest teacher tokens; none reaching it: the highest exact match).

- The target is 90 % of the teacher's held-out exact match (the first `--eval-prompts` held-out prompts, the
  teacher's greedy completions, measured here).
- The x axis is teacher tokens processed: prompt + completion tokens of every sequence the teacher scored or
  generated for training (`teacher_tokens_processed` in metrics.jsonl); evaluation is not counted.
- Evaluations follow a geometric schedule (`eval.at`: each step at most `--ratio` x the one before), so the
  crossing is read to within that ratio: the table gives the teacher tokens at the first evaluation at or above
  the target and the bracket [the evaluation before, that one].
- `--lengths short,medium,long` is the answer-length sweep (`onpolicy.working.models.LENGTHS`: the same
  column working on operands of 1-2, 3-4 and 5-6 digits, so ~19, ~39 and ~59 answer tokens; the same models)
  and writes `--png`: the sft / on-policy ratio of teacher tokens to the target at each length (on-policy: the
  `on_policy*` arm that got there on the fewest).

Prints the tables and writes `<out>/quality.json` and `<out>/quality.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    # name: (what it is, overrides)
    "on_policy": ("student samples, exact top-k reverse KL (configs/toy.yaml's objective)",
                  ["loss.kind=topk_reverse_kl"]),
    "on_policy_fkl": ("student samples, forward KL to the teacher's top-k (GKD's on-policy JSD, beta 0)",
                      ["loss.kind=jsd", "loss.beta=0"]),  # configs/working.yaml's objective
    "on_policy_sampled": ("student samples, sampled reverse KL (needs only the sampled token's log-prob)",
                          ["loss.kind=reverse_kl", "teacher.top_k=0"]),  # its lr: --sampled-lrs
    "sft": ("teacher samples, cross-entropy (sequence-level KD)", ["loss.kind=sft", "teacher.top_k=0"]),
    "soft_targets": ("teacher samples, T=2 KL over the teacher's top-k + 0.5 CE (Hinton)",
                     ["loss.kind=soft_targets", "loss.temperature=2.0", "loss.alpha=0.5"]),
    "gkd": ("student samples half the batches, teacher the other half, generalised JSD beta=0.5 (GKD)",
            ["loss.kind=gkd", "loss.lmbda=0.5", "loss.beta=0.5"]),
}
POINT_KEYS = ("heldout_accuracy", "heldout_reverse_kl", "heldout_token_kl_p99", "heldout_rare_kl")


def geometric_steps(total: int, ratio: float = 1.2) -> list[int]:
    """Evaluation steps in 1..total-1 (the run evaluates at 0 and at the end itself), each at most `ratio` x the
    one before once that is more than one step: 1, 2, ..., 5, 6, 7, 8, 9, 10, 12, 14, 16, 19, 22, ..."""
    steps, s = [], 1
    while s < total:
        steps.append(s)
        s = max(s + 1, math.floor(s * ratio))
    return steps


def crossing(points: list[dict], target: float) -> dict | None:
    """Where held-out exact match first reaches `target`: {tokens, step, below} (`below`: the teacher tokens at the
    evaluation before, so the crossing lies in (below, tokens]); None if never."""
    for i, p in enumerate(points):
        if p["heldout_accuracy"] is not None and p["heldout_accuracy"] >= target:
            return {"tokens": p["teacher_tokens"], "step": p["step"],
                    "below": points[i - 1]["teacher_tokens"] if i else 0}
    return None


def read_points(run_dir: Path) -> list[dict]:
    """The eval points of a finished run with the teacher tokens spent by then."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens_at = {0: 0}
    for r in records:
        if r["kind"] == "train":
            tokens_at[r["step"]] = r["teacher_tokens_processed"]
    return [{"step": r["step"], "teacher_tokens": tokens_at.get(r["step"], 0), **{k: r.get(k) for k in POINT_KEYS}}
            for r in records if r["kind"] == "eval"]


def run_arm(args, length: str, method: str, lr: float, seed: int) -> list[dict]:
    """Train one arm (or read it back when its run finished before); its eval points."""
    from onpolicy.config import load_config
    from onpolicy.driver import train

    run_dir = Path(args.out) / length / f"{method}_lr{lr:g}_s{seed}"
    if not (run_dir / "summary.json").is_file():
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)  # an arm that stopped half-way runs again from the start
        overrides = [f"output_dir={run_dir}", f"seed={seed}", f"optim.lr={lr}", f"schedule.steps={args.steps}",
                     f"eval.at={geometric_steps(args.steps, args.ratio)}", "eval.every=0",
                     f"eval.num_prompts={args.eval_prompts}", "eval.ood_num_prompts=0", "eval.retention=[]",
                     "checkpoint.every=0", "schedule.max_wall_seconds=null", *args.model_overrides,
                     *METHODS[method][1], *args.overrides]
        overrides += length_overrides(length)
        t = time.time()
        print(f"[{length} {method} lr={lr:g} seed={seed}] training {args.steps} steps ...", flush=True)
        train(load_config(args.config, overrides), show_progress=False)
        print(f"[{length} {method} lr={lr:g} seed={seed}] {time.time() - t:.0f} s; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return read_points(run_dir)


def sweep_method(args, length: str, method: str, target: float) -> dict:
    """The lr sweep at the first seed, then the other seeds at the best lr."""
    lrs = args.sampled_lrs if method == "on_policy_sampled" else args.lrs
    first, *others = args.seeds
    sweep = {lr: run_arm(args, length, method, lr, first) for lr in lrs}

    def rank(lr: float):
        reach = crossing(sweep[lr], target)
        return (reach is None, reach["tokens"] if reach else 0, -max(p["heldout_accuracy"] for p in sweep[lr]))

    best = min(sweep, key=rank)
    seeds = {first: sweep[best], **{s: run_arm(args, length, method, best, s) for s in others}}
    return {"what": METHODS[method][0], "best_lr": best, "seeds": {str(s): pts for s, pts in seeds.items()},
            "crossings": {str(s): crossing(pts, target) for s, pts in seeds.items()},
            "sweep": {f"{lr:g}": {"crossing": crossing(pts, target), "best": max(p["heldout_accuracy"] for p in pts)}
                      for lr, pts in sweep.items()}}


def mean_tokens(result: dict) -> float | None:
    """Mean teacher tokens to the target over the seeds; None if a seed never reached it."""
    cs = list(result["crossings"].values())
    return None if any(c is None for c in cs) else sum(c["tokens"] for c in cs) / len(cs)


def length_overrides(length: str) -> list[str]:
    """The data overrides of one length of the sweep (`-`: none, the config's own data)."""
    if length == "-":
        return []
    from onpolicy.working.models import LENGTHS

    lo, hi = LENGTHS[length]
    return [f"data.min_digits={lo}", f"data.max_digits={hi}"]


def teacher_accuracy(args, length: str) -> tuple[float, float]:
    """(The teacher's greedy exact match on the arms' held-out prompts, their answers' mean length in tokens)."""
    from onpolicy.config import load_config
    from onpolicy.prompts import PromptSource

    extra = length_overrides(length)
    cfg = load_config(args.config, [f"eval.num_prompts={args.eval_prompts}", *args.model_overrides, *extra])
    if cfg.data.task == "addition":
        from onpolicy.toy.models import greedy_accuracy
    else:
        from onpolicy.working.models import greedy_accuracy
    heldout = PromptSource(cfg.data, cfg.eval, cfg.seed).heldout
    return greedy_accuracy(cfg.teacher.model, heldout), sum(len(e.answer) + 1 for e in heldout) / len(heldout)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "working.yaml"))
    ap.add_argument("--lengths", default="long", help="onpolicy.working.models.LENGTHS names (`-`: the config's own data)")
    ap.add_argument("--methods", default="on_policy,on_policy_fkl,on_policy_sampled,sft,soft_targets,gkd")
    ap.add_argument("--lrs", default="3e-4,1e-3")
    ap.add_argument("--sampled-lrs", default="1e-4,3e-4",
                    help="lrs for on_policy_sampled (a one-sample estimator wants smaller steps)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ratio", type=float, default=1.2, help="the geometric evaluation schedule's ratio")
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--models", default=None, help="folder with teacher/ and student/ (default: the config's; "
                    "built if it is the working task's default folder)")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--png", default=None, help="the length sweep's plot (with more than one length)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every arm, e.g. rollout.prompts_per_step=8")
    args = ap.parse_args(argv)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.sampled_lrs = [float(x) for x in args.sampled_lrs.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.model_overrides = [f"model.student={args.models}/student", f"teacher.model={args.models}/teacher"] \
        if args.models else []
    if args.models is None and "working" in Path(args.config).name:
        from onpolicy.working.build import build_working_models

        build_working_models(REPO / "working")
        args.model_overrides = [f"model.student={REPO / 'working' / 'student'}",
                                f"teacher.model={REPO / 'working' / 'teacher'}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths, results = args.lengths.split(","), {}
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for length in lengths:
        teacher, answer_tokens = teacher_accuracy(args, length)
        target = 0.9 * teacher
        results[length] = {"teacher_heldout_accuracy": teacher, "target": target, "answer_tokens": answer_tokens,
                           "methods": {m: sweep_method(args, length, m, target) for m in args.methods.split(",")}}
    summary = {"steps": args.steps, "seeds": args.seeds, "ratio": args.ratio, "lengths": results,
               "load_average_end": os.getloadavg()}
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    for length, res in results.items():
        print(f"\n== {length} ==\n{format_table(res)}")
        plot_curves(res, out / f"quality_{length}.png")
    if len(lengths) > 1:
        print("\n" + format_ratios(results))
        plot_ratios(results, Path(args.png) if args.png else out / "quality_vs_length.png")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return summary


def _m(tokens: float | None) -> str:
    return "not reached" if tokens is None else f"{tokens / 1e6:.3f}M"


def format_table(res: dict) -> str:
    head = ["method", "best lr", "teacher tokens to target (mean)", "per seed [bracket]", "best EM", "final EM",
            "final KL", "final KL p99"]
    rows = [head]
    for name, m in res["methods"].items():
        per_seed = []
        for seed, c in m["crossings"].items():
            per_seed.append(f"s{seed}: " + ("-" if c is None else f"{c['tokens'] / 1e6:.3f}M [{c['below'] / 1e6:.3f}, "
                                                                f"{c['tokens'] / 1e6:.3f}]"))
        finals = [pts[-1] for pts in m["seeds"].values()]
        best = max(p["heldout_accuracy"] for pts in m["seeds"].values() for p in pts)
        rows.append([name, f"{m['best_lr']:g}", _m(mean_tokens(m)), "; ".join(per_seed), f"{best:.3f}",
                     " / ".join(f"{f['heldout_accuracy']:.3f}" for f in finals),
                     " / ".join(f"{f['heldout_reverse_kl']:.3f}" for f in finals),
                     " / ".join("-" if f["heldout_token_kl_p99"] is None else f"{f['heldout_token_kl_p99']:.2f}"
                                for f in finals)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"teacher held-out EM {res['teacher_heldout_accuracy']:.3f}; target = 90% of it = {res['target']:.3f}")
    return "\n".join(lines)


def best_on_policy(res: dict) -> str | None:
    """The on-policy arm (`on_policy*`, the student sampling) that reached the target on the fewest teacher tokens;
    if none did, the first one run; None if none was run."""
    names = [n for n in res["methods"] if n.startswith("on_policy")]
    reached = [n for n in names if mean_tokens(res["methods"][n]) is not None]
    return min(reached, key=lambda n: mean_tokens(res["methods"][n])) if reached else (names[0] if names else None)


def ratio(res: dict, num: str = "sft", den: str | None = None) -> tuple[float | None, str]:
    """(num / den teacher tokens to the target, how it reads): a lower bound when only `den` got there. `den`:
    the best on-policy arm by default."""
    den = den or best_on_policy(res)
    a, b = mean_tokens(res["methods"][num]), mean_tokens(res["methods"][den])
    if b is None:
        return None, "on-policy did not reach the target"
    if a is None:
        most = max(p["teacher_tokens"] for pts in res["methods"][num]["seeds"].values() for p in pts)
        return most / b, f">= {most / b:.1f}x ({num} did not reach it within {most / 1e6:.3f}M tokens)"
    return a / b, f"{a / b:.1f}x"


def format_ratios(results: dict) -> str:
    lines = ["length  answer tokens (mean, with EOS)  sft tokens to target  best on-policy arm: tokens  sft / it"]
    for length, res in results.items():
        den = best_on_policy(res)
        if "sft" not in res["methods"] or den is None:
            continue
        _, text = ratio(res)
        lines.append(f"{length:7} {res['answer_tokens']:>30.1f}  {_m(mean_tokens(res['methods']['sft'])):>20}  "
                     f"{den + ': ' + _m(mean_tokens(res['methods'][den])):>26}  {text}")
    return "\n".join(lines)


def plot_curves(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_em, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, m) in enumerate(res["methods"].items()):
        for j, pts in enumerate(m["seeds"].values()):
            xs = [max(p["teacher_tokens"], 1) / 1e6 for p in pts]
            label = f"{name} (lr {m['best_lr']:g})" if j == 0 else None
            ax_em.plot(xs, [p["heldout_accuracy"] for p in pts], "-o" if j == 0 else "--", ms=2, color=f"C{i}",
                       label=label)
            ax_kl.plot(xs, [p["heldout_reverse_kl"] for p in pts], "-o" if j == 0 else "--", ms=2, color=f"C{i}",
                       label=label)
    ax_em.axhline(res["target"], ls=":", c="grey")
    ax_em.set(xlabel="teacher tokens processed (M)", ylabel="held-out exact match", ylim=(0, 1.02),
              title="Task accuracy vs teacher cost (solid: seed 0, dashed: seed 1)")
    ax_kl.set(xlabel="teacher tokens processed (M)", ylabel="held-out reverse KL (nats/token)", yscale="log",
              title="Reverse KL to the teacher vs teacher cost")
    for ax in (ax_em, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ratios(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in results if "sft" in results[n]["methods"] and best_on_policy(results[n])]
    labels = [f"{n}\n({results[n]['answer_tokens']:.0f} tokens)" for n in names]
    for label, pick, style in (("sft", lambda r: "sft", "-s"), ("best on-policy arm", best_on_policy, "-o")):
        ax_t.plot(labels, [(mean_tokens(results[n]["methods"][pick(results[n])]) or float("nan")) / 1e6
                           for n in names], style, label=label)
    ratios = [ratio(results[n]) for n in names]
    ax_r.bar(labels, [r if r is not None else 0 for r, _ in ratios], color="C2")
    for x, (r, text) in enumerate(ratios):
        ax_r.text(x, (r or 0) + 0.05, text.split(" (")[0], ha="center")
    ax_r.axhline(1.0, ls=":", c="grey")
    ax_r.set_ylim(0, 1.15 * max([1.0, *(r for r, _ in ratios if r is not None)]))  # room for the labels
    ax_t.set(xlabel="working written out", ylabel="teacher tokens to 90% of the teacher's EM (M)",
             title="Teacher tokens to the target")
    ax_r.set(xlabel="working written out", ylabel="sft / on-policy teacher tokens",
             title="How many times more teacher tokens sft needs")
    ax_t.grid(alpha=0.3)
    ax_t.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

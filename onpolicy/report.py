"""The demo's before/after report: `report.json`, a console table and a PNG plot.

Beside held-out exact match and reverse KL: the OOD split (a length the teacher learnt, the student not)
and the `unseen` split (a length neither learnt), the tail of the per-token reverse KL (p99, max, and at
the rare tokens the teacher gives < 1 %), and each `eval.retention` probe set, flagged when its exact match
fell by more than its `max_drop`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from onpolicy.metrics import read_metrics

OOD_SPLITS = ("ood", "unseen")
TAIL = ("token_kl_p99", "token_kl_max", "rare_kl", "rare_share")  # the tail statistics the report carries


def gap_closed(before: float, after: float, teacher: float) -> float:
    """Fraction of the teacher-student accuracy gap that distillation closed."""
    gap = teacher - before
    return (after - before) / gap if gap > 0 else float("nan")


def build_report(summary: dict[str, Any], teacher_acc: dict[str, float]) -> dict[str, Any]:
    b, a = summary["before"], summary["after"]
    rep: dict[str, Any] = {
        "teacher_accuracy": teacher_acc["heldout"],
        "student_accuracy_before": b["heldout_accuracy"],
        "student_accuracy_after": a["heldout_accuracy"],
        "heldout_reverse_kl_before": b["heldout_reverse_kl"],
        "heldout_reverse_kl_after": a["heldout_reverse_kl"],
    }
    for key in TAIL:
        if f"heldout_{key}" in b:
            rep[f"heldout_{key}_before"], rep[f"heldout_{key}_after"] = b[f"heldout_{key}"], a.get(f"heldout_{key}")
    for split in OOD_SPLITS:
        if f"{split}_accuracy" in b:
            rep.update({
                f"{split}_teacher_accuracy": teacher_acc.get(split),
                f"{split}_student_accuracy_before": b[f"{split}_accuracy"],
                f"{split}_student_accuracy_after": a[f"{split}_accuracy"],
                f"{split}_reverse_kl_before": b[f"{split}_reverse_kl"],
                f"{split}_reverse_kl_after": a[f"{split}_reverse_kl"],
            })
    rep["gap_closed"] = gap_closed(rep["student_accuracy_before"], rep["student_accuracy_after"],
                                   rep["teacher_accuracy"])
    kl_after = rep["heldout_reverse_kl_after"]
    rep["reverse_kl_reduction"] = rep["heldout_reverse_kl_before"] / kl_after if kl_after > 0 else float("inf")
    if "retention" in summary:
        rep["retention"] = summary["retention"]
        rep["retention_flagged"] = sorted(name for name, r in summary["retention"].items() if r["flagged"])
    rep["distill_wall_seconds"] = summary["distill_wall_seconds"]
    rep["eval_wall_seconds"] = summary["eval_wall_seconds"]
    rep["steps"] = summary["steps"]
    rep["student"] = summary["student"]
    return rep


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(rep: dict[str, Any]) -> str:
    rows = [("", "teacher", "student before", "student after")]
    rows.append(("held-out accuracy", f"{rep['teacher_accuracy']:.3f}", f"{rep['student_accuracy_before']:.3f}",
                 f"{rep['student_accuracy_after']:.3f}"))
    rows.append(("held-out reverse KL", "0", f"{rep['heldout_reverse_kl_before']:.4f}",
                 f"{rep['heldout_reverse_kl_after']:.4f}"))
    for key, label in (("token_kl_p99", "  per-token KL p99"), ("token_kl_max", "  per-token KL max"),
                       ("rare_kl", "  KL at rare tokens (p_T < 1%)")):
        if f"heldout_{key}_before" in rep:
            rows.append((label, "", _num(rep[f"heldout_{key}_before"]), _num(rep[f"heldout_{key}_after"])))
    for split, name in (("ood", "OOD"), ("unseen", "unseen (no model trained)")):
        if f"{split}_student_accuracy_before" in rep:
            rows.append((f"{name} accuracy", _num(rep[f"{split}_teacher_accuracy"], 3),
                         f"{rep[f'{split}_student_accuracy_before']:.3f}", f"{rep[f'{split}_student_accuracy_after']:.3f}"))
            rows.append((f"{name} reverse KL", "0", f"{rep[f'{split}_reverse_kl_before']:.4f}",
                         f"{rep[f'{split}_reverse_kl_after']:.4f}"))
    for name, r in rep.get("retention", {}).items():
        flag = "  DROPPED" if r["flagged"] else ""
        rows.append((f"retention {name} accuracy", "", f"{r['accuracy_before']:.3f}", f"{r['accuracy_after']:.3f}{flag}"))
        rows.append((f"retention {name} KL to start", "", "0", _num(r["reverse_kl_to_start_after"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"gap closed: {rep['gap_closed']:.2f}   reverse KL cut: {rep['reverse_kl_reduction']:.1f}x   "
                 f"steps: {rep['steps']}   distillation wall time: {rep['distill_wall_seconds']:.0f} s")
    for name in rep.get("retention_flagged", []):
        r = rep["retention"][name]
        lines.append(f"RETENTION: {name} exact match fell {r['drop']:.3f} ({r['accuracy_before']:.3f} -> "
                     f"{r['accuracy_after']:.3f}), beyond its max_drop {r['max_drop']:.3f}")
    return "\n".join(lines)


def plot_eval(metrics_path: str | Path, png_path: str | Path) -> None:
    """Four panels against step: mean reverse KL and exact match per split; the held-out per-token KL's tail
    (p50, p95, p99, max and the mean at rare tokens); the retention probe sets (exact match, KL to the start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = read_metrics(metrics_path, kind="eval")
    steps = [e["step"] for e in evals]

    def series(key: str) -> list[float]:
        return [float("nan") if e.get(key) is None else e[key] for e in evals]

    fig, ((ax_kl, ax_acc), (ax_tail, ax_keep)) = plt.subplots(2, 2, figsize=(11, 8))
    for split, style in (("heldout", "-o"), ("ood", "--s"), ("unseen", ":^")):
        if evals and f"{split}_reverse_kl" in evals[0]:
            ax_kl.plot(steps, series(f"{split}_reverse_kl"), style, ms=3, label=split)
            ax_acc.plot(steps, series(f"{split}_accuracy"), style, ms=3, label=split)
    for key, style in (("token_kl_p50", "-"), ("token_kl_p95", "-"), ("token_kl_p99", "-"), ("token_kl_max", "--"),
                       ("rare_kl", ":")):
        if evals and f"heldout_{key}" in evals[0]:
            label = "mean at rare tokens (p_T < 1%)" if key == "rare_kl" else key.removeprefix("token_kl_")
            ax_tail.plot(steps, series(f"heldout_{key}"), style + "o", ms=3, label=label)
    probes = sorted({k[len("retention_"):-len("_accuracy")] for e in evals[:1] for k in e
                     if k.startswith("retention_") and k.endswith("_accuracy")})
    ax_keep_kl = ax_keep.twinx() if probes else None
    for name in probes:
        ax_keep.plot(steps, series(f"retention_{name}_accuracy"), "-o", ms=3, label=f"{name}: exact match")
        ax_keep_kl.plot(steps, series(f"retention_{name}_reverse_kl"), "--s", ms=3, color="grey",
                        label=f"{name}: reverse KL to the start")
        ax_keep_kl.set_ylabel("reverse KL to the starting student (nats/token)")
        ax_keep_kl.legend(loc="lower right", fontsize=8)
    if not probes:
        ax_keep.text(0.5, 0.5, "no eval.retention probe sets", ha="center", va="center", transform=ax_keep.transAxes)
    ax_kl.set(xlabel="step", ylabel="reverse KL per token (nats)", title="Student vs teacher reverse KL")
    ax_acc.set(xlabel="step", ylabel="exact match", title="Task accuracy", ylim=(0, 1.02))
    ax_tail.set(xlabel="step", ylabel="per-token reverse KL (nats)", yscale="symlog",
                title="Held-out per-token KL: quantiles, and at rare tokens")
    ax_keep.set(xlabel="step", ylabel="exact match", title="Retention: skills the data does not train",
                ylim=(0, 1.02))
    for ax in (ax_kl, ax_acc, ax_tail, ax_keep):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right" if ax is not ax_keep else "lower left")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def write_report(rep: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "report.json"
    path.write_text(json.dumps(rep, indent=2))
    return path

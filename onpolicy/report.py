"""The demo's before/after report: `report.json`, a console table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onpolicy.metrics import read_metrics


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
    if "ood_accuracy" in b:
        rep.update(
            ood_teacher_accuracy=teacher_acc.get("ood"),
            ood_student_accuracy_before=b["ood_accuracy"],
            ood_student_accuracy_after=a["ood_accuracy"],
            ood_reverse_kl_before=b["ood_reverse_kl"],
            ood_reverse_kl_after=a["ood_reverse_kl"],
        )
    rep["gap_closed"] = gap_closed(rep["student_accuracy_before"], rep["student_accuracy_after"],
                                   rep["teacher_accuracy"])
    kl_after = rep["heldout_reverse_kl_after"]
    rep["reverse_kl_reduction"] = rep["heldout_reverse_kl_before"] / kl_after if kl_after > 0 else float("inf")
    rep["distill_wall_seconds"] = summary["distill_wall_seconds"]
    rep["eval_wall_seconds"] = summary["eval_wall_seconds"]
    rep["steps"] = summary["steps"]
    rep["student"] = summary["student"]
    return rep


def format_table(rep: dict[str, Any]) -> str:
    rows = [("", "teacher", "student before", "student after")]
    rows.append(("held-out accuracy", f"{rep['teacher_accuracy']:.3f}", f"{rep['student_accuracy_before']:.3f}",
                 f"{rep['student_accuracy_after']:.3f}"))
    rows.append(("held-out reverse KL", "0", f"{rep['heldout_reverse_kl_before']:.4f}",
                 f"{rep['heldout_reverse_kl_after']:.4f}"))
    if "ood_student_accuracy_before" in rep:
        rows.append(("OOD accuracy", f"{rep['ood_teacher_accuracy']:.3f}", f"{rep['ood_student_accuracy_before']:.3f}",
                     f"{rep['ood_student_accuracy_after']:.3f}"))
        rows.append(("OOD reverse KL", "0", f"{rep['ood_reverse_kl_before']:.4f}", f"{rep['ood_reverse_kl_after']:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"gap closed: {rep['gap_closed']:.2f}   reverse KL cut: {rep['reverse_kl_reduction']:.1f}x   "
                 f"steps: {rep['steps']}   distillation wall time: {rep['distill_wall_seconds']:.0f} s")
    return "\n".join(lines)


def plot_eval(metrics_path: str | Path, png_path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = read_metrics(metrics_path, kind="eval")
    steps = [e["step"] for e in evals]
    fig, (ax_kl, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("heldout", "-o"), ("ood", "--s")):
        key = f"{split}_reverse_kl"
        if evals and key in evals[0]:
            ax_kl.plot(steps, [e[key] for e in evals], style, label=split)
            ax_acc.plot(steps, [e[f"{split}_accuracy"] for e in evals], style, label=split)
    ax_kl.set(xlabel="step", ylabel="reverse KL per token (nats)", title="Student vs teacher reverse KL")
    ax_acc.set(xlabel="step", ylabel="exact match", title="Task accuracy", ylim=(0, 1.02))
    for ax in (ax_kl, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def write_report(rep: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "report.json"
    path.write_text(json.dumps(rep, indent=2))
    return path

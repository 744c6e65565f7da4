"""Students made from the toy teacher vs the shipped student of the same size, distilled on-policy side by side.

    .venv/bin/python bench/students.py [--steps 600] [--eval-every 100] [--arms depth,width,shipped]
        [--hidden both|off|on] [--out runs/students]

Cuts two students from the toy teacher (4 layers, hidden 256, 4 heads, MLP 512) with `onpolicy student init`:
`depth` keeps layers 0 and 2 (DistilBERT's every other layer; 2 layers, the shipped student's shape) and
`width` keeps all 4 layers with 2 of 4 heads and 256 of 512 MLP channels (Minitron's importance; the same
parameter count as the shipped student, 1.32M). Each arm is one `onpolicy train` of configs/toy.yaml (the
demo's config: exact top-16 reverse KL on the student's samples) with `--steps` (the demo's budget is 600 steps
or 14 minutes, whichever comes first), with and without `loss.hidden` (cosine, weight 1, student layer i ->
the teacher layer it was cut from). Prints held-out exact match and reverse KL at step 0 and at the end, the
machine's load average, and writes `<out>/students.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "onpolicy/toy/assets/teacher"
SHIPPED = REPO / "onpolicy/toy/assets/student"
CUTS = {  # arm: (student init arguments, student layer -> teacher layer for loss.hidden)
    "depth": ({"layers": "every-other"}, {0: 0, 1: 2}),
    "width": ({"heads": 2, "mlp": 256}, {i: i for i in range(4)}),
    "shipped": (None, {0: 1, 1: 3}),  # trained from scratch; its layers mapped as DistilBERT's would be
}


def student_dir(arm: str, out: Path) -> Path:
    from onpolicy.prune.student_init import init_student

    args, _ = CUTS[arm]
    if args is None:
        return SHIPPED
    path = out / "students" / arm
    if not (path / "build.json").is_file():
        init_student(TEACHER, path, config=str(REPO / "configs/toy.yaml"), **args)
    return path


def run_arm(arm: str, hidden: bool, steps: int, eval_every: int, out: Path) -> dict:
    from onpolicy.config import load_config
    from onpolicy.driver import train

    run = out / f"{arm}{'_hidden' if hidden else ''}"
    if (run / "summary.json").is_file():
        return json.loads((run / "summary.json").read_text())
    layers = CUTS[arm][1]
    overrides = [f"model.student={student_dir(arm, out)}", f"teacher.model={TEACHER}", f"output_dir={run}",
                 f"schedule.steps={steps}", f"eval.every={eval_every}", f"checkpoint.every={steps}"]
    if hidden:
        pairs = ", ".join(f"{s}: {t}" for s, t in layers.items())
        overrides.append(f"loss.hidden={{weight: 1.0, kind: cosine, layers: {{{pairs}}}}}")
    t0 = time.perf_counter()
    summary = train(load_config(str(REPO / "configs/toy.yaml"), overrides))
    row = {"arm": arm, "hidden": hidden, "steps": summary["steps"], "before": summary["before"],
           "after": summary["after"], "wall_seconds": round(time.perf_counter() - t0, 1)}
    (run / "summary.json").write_text(json.dumps(row, indent=2))
    return row


def fmt(ev: dict) -> str:
    return f"{ev['heldout_accuracy']:.3f} / {ev['heldout_reverse_kl']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--arms", default="depth,width,shipped")
    ap.add_argument("--hidden", choices=("both", "off", "on"), default="both")
    ap.add_argument("--out", default="runs/students")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hidden = {"both": [False, True], "off": [False], "on": [True]}[args.hidden]
    rows = [run_arm(arm, h, args.steps, args.eval_every, out) for arm in args.arms.split(",") for h in hidden]
    print(f"load average {os.getloadavg()}; {os.cpu_count()} CPUs; configs/toy.yaml, {args.steps} steps")
    print("| student | loss.hidden | steps | step 0: exact match / reverse KL | end: exact match / reverse KL | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {'cosine' if r['hidden'] else '-'} | {r['steps']} | {fmt(r['before'])} | "
              f"{fmt(r['after'])} | {r['wall_seconds']} |")
    (out / "students.json").write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

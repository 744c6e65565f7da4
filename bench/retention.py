"""The skill the working task's demo forgets, and its cure, side by side: `configs/working.yaml` (every prompt an
addition, scored by the teacher) and `configs/working-keep.yaml` (the same run with a quarter of the prompts
subtractions scored by `self`, the frozen starting student), at each seed, one after the other on this machine.

    .venv/bin/python bench/retention.py [--seeds 0,1] [--out runs/retention] [--models working]

Both runs watch the second skill with the same retention probe (128 subtractions on 1-3 digit operands,
`eval.retention`: greedy exact match, and k3 reverse KL to the starting student). For each run: steps,
distillation seconds, teacher tokens processed (the `self` share's included), held-out exact match on the
distillation task (5-6 digit additions) before -> after and the share of the gap to the teacher closed, the
probe's exact match before -> after, its reverse KL to the start, and whether `eval.retention` flagged it.

Writes `<out>/retention.json`; a run whose folder has a summary.json is read back, not run again.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = {"addition only": "configs/working.yaml", "with `self` (a quarter subtractions)": "configs/working-keep.yaml"}
PROBE = "subtraction"  # the retention probe both configs declare


def main_accuracy(evaluation: dict) -> float:
    """Held-out exact match on the distillation task: the whole held-out set, or the `main` source's of a mixture."""
    return evaluation.get("source_main_heldout_accuracy", evaluation["heldout_accuracy"])


def row_result(row: str, seed: int, run_dir: Path, teacher: float) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if r["kind"] == "train"][-1]
    before, after = main_accuracy(summary["before"]), main_accuracy(summary["after"])
    kept = summary["retention"][PROBE]
    return {"row": row, "seed": seed, "teacher": teacher, "steps": summary["steps"],
            "distill_seconds": summary["distill_wall_seconds"], "teacher_tokens": last["teacher_tokens_processed"],
            "before": before, "after": after,
            "gap_closed": (after - before) / (teacher - before) if teacher > before else None,
            "kept_before": kept["accuracy_before"], "kept_after": kept["accuracy_after"],
            "kept_kl_to_start": kept["reverse_kl_to_start_after"], "flagged": kept["flagged"]}


def render(rows: list[dict]) -> str:
    head = ("| run | seed | steps | distill s | teacher tokens | addition (5-6 digits): before -> after | teacher "
            "| gap closed | subtraction probe: before -> after | KL to the start | flagged |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        gap = "" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        lines.append(f"| {r['row']} | {r['seed']} | {r['steps']} | {r['distill_seconds']:.0f} | "
                     f"{r['teacher_tokens']:,} | {r['before']:.3f} -> {r['after']:.3f} | {r['teacher']:.3f} | {gap} | "
                     f"{r['kept_before']:.3f} -> **{r['kept_after']:.3f}** | {r['kept_kl_to_start']:.3f} | "
                     f"{'yes' if r['flagged'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1", help="comma-separated run seeds")
    p.add_argument("--out", default="runs/retention", help="one folder per run, and retention.json")
    p.add_argument("--models", default="working", help="the working task's models (built here if missing)")
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from onpolicy.config import load_config
    from onpolicy.driver import train
    from onpolicy.prompts import PromptSource
    from onpolicy.working.build import build_working_models
    from onpolicy.working.models import greedy_accuracy

    models, out = Path(args.models), Path(args.out)
    build_working_models(str(models))
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        teacher = None
        for row, config in ROWS.items():
            run_dir = out / f"{Path(config).stem}-s{seed}"
            cfg = load_config(REPO / config, [f"seed={seed}", f"output_dir={run_dir}",
                                              f"model.student={models / 'student'}"])
            for t in cfg.teacher_list():
                if t.kind == "local":
                    t.model = str(models / "teacher")
            if teacher is None:  # the teacher's greedy exact match on this seed's held-out prompts
                teacher = greedy_accuracy(str(models / "teacher"), PromptSource(cfg.data, cfg.eval, cfg.seed).heldout)
            if not (run_dir / "summary.json").is_file():
                train(cfg, show_progress=False)
            rows.append(row_result(row, seed, run_dir, teacher))
            print(f"[{row}, seed {seed}] done", flush=True)
    (out / "retention.json").write_text(json.dumps(rows, indent=2))
    print(render(rows))


if __name__ == "__main__":
    main()

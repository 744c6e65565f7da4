"""onpolicy's side of `bench/vs_trl.py`, one fresh process (and Ray instance) per call.

    python bench/vs_trl_onpolicy.py SPEC.json

SPEC: {"mode": "train" | "eval", "overrides": [key=value, ...], "result": path,
       "students": [dir, ...] (eval only), "warmup": 2 (train only)}.

train: `onpolicy.driver.train` on the config the overrides make; the result holds the summary
(held-out before/after), every kind=train metrics record, and the steady-state numbers.
eval: `onpolicy.eval_student.eval_student` on each student folder, in one Ray instance, so
a student trained elsewhere (TRL, the compute floor) is measured exactly as onpolicy's own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def steady_state(records: list[dict], warmup: int) -> dict:
    """Steady-state numbers from kind=train records, leaving out the first `warmup` steps.

    Two timings: `interval_seconds`, the wall time from the end of step `warmup` to the end of the
    last step (what the other systems measure, and right even where stages overlap), and
    `step_seconds_sum`, the sum of the driver's own per-step `step_seconds` over the same steps."""
    kept = records[warmup:]
    if not kept:
        raise ValueError(f"{len(records)} steps recorded, none left after {warmup} warm-up steps: raise --steps")
    start = records[warmup - 1]["time"] if warmup > 0 else None
    interval = kept[-1]["time"] - start if start is not None else None
    return {
        "steps": len(kept),
        "sequences": sum(r["sequences"] for r in kept),
        "sampled_tokens": sum(r["sampled_tokens"] for r in kept),
        "interval_seconds": interval,
        "step_seconds_sum": sum(r["step_seconds"] for r in kept),
        "phase_seconds": {k: sum(r.get(f"{k}_seconds", 0.0) for r in kept) for k in ("rollout", "score", "learn", "push")},
        "window_epochs": [start, kept[-1]["time"]],
    }


def run_train(spec: dict) -> dict:
    from onpolicy.config import load_config
    from onpolicy.driver import train
    from onpolicy.metrics import read_metrics

    cfg = load_config(None, spec["overrides"])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    summary = train(cfg, show_progress=False)
    train_wall = time.perf_counter() - t
    records = read_metrics(Path(cfg.output_dir) / "metrics.jsonl", kind="train")
    # The startup record is written as the first step begins (after the first held-out eval).
    startup = read_metrics(Path(cfg.output_dir) / "metrics.jsonl", kind="startup")[0]
    return {"summary": summary, "train_call_seconds": train_wall, "records": records,
            "first_step_started_at": startup["time"],
            "steady": steady_state(records, spec.get("warmup", 2)), "config": cfg.model_dump(mode="json")}


def run_eval(spec: dict) -> dict:
    from onpolicy.config import load_config
    from onpolicy.eval_student import eval_student

    cfg = load_config(None, spec["overrides"])
    out = {}
    for student in spec["students"]:
        t = time.perf_counter()
        out[student] = eval_student(cfg, student)
        print(f"eval {student}: {out[student]} ({time.perf_counter() - t:.1f} s)", flush=True)
    return {"evals": out}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = run_train(spec) if spec["mode"] == "train" else run_eval(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

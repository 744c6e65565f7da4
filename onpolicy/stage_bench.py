"""`onpolicy bench`: where a step's time goes.

Runs a few steps of the toy config (no eval, no checkpoints) and prints, per stage, how long the
driver waited on it (`wait s/step`), how long the stage itself worked (`busy s/step`: engine time,
teacher calls, learner compute), the throughput in sampled completion tokens per second of busy
time, and the overlap achieved (busy seconds of all stages / wall time: about 1 or below when the
stages run one after the other, up to the number of stages when they all run at once). The first
`warmup` steps are left out (engine warm-up, first allocations, the pipeline filling).
"""

from __future__ import annotations

import json
import statistics
import tempfile

from onpolicy.config import load_config
from onpolicy.driver import Run
from onpolicy.step_stats import STAGES


def summarise(records: list[dict]) -> dict[str, dict[str, float]]:
    n = len(records)
    total = sum(r["step_seconds"] for r in records)
    tokens = sum(r["sampled_tokens"] for r in records)
    out: dict[str, dict[str, float]] = {}
    for name in STAGES:
        wait = sum(r[f"{name}_seconds"] for r in records)
        busy = sum(r.get(f"{name}_busy_seconds", r[f"{name}_seconds"]) for r in records)
        out[name] = {"wait_seconds_per_step": wait / n, "busy_seconds_per_step": busy / n,
                     "tokens_per_second": tokens / busy if busy else 0.0, "share": wait / total}
    out["step"] = {"seconds_per_step": total / n, "tokens_per_second": tokens / total,
                   "sequences_per_second": sum(r.get("sequences", 0) for r in records) / total,
                   "tokens_per_step": statistics.mean(r["sampled_tokens"] for r in records),
                   "overlap": sum(out[s]["busy_seconds_per_step"] for s in STAGES) * n / total}
    return out


def format_bench(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'stage':<8} {'wait s/step':>11} {'busy s/step':>11} {'tokens/s busy':>13}"]
    for name in STAGES:
        s = summary[name]
        lines.append(f"{name:<8} {s['wait_seconds_per_step']:>11.3f} {s['busy_seconds_per_step']:>11.3f} "
                     f"{s['tokens_per_second']:>13.0f}")
    st = summary["step"]
    lines.append(f"{'step':<8} {st['seconds_per_step']:>11.3f} s/step, {st['tokens_per_second']:.0f} tokens/s, "
                 f"{st['sequences_per_second']:.1f} sequences/s, overlap {st['overlap']:.2f}")
    return "\n".join(lines)


def run_bench(config: str | None, overrides: list[str], steps: int = 20, toy_dir: str = "toy",
              warmup: int = 3) -> dict:
    from onpolicy.toy.build import build_toy_models

    build_toy_models(toy_dir)
    out = tempfile.mkdtemp(prefix="onpolicy-bench-")
    cfg = load_config(config, [f"model.student={toy_dir}/student", f"teacher.model={toy_dir}/teacher",
                               f"output_dir={out}", f"schedule.steps={steps + warmup}", *overrides])
    run = Run(cfg, show_progress=False)
    try:
        records = [run.train_step() for _ in range(steps + warmup)][warmup:]
    finally:
        run.close()
    summary = summarise(records)
    print(f"onpolicy bench: {steps} steps of {cfg.rollout.prompts_per_step} prompts x "
          f"{cfg.rollout.samples_per_prompt} samples, {cfg.rollout.num_workers} worker(s), loss={cfg.loss.kind}, "
          f"teacher={cfg.teacher.kind}{'/' + getattr(cfg.teacher, 'backend', '') if hasattr(cfg.teacher, 'backend') else ''}, "
          f"max_staleness={cfg.schedule.max_staleness}")
    print(format_bench(summary))
    print(json.dumps(summary))
    return summary

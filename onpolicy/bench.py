"""`onpolicy bench`: where a step's time goes.

Runs a few strictly on-policy steps of the toy config (no eval, no checkpoints) and prints,
per stage, the seconds, the throughput in sampled completion tokens per second and the share
of step time. The first `warmup` steps are left out (engine warm-up, first allocations).
"""

from __future__ import annotations

import json
import statistics
import tempfile

from onpolicy.config import load_config
from onpolicy.driver import STAGES, Run


def summarise(records: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    total = sum(r["step_seconds"] for r in records)
    tokens = sum(r["sampled_tokens"] for r in records)
    for name in STAGES:
        secs = sum(r[f"{name}_seconds"] for r in records)
        out[name] = {"seconds_per_step": secs / len(records), "tokens_per_second": tokens / secs if secs else 0.0,
                     "share": secs / total}
    out["step"] = {"seconds_per_step": total / len(records), "tokens_per_second": tokens / total, "share": 1.0,
                   "tokens_per_step": statistics.mean(r["sampled_tokens"] for r in records)}
    return out


def format_bench(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'stage':<8} {'s/step':>8} {'tokens/s':>10} {'share':>7}"]
    for name in (*STAGES, "step"):
        s = summary[name]
        lines.append(f"{name:<8} {s['seconds_per_step']:>8.3f} {s['tokens_per_second']:>10.0f} {s['share']:>7.1%}")
    return "\n".join(lines)


def run_bench(config: str | None, overrides: list[str], steps: int = 20, toy_dir: str = "toy",
              warmup: int = 2) -> dict:
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
          f"{cfg.rollout.samples_per_prompt} samples, {cfg.rollout.num_workers} worker(s), loss={cfg.loss.kind}")
    print(format_bench(summary))
    print(json.dumps(summary))
    return summary

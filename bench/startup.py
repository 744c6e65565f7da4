"""Where onpolicy's start-up goes on the mid pair, per phase, and before/after a change, in one invocation.

    .venv/bin/python bench/startup.py [--trees after=.,before=/path/to/other/checkout] [--repeats 2]
                                      [--length 64] [--batch 32] [--heldout 32] [--out runs/startup]

Each run is a fresh process (`python -c` running `onpolicy.driver.train` for one step) on the mid pair of
`bench/vs_trl.py` (6M/45M Qwen2, local vLLM teacher, one rollout worker, schedule.max_staleness=0), with
`onpolicy` imported from the tree named (PYTHONPATH), so two checkouts are compared on the same machine,
models, prompts and settings; the trees take turns (A B A B ...), so a change in the machine's load hits both.

Per phase (the `startup` record every run writes to metrics.jsonl): preflight (folders, tokenizer, prompts,
lengths), ray (joining or starting Ray), engines (teacher, learner and rollout engines started together), first
eval (the held-out evaluation before step 1); plus `process` (the interpreter's start to the first step:
imports and everything above) and the CPU seconds the whole process tree (driver, Ray, actors) spent by the
first step, sampled every 0.25 s: on a shared machine wall seconds follow the load, CPU seconds much less.
Prints the median of each over the repeats, the load average at each run's start, and writes
`<out>/startup.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl_assets import REPO, prepare_pair

PHASES = ("preflight_seconds", "ray_seconds", "engines_seconds", "first_eval_seconds")
CHILD = """
import json, sys, time
from onpolicy.config import load_config
from onpolicy.driver import train
cfg = load_config(None, json.loads(sys.argv[1]))
summary = train(cfg, show_progress=False)
print("STARTUP " + json.dumps(summary["startup"]), flush=True)
"""


def process_role(p) -> str:
    """A short name for a process of the tree: the driver, a Ray actor by class (`ray::Class`), Ray's own."""
    cmd = " ".join(p.cmdline())
    if cmd.startswith("ray::"):
        return cmd.split()[0].split(".")[0]
    if "default_worker.py" in cmd:
        return "ray worker (idle)"
    if "gcs_server" in cmd or "raylet" in cmd or "ray/" in cmd or "ray." in cmd:
        return "ray services"
    return "driver" if "onpolicy.driver" in cmd else p.name()


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of `pid` and every live descendant, by role."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out: dict[str, float] = {}
    for p in procs:
        try:
            t = p.cpu_times()
            role = "driver" if p.pid == pid else process_role(p)
            out[role] = out.get(role, 0.0) + t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def run_once(tree: Path, overrides: list[str], out_dir: Path, log: Path) -> dict:
    """One fresh training process on `tree`; its start-up phases, wall to the first step and tree CPU by then."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray instance
    env.update(PYTHONPATH=str(tree), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               VLLM_LOGGING_LEVEL="WARNING")
    metrics = out_dir / "metrics.jsonl"
    samples: list[tuple[float, dict[str, float]]] = []  # (epoch, CPU seconds by role)
    spawned = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps([*overrides, f"output_dir={out_dir}"])],
                                stdout=f, stderr=subprocess.STDOUT, cwd=tree, env=env, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append((time.time(), tree_cpu(proc.pid)))
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"run on {tree} failed (exit {rc}); last lines of {log}:\n{tail}")
    startup = next(json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "startup"' in line)
    first_step = startup["time"]
    by_role = max((c for t, c in samples if t <= first_step), key=lambda c: sum(c.values()), default={})
    phases = {k: startup[k] for k in PHASES if k in startup}
    return {**phases, "process_seconds": first_step - spawned, "tree_cpu_seconds": sum(by_role.values()),
            "cpu_by_process": by_role}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default="this=.", help="label=DIR,... : onpolicy checkouts to compare (default: this one)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--length", type=int, default=64, help="rollout.max_new_tokens")
    ap.add_argument("--batch", type=int, default=32, help="rollout.prompts_per_step")
    ap.add_argument("--heldout", type=int, default=32, help="eval.num_prompts (the first eval's size)")
    ap.add_argument("--out", default="runs/startup")
    args = ap.parse_args()
    trees = {k: Path(v).resolve() for k, v in (item.split("=", 1) for item in args.trees.split(","))}
    pair, _ = prepare_pair("mid", REPO / "bench" / ".cache", 1, log=print, max_new_tokens=args.length,
                           prompts_per_step=args.batch)
    overrides = [
        f"model.student={pair.student}", f"teacher.model={pair.teacher}", "teacher.kind=local", "data.task=jsonl",
        f"data.prompts_path={pair.prompts_path}", f"rollout.prompts_per_step={pair.prompts_per_step}",
        f"rollout.max_new_tokens={pair.max_new_tokens}", "rollout.num_workers=1", "schedule.steps=1",
        "schedule.max_staleness=0", "eval.every=0", f"eval.num_prompts={args.heldout}", "eval.ood_num_prompts=0",
        "checkpoint.every=0", "optim.warmup_steps=0",
    ]
    out = Path(args.out).resolve()  # each run's cwd is its tree: a relative folder would land in the other tree
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for i in range(args.repeats):
        for label, tree in trees.items():
            load = os.getloadavg()[0]
            r = run_once(tree, overrides, out / f"{label}_{i}", out / f"{label}_{i}.log")
            r["load_average_before"] = load
            runs[label].append(r)
            print(f"[{label} {i + 1}/{args.repeats}] " + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}"
                                                                   for k, v in r.items() if isinstance(v, float)),
                  flush=True)
            print("    CPU s by process: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(
                r["cpu_by_process"].items(), key=lambda kv: -kv[1])), flush=True)
    keys = [*PHASES, "process_seconds", "tree_cpu_seconds", "load_average_before"]
    print(f"\nmedian of {args.repeats} runs (seconds; load = 1-minute load average at the run's start, "
          f"{os.cpu_count()} cores); mid pair, {args.batch} prompts x {args.length} tokens, first eval "
          f"{args.heldout} prompts")
    print(f"{'tree':<10} " + " ".join(f"{k.removesuffix('_seconds').removesuffix('_before'):>14}" for k in keys))
    for label, rs in runs.items():
        print(f"{label:<10} " + " ".join(f"{statistics.median(r[k] for r in rs):>14.1f}" for k in keys))
    (out / "startup.json").write_text(json.dumps({"command": sys.argv, "trees": {k: str(v) for k, v in trees.items()},
                                                  "overrides": overrides, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

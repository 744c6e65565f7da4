"""The tables and the figure of `bench/vs_trl.py`, from its results (`runs/bench/vs_trl.json`).

    .venv/bin/python bench/vs_trl_report.py [runs/bench/vs_trl.json] [--plot docs/speed_vs_length.png]

reprints the tables of a finished invocation and redraws its figure; vs_trl.py calls the same functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {"trl": "TRL Distillation", "trl_vllm": "TRL Dist. + vLLM", "gkd": "TRL GKD (legacy)",
          "sync": "onpolicy sync", "async": "onpolicy async", "floor": "compute floor"}
ORDER = tuple(LABELS)


def _ok(r: dict | None) -> bool:
    return bool(r) and "sequences_per_second" in r


def format_case(res: dict) -> str:
    """One case (pair x length): a row per system."""
    rows = res["systems"]
    trl = rows.get("trl", {}).get("sequences_per_second")
    title = (f"-- {res['pair']['name']}, <= {res['pair']['max_new_tokens']} new tokens: {res['steps']} steps "
             f"({res['warmup_steps_left_out']} warm-up left out), {res['pair']['prompts_per_step']} prompts/step, "
             f"lr {res['lr']:g}")
    head = (f"{'system':<18} {'seq/s':>7} {'tokens/s':>9} {'x TRL':>6} {'s/step':>8} {'CPU s/step':>10} {'tok/seq':>7} "
            f"{'start-up s':>10} {'process s':>9} {'load':>5}  held-out reverse KL before -> after")
    lines = [title, head]
    for system in ORDER:
        r = rows.get(system)
        if r is None:
            continue
        if not _ok(r):
            why = r.get("unavailable") or (r.get("error", "").splitlines() or ["FAILED"])[-1][:110]
            lines.append(f"{LABELS[system]:<18} {why}")
            continue
        kl = r.get("heldout_reverse_kl")
        kl_text = f"{kl[0]:.4f} -> {kl[1]:.4f}" if kl else "n/a"
        ratio = f"{r['sequences_per_second'] / trl:.2f}" if trl else "n/a"
        cpu = r.get("cpu_seconds_per_step")
        lines.append(f"{LABELS[system]:<18} {r['sequences_per_second']:>7.2f} {r['tokens_per_second']:>9.0f} {ratio:>6} "
                     f"{r['seconds_per_step']:>8.3f} {'n/a' if cpu is None else format(cpu, '.1f'):>10} "
                     f"{r['tokens_per_sequence']:>7.1f} {r['startup_seconds']:>10.1f} "
                     f"{r['process_seconds']:>9.1f} {r['load_average_before']:>5.1f}  {kl_text}")
    floor = rows.get("floor", {}).get("seconds_per_step")
    for system in ("sync", "async"):
        s = rows.get(system, {}).get("seconds_per_step")
        if floor and s:
            lines.append(f"{LABELS[system]} step time = {s / floor:.2f} x the compute floor's")
    for system in ("sync", "async"):
        st = rows.get(system, {}).get("startup")
        if st:
            lines.append(f"{LABELS[system]} start-up: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f} s"
                                                                   for k, v in st.items()))
    return "\n".join(lines)


def sweep_rows(report: dict) -> list[dict]:
    """Per case: TRL's seq/s and every other system's ratio to it; onpolicy's best mode; the floor's ratio."""
    out = []
    for res in report["cases"].values():
        rows = res["systems"]
        trl = rows.get("trl", {}).get("sequences_per_second") if _ok(rows.get("trl")) else None
        row = {"pair": res["pair"]["name"], "length": res["pair"]["max_new_tokens"],
               "batch": res["pair"]["prompts_per_step"], "steps": res["steps"], "trl_seq_s": trl}
        trl_cpu = rows.get("trl", {}).get("cpu_seconds_per_step")
        for system in ORDER:
            r = rows.get(system)
            row[system] = (r["sequences_per_second"] / trl) if (trl and _ok(r)) else None
            row[f"{system}_startup"] = r.get("startup_seconds") if _ok(r) else None
            cpu = r.get("cpu_seconds_per_step") if _ok(r) else None
            row[f"{system}_cpu"] = cpu / trl_cpu if (cpu and trl_cpu) else None
        best = [s for s in ("sync", "async") if row[s] is not None]
        row["best"] = max(best, key=lambda s: row[s]) if best else None
        floor_step = rows.get("floor", {}).get("seconds_per_step")
        if floor_step and row["best"]:
            row["best_over_floor_step"] = rows[row["best"]]["seconds_per_step"] / floor_step
        out.append(row)
    return out


def format_sweep(report: dict) -> str:
    def f(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    head = (f"{'length':>6} {'batch':>5} {'TRL seq/s':>9} {'GKD x':>6} {'sync x':>6} {'async x':>7} {'floor x':>7} "
            f"{'best':>6} {'best/floor step':>15} {'start-up s TRL / sync / async':>30} "
            f"{'CPU s/step over TRL: sync / async / floor':>42}")
    lines = [head]
    for r in sweep_rows(report):
        startups = " / ".join(f(r[f"{s}_startup"], ".0f") for s in ("trl", "sync", "async"))
        cpus = " / ".join(f(r[f"{s}_cpu"]) for s in ("sync", "async", "floor"))
        lines.append(f"{r['length']:>6} {r['batch']:>5} {f(r['trl_seq_s']):>9} {f(r['gkd']):>6} {f(r['sync']):>6} "
                     f"{f(r['async']):>7} {f(r['floor']):>7} {r['best'] or 'n/a':>6} "
                     f"{f(r.get('best_over_floor_step')):>15} {startups:>30} {cpus:>42}")
    return "\n".join(lines)


COLORS = {"trl": "tab:blue", "trl_vllm": "tab:cyan", "gkd": "tab:orange", "sync": "tab:green", "async": "tab:red",
          "floor": "tab:purple"}


def plot(report: dict, path: Path) -> None:
    """Against completion length, per system: sampled tokens/s; sequences/s over TRL's; CPU seconds per step over
    TRL's (the load-robust one on a shared machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"].values() if c["pair"]["name"] == "mid"] or list(report["cases"].values())
    trl = {c["pair"]["max_new_tokens"]: c["systems"]["trl"] for c in cases if _ok(c["systems"].get("trl"))}
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 4.2))
    for system in ORDER:
        pts = [(c["pair"]["max_new_tokens"], c["systems"][system]) for c in cases if _ok(c["systems"].get(system))]
        if not pts:
            continue
        style = {"marker": "o", "color": COLORS[system], "label": LABELS[system]}
        ax.plot([x for x, _ in pts], [r["tokens_per_second"] for _, r in pts], **style)
        rat = [(x, r["sequences_per_second"] / trl[x]["sequences_per_second"]) for x, r in pts if x in trl]
        cpu = [(x, r["cpu_seconds_per_step"] / trl[x]["cpu_seconds_per_step"]) for x, r in pts
               if x in trl and r.get("cpu_seconds_per_step") and trl[x].get("cpu_seconds_per_step")]
        for a, series in ((bx, rat), (cx, cpu)):
            if series and system != "trl":
                a.plot([x for x, _ in series], [y for _, y in series], **style)
    for a in (ax, bx, cx):
        a.set_xscale("log", base=2)
        a.set_xlabel("completion length (tokens)")
        a.grid(alpha=0.3)
    ax.set_ylabel("sampled tokens/s (steady state)")
    ax.set_title("Speed against completion length")
    bx.axhline(1.0, color="grey", lw=1)
    bx.set_ylabel("sequences/s over TRL DistillationTrainer's")
    bx.set_title("Wall-clock ratio to TRL (same invocation)")
    cx.axhline(1.0, color="grey", lw=1)
    cx.set_ylabel("CPU s per step over TRL's (lower: less work)")
    cx.set_title("CPU per step over TRL's")
    ax.legend(fontsize=8)
    start, end = report.get("load_average_at_start", [0])[0], report.get("load_average_at_end", [None])[0]
    fig.suptitle(f"mid pair (6M/45M Qwen2), {report.get('cpu_count')} cores, load average {start:.1f} at start"
                 + (f", {end:.1f} at end" if end is not None else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", default="runs/bench/vs_trl.json")
    ap.add_argument("--plot", default=None, help="write the figure here too")
    args = ap.parse_args()
    report = json.loads(Path(args.results).read_text())
    for res in report["cases"].values():
        print(format_case(res) + "\n")
    print(format_sweep(report))
    if args.plot:
        plot(report, Path(args.plot))


if __name__ == "__main__":
    main()

"""Any teacher, measured side by side on the toy task: the same-tokenizer demo, the same loss the cross-tokenizer
row uses (sampled reverse KL), cross-tokenizer span-aligned distillation from the byte-level BPE teacher, a
black-box teacher (a real vLLM OpenAI server over the toy teacher, asked through /v1/chat/completions for text
only: sequence-level KD) and a two-teacher mixture (the toy teacher for 3-digit sums, `self` for 1-2 digit ones).

    .venv/bin/python bench/teachers.py [--rows same,same_sampled,cross,blackbox,two,two_noself] [--toy-dir toy]
        [--out runs/teachers] [--steps N] [--wall S] [--seed N]

Every row is one run of its shipped config (configs/toy.yaml, toy-bpe-teacher.yaml, toy-blackbox.yaml,
toy-two-teachers.yaml) in this process, one after the other on the same machine, with the demo's budget of
14 minutes of distillation (`schedule.max_wall_seconds=840`). For each: held-out exact match before and after,
its teacher's own (greedy, transformers, the same 256 prompts), the share of the gap closed
((after - before) / (teacher - before)), steps, distillation seconds, teacher tokens processed, and for the
cross-tokenizer row the alignment coverage (share of student tokens inside exact spans). The two-teacher row
gives each source's exact match, and with `two_noself` (the same run without the `self` share) the kept skill's:
a retention probe of 1-2 digit sums in both. The load average is printed with the table (the machine is shared).

Writes `<out>/teachers.json`; a row whose run finished is read back, not run again (delete its folder to redo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The kept skill (1-2 digit sums) measured the same way in both two-teacher rows: a retention probe set, exact
# match and reverse KL to the starting student at every evaluation (issue 28's `eval.retention`).
KEEP_PROBE = ("eval.retention=[{name: keep, num_prompts: 128, data: {task: addition, min_digits: 1, max_digits: 2, "
              "ood_digits: 4}}]")
MAIN_ONLY = ["teachers=[{name: toy, kind: local, model: toy/teacher, backend: hf}]",
             ("data.sources=[{name: main, weight: 1, teacher: toy, data: {task: addition, min_digits: 3, "
              "max_digits: 3, ood_digits: 4}}]")]
ROWS = {
    # name: (what it is, config, overrides)
    "same": ("same tokenizer, exact reverse KL (the demo: topk_reverse_kl)", "configs/toy.yaml", []),
    "same_sampled": ("same tokenizer, sampled reverse KL (what the cross row uses)", "configs/toy.yaml",
                     ["loss.kind=reverse_kl", "teacher.top_k=0", "schedule.steps=1000"]),
    "cross": ("another tokenizer (byte-level BPE teacher), span-aligned sampled reverse KL",
              "configs/toy-bpe-teacher.yaml", []),
    "blackbox": ("text only: vLLM OpenAI server over the teacher, /v1/chat/completions, sft",
                 "configs/toy-blackbox.yaml", []),
    "two": ("two teachers: toy teacher for 3-digit sums, `self` for 1-2 digit sums", "configs/toy-two-teachers.yaml",
            [KEEP_PROBE]),
    "two_noself": ("the same run without the `self` share: the toy teacher for 3-digit sums only",
                   "configs/toy-two-teachers.yaml", [KEEP_PROBE, *MAIN_ONLY]),
}


def gap_closed(before: float, after: float, teacher: float) -> float | None:
    """(after - before) / (teacher - before): the share of the student-to-teacher gap closed (None: no gap)."""
    return None if teacher <= before else (after - before) / (teacher - before)


def teacher_accuracy(model_dir: Path, bpe: bool, examples: list) -> float:
    """The teacher's greedy held-out exact match (transformers; its own tokenizer)."""
    if bpe:
        from onpolicy.toy.bpe_teacher import greedy_accuracy
    else:
        from onpolicy.toy.models import greedy_accuracy
    return greedy_accuracy(model_dir, examples)


def row_result(name: str, summary: dict, run_dir: Path) -> dict:
    """What the table shows of one finished run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    last = train[-1] if train else {}
    before, after = summary["before"], summary["after"]
    out = {"row": name, "steps": summary["steps"], "distill_seconds": round(summary["distill_wall_seconds"], 1),
           "teacher_tokens": last.get("teacher_tokens_processed"), "before": before.get("heldout_accuracy"),
           "after": after.get("heldout_accuracy"), "modes": [(t["name"], t["mode"]) for t in summary["teachers"]],
           "coverage": last.get("teacher_span_coverage"), "teacher_requests": last.get("teacher_requests")}
    for src in ("main", "keep"):
        if f"source_{src}_heldout_accuracy" in after:
            out[f"{src}_before"] = before[f"source_{src}_heldout_accuracy"]
            out[f"{src}_after"] = after[f"source_{src}_heldout_accuracy"]
    kept = summary.get("retention", {}).get("keep")
    if kept is not None:  # the kept skill on its probe set (the same prompts in every row)
        out["kept_before"], out["kept_after"] = kept["accuracy_before"], kept["accuracy_after"]
        out["kept_kl_to_start"] = kept["reverse_kl_to_start_after"]
    return out


def render(rows: list[dict]) -> str:
    head = ("| row | teachers (mode) | steps | distill s | teacher tokens | held-out exact match before -> after | "
            "teacher | gap closed | coverage |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        gap = r.get("gap")
        modes = ", ".join(f"{n} ({m})" for n, m in r["modes"])
        cov = "" if r.get("coverage") is None else f"{r['coverage']:.3f}"
        lines.append(f"| {r['row']} | {modes} | {r['steps']} | {r['distill_seconds']:.0f} | {r['teacher_tokens']:,} | "
                     f"{r['before']:.3f} -> **{r['after']:.3f}** | {r.get('teacher', float('nan')):.3f} | "
                     f"{'' if gap is None else f'{gap:.2f}'} | {cov} |")
        if "main_after" in r:
            lines.append(f"| ({r['row']}: main) | 3-digit sums (toy teacher) {r['main_before']:.3f} -> "
                         f"{r['main_after']:.3f} | | | | | | | |")
        if "kept_after" in r:
            lines.append(f"| ({r['row']}: kept) | 1-2 digit sums (retention probe) {r['kept_before']:.3f} -> "
                         f"{r['kept_after']:.3f}, reverse KL to the start {r['kept_kl_to_start']:.3f} | | | | | | | |")
    return "\n".join(lines)


def run_row(name: str, args: argparse.Namespace, out: Path) -> dict:
    from onpolicy.config import load_config
    from onpolicy.driver import train

    what, config, overrides = ROWS[name]
    run_dir = out / name
    extra = [f"output_dir={run_dir}", f"schedule.max_wall_seconds={args.wall}"]
    if args.steps:
        extra.append(f"schedule.steps={args.steps}")
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    server = None
    if name == "blackbox":  # the teacher behind a real OpenAI-compatible server, asked for text only
        sys.path.insert(0, str(REPO / "tests"))
        from fakes.vllm import start_vllm_server

        from onpolicy.toy import CHAT_TEMPLATE

        server = start_vllm_server(Path(args.toy_dir) / "teacher", max_logprobs=1,
                                   extra_args=("--chat-template", str(CHAT_TEMPLATE)), startup_timeout_s=900)
        extra.append(f"teacher.url={server.url}")
    cfg = load_config(REPO / config, [f"model.student={Path(args.toy_dir) / 'student'}", *overrides, *extra])
    teachers = {t.name: t for t in cfg.teacher_list()}
    if name == "cross":
        cfg.teacher.model = str(Path(args.toy_dir) / "teacher-bpe")
    elif name != "blackbox":
        for t in teachers.values():
            if t.kind == "local":
                t.model = str(Path(args.toy_dir) / "teacher")
    done = run_dir / "summary.json"
    try:
        t0 = time.time()
        summary = json.loads(done.read_text()) if done.is_file() else train(cfg, show_progress=False)
        print(f"[{name}] {what}: {time.time() - t0:.0f} s", flush=True)
    finally:
        if server is not None:
            server.stop()
    return row_result(name, summary, run_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--toy-dir", default="toy")
    p.add_argument("--out", default="runs/teachers")
    p.add_argument("--steps", type=int, default=0, help="override schedule.steps (0: each config's)")
    p.add_argument("--wall", type=float, default=840.0, help="schedule.max_wall_seconds of each row")
    p.add_argument("--seed", type=int, default=None, help="every row's seed (default: each config's)")
    args = p.parse_args()
    from onpolicy.config import load_config
    from onpolicy.prompts import PromptSource
    from onpolicy.toy.build import build_toy_models

    build_toy_models(args.toy_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = PromptSource(load_config(REPO / "configs/toy.yaml", []).data, load_config(None, []).eval, 0).heldout
    teacher_acc = {"char": teacher_accuracy(Path(args.toy_dir) / "teacher", False, heldout),
                   "bpe": teacher_accuracy(Path(args.toy_dir) / "teacher-bpe", True, heldout)}
    load_before = os.getloadavg()
    rows = []
    for name in args.rows.split(","):
        r = run_row(name, args, out)
        if not name.startswith("two"):
            r["teacher"] = teacher_acc["bpe" if name == "cross" else "char"]
            r["gap"] = gap_closed(r["before"], r["after"], r["teacher"])
        rows.append(r)
        (out / "teachers.json").write_text(json.dumps({"rows": rows, "teacher_accuracy": teacher_acc}, indent=2))
    load_after = os.getloadavg()
    print(render(rows))
    print(f"load average (1, 5, 15 min): before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

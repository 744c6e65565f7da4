"""`onpolicy demo`: the main job on an embedded task (`configs/toy.yaml`: addition; `configs/working.yaml`:
arithmetic with the working written out).

Builds the task's models if missing, measures the teacher, distills the student on-policy, then
writes `report.json` (before/after accuracy and reverse KL, in- and out-of-distribution, the per-token
KL's tail, the retention probe sets), `eval.png` (those against step) and prints a table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from onpolicy.config import load_config
from onpolicy.report import build_report, format_table, plot_eval, write_report


def task_models(task: str) -> tuple[str, Callable[..., Any], Callable[..., float]]:
    """(default folder, build(out_dir), greedy_accuracy(model_dir, examples)) of an embedded task's models."""
    if task == "working":
        from onpolicy.working.build import build_working_models
        from onpolicy.working.models import greedy_accuracy

        return "working", build_working_models, greedy_accuracy
    if task == "addition":
        from onpolicy.toy.build import build_toy_models
        from onpolicy.toy.models import greedy_accuracy as toy_accuracy

        return "toy", build_toy_models, toy_accuracy
    raise ValueError(f"onpolicy demo runs an embedded task (data.task=addition or working), not data.task={task}: "
                     "for your own data use `onpolicy train`")


def run_demo(out: str, toy_dir: str | None, config: str | None, overrides: list[str]) -> dict:
    from onpolicy.driver import train
    from onpolicy.prompts import PromptSource

    folder, build, greedy_accuracy = task_models(load_config(config, overrides).data.task)
    toy_dir = toy_dir or folder
    build(toy_dir)
    cfg = load_config(config, [f"model.student={toy_dir}/student", f"teacher.model={toy_dir}/teacher",
                               f"output_dir={out}", *overrides])
    source = PromptSource(cfg.data, cfg.eval, cfg.seed)
    teacher_acc = {"heldout": greedy_accuracy(cfg.teacher.model, source.heldout)}
    for split in ("ood", "unseen"):
        if getattr(source, split):
            teacher_acc[split] = greedy_accuracy(cfg.teacher.model, getattr(source, split))
    print("teacher exact match: " + ", ".join(f"{k} {v:.3f}" for k, v in teacher_acc.items()))
    summary = train(cfg)
    rep = build_report(summary, teacher_acc)
    path = write_report(rep, out)
    plot_eval(Path(out) / "metrics.jsonl", Path(out) / "eval.png")
    print(format_table(rep))
    print(f"wrote {path} and {Path(out) / 'eval.png'}; distilled student in {rep['student']}")
    return rep

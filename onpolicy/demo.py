"""`onpolicy demo`: the main job on the embedded default.

Builds the toy models if missing, measures the teacher, distills the student on-policy, then
writes `report.json` (before/after accuracy and reverse KL, in- and out-of-distribution),
`eval.png` (held-out reverse KL and accuracy against step) and prints a table.
"""

from __future__ import annotations

from pathlib import Path

from onpolicy.config import load_config
from onpolicy.report import build_report, format_table, plot_eval, write_report


def run_demo(out: str, toy_dir: str, config: str | None, overrides: list[str]) -> dict:
    from onpolicy.driver import train
    from onpolicy.prompts import PromptSource
    from onpolicy.toy.build import build_toy_models
    from onpolicy.toy.models import greedy_accuracy

    build_toy_models(toy_dir)
    cfg = load_config(config, [f"model.student={toy_dir}/student", f"teacher.model={toy_dir}/teacher",
                               f"output_dir={out}", *overrides])
    source = PromptSource(cfg.data, cfg.eval, cfg.seed)
    teacher_acc = {"heldout": greedy_accuracy(cfg.teacher.model, source.heldout)}
    if source.ood:
        teacher_acc["ood"] = greedy_accuracy(cfg.teacher.model, source.ood)
    print(f"teacher exact match: held-out {teacher_acc['heldout']:.3f}, OOD {teacher_acc.get('ood', float('nan')):.3f}")
    summary = train(cfg)
    rep = build_report(summary, teacher_acc)
    path = write_report(rep, out)
    plot_eval(Path(out) / "metrics.jsonl", Path(out) / "eval.png")
    print(format_table(rep))
    print(f"wrote {path} and {Path(out) / 'eval.png'}; distilled student in {rep['student']}")
    return rep

"""The `onpolicy` command. Heavy imports (torch, vLLM, Ray) happen inside each command, so
`onpolicy --help` answers at once."""

from __future__ import annotations

import argparse
import json
import os
import sys

from onpolicy.console import quiet_third_party

DEFAULT_CONFIG = "configs/toy.yaml"


def _load(config: str | None, overrides: list[str]):
    from onpolicy.config import load_config

    return load_config(config, overrides)


def refuse_occupied_output(output_dir: str, resume: bool) -> None:
    """A fresh run needs an empty or new output_dir: in a folder holding another run it would delete that
    run's checkpoints when it rotates its own, and a later --resume would take the other run's weights."""
    from pathlib import Path

    out = Path(output_dir)
    if resume or not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    what = ", ".join(sorted(p.name for p in out.iterdir())[:4]) if out.is_dir() else "a file"
    raise ValueError(f"output_dir={out} already holds {what}: a new run there would delete that run's checkpoints "
                     "and mix its metrics with this one's. Pass --resume to continue it, or set output_dir=NEW_DIR "
                     "(an empty or new folder)")


def cmd_train(args: argparse.Namespace) -> int:
    from onpolicy.driver import train

    cfg = _load(args.config, args.overrides)
    refuse_occupied_output(cfg.output_dir, args.resume)
    summary = train(cfg, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("steps", "distill_wall_seconds", "before", "after", "student")},
                     indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from onpolicy.eval_student import eval_student

    cfg = _load(args.config, args.overrides)
    print(json.dumps(eval_student(cfg, args.student), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from onpolicy.export import compare_students, export_student, render_comparison

    if args.eval and args.merge:
        raise ValueError("--eval compares an export with its source model folder, which an adapter is not: "
                         "export with --merge, then run `onpolicy eval --student OUT`")
    cfg = _load(args.config, args.overrides) if args.eval else None  # a bad config fails before writing
    out = export_student(args.student, args.out, quantize=args.quantize, merge=args.merge, base=args.base)
    what = [w for w in ("merged" if args.merge else None, args.quantize) if w]
    print(f"exported {args.student} -> {out}" + (f" ({', '.join(what)})" if what else ""))
    if cfg is not None:
        report = compare_students(cfg, args.student, out)
        (out / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(render_comparison(report, label=args.quantize or "exported"))
    return 0


def cmd_toy_build(args: argparse.Namespace) -> int:
    if args.task == "working":
        from onpolicy.working.build import build_working_models

        build_working_models(args.out or "working", force=args.force)
        return 0
    from onpolicy.toy.build import build_toy_models

    build_toy_models(args.out or "toy", force=args.force)
    return 0


def cmd_student_init(args: argparse.Namespace) -> int:
    from onpolicy.prune.student_init import init_student

    build = init_student(args.teacher, args.out, layers=args.layers, heads=args.heads, mlp=args.mlp,
                         hidden=args.hidden, config=args.config, overrides=args.overrides,
                         calibration_prompts=args.calibration_prompts,
                         calibration_new_tokens=args.calibration_new_tokens)
    print(json.dumps({"out": args.out, "shape": build["shape"], "params": build["params"],
                      "teacher_params": build["teacher_params"], "layers": build["kept"]["layers"]}, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from onpolicy.demo import run_demo

    run_demo(out=args.out, toy_dir=args.toy_dir, config=args.config, overrides=args.overrides)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from onpolicy.stage_bench import run_bench

    run_bench(config=args.config, overrides=args.overrides, steps=args.steps, toy_dir=args.toy_dir)
    return 0


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    from services.teacher.__main__ import serve_from_args

    serve_from_args(args)
    return 0


def cmd_serve_control(args: argparse.Namespace) -> int:
    from services.control.__main__ import serve_from_args

    serve_from_args(args)
    return 0


def cmd_teacher_check(args: argparse.Namespace) -> int:
    from onpolicy.teacher.check import check_teacher
    from onpolicy.teacher.factory import api_key_from_env

    if args.config is not None:  # every teacher of a run: its mode and why, decided before any engine starts
        from onpolicy.stack import check

        cfg = _load(args.config, [])
        for plan in check(cfg, student=args.student).plans:
            print(plan.line())
        return 0
    if args.url is None or args.student is None:
        raise ValueError("teacher check needs URL and --student DIR (one endpoint), or --config CFG (a run's teachers)")
    api_key = api_key_from_env(args.api_key_env)
    report = check_teacher(args.url, args.kind, args.student, api_key=api_key, top_k=args.top_k,
                           tokenizer=args.tokenizer, endpoint=args.endpoint)
    print(report.render())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onpolicy", description="On-policy distillation: vLLM rollouts on Ray, "
                                "teacher log-probs, a reverse-KL learner.")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' log lines, progress bars and warnings, and tracebacks (ONPOLICY_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="distill a student from a config (YAML) with key.sub=value overrides")
    t.add_argument("config", help="YAML config, e.g. configs/toy.yaml")
    t.add_argument("overrides", nargs="*", help="e.g. schedule.steps=50 rollout.num_workers=2")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="held-out accuracy and reverse KL to the teacher of a student folder")
    e.add_argument("--student", required=True, help="Hugging Face model folder of the student")
    e.add_argument("--config", default=DEFAULT_CONFIG, help="config naming the teacher and data")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a student folder vLLM serves, optionally quantized (int8: W8A8)")
    x.add_argument("--student", required=True, help="Hugging Face model folder of the (distilled) student")
    x.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    x.add_argument("--quantize", default=None, help="int8: compressed-tensors W8A8 (int8 weights per channel, "
                   "int8 activations per token); leave out for a plain safetensors copy")
    x.add_argument("--merge", action="store_true", help="--student is a LoRA adapter folder (a LoRA run's "
                   "checkpoint): write its base model with the adapter merged in")
    x.add_argument("--base", default=None, help="with --merge: the base model folder (default: the one the "
                   "adapter's adapter_config.json names)")
    x.add_argument("--eval", action="store_true", help="evaluate the student and the export side by side "
                   "(writes OUT/export_report.json)")
    x.add_argument("--config", default=DEFAULT_CONFIG, help="config naming the teacher and data (with --eval)")
    x.add_argument("overrides", nargs="*", help="with --eval, e.g. teacher.model=DIR eval.num_prompts=64")
    x.set_defaults(func=cmd_export)

    toy = sub.add_parser("toy", help="the embedded toy task and models")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    tb = toy_sub.add_parser("build", help="build (or copy the prebuilt) toy teacher and student")
    from onpolicy.config.data import EMBEDDED_TASKS

    tb.add_argument("--task", choices=EMBEDDED_TASKS, default=EMBEDDED_TASKS[0],
                    help="addition (configs/toy.yaml) or arithmetic with the working written out (configs/working.yaml)")
    tb.add_argument("--out", default=None, help="writes OUT/teacher and OUT/student (default: toy, or working)")
    tb.add_argument("--force", action="store_true", help="retrain even if a matching build exists")
    tb.set_defaults(func=cmd_toy_build)

    stu = sub.add_parser("student", help="students made from their teacher")
    stu_sub = stu.add_subparsers(dest="student_command", required=True)
    si = stu_sub.add_parser("init", help="cut a student from a Llama/Qwen2 teacher: depth and width pruning "
                            "(docs/students.md)")
    si.add_argument("--teacher", required=True, help="teacher model folder (Llama or Qwen2)")
    si.add_argument("--out", required=True, help="new student folder (written with build.json)")
    si.add_argument("--layers", default=None,
                    help="teacher layers to keep: `every-other` (0,2,4,...) or a list such as 1,3 (default: all)")
    si.add_argument("--heads", type=int, default=None, help="attention heads to keep per layer (default: all)")
    si.add_argument("--mlp", type=int, default=None, help="MLP channels to keep per layer (default: all)")
    si.add_argument("--hidden", type=int, default=None, help="embedding channels to keep (default: all)")
    si.add_argument("--config", default=DEFAULT_CONFIG,
                    help="run config whose `data` section gives the calibration prompts (width pruning)")
    si.add_argument("--calibration-prompts", type=int, default=256, help="prompts to measure importance on")
    si.add_argument("--calibration-new-tokens", type=int, default=16,
                    help="the teacher's greedy completion appended to each calibration prompt, in tokens")
    si.add_argument("overrides", nargs="*", help="config overrides, e.g. data.max_digits=4")
    si.set_defaults(func=cmd_student_init)

    d = sub.add_parser("demo", help="the main job: build toy models, distill, report before/after")
    d.add_argument("--out", default="runs/demo", help="run directory (report.json, plot, student)")
    d.add_argument("--toy-dir", default=None,
                   help="where the task's models live, built if missing (default: toy, or working for data.task=working)")
    d.add_argument("--config", default=DEFAULT_CONFIG)
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="tokens/s and share of step time per stage on the toy config")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--toy-dir", default="toy")
    b.add_argument("--config", default=DEFAULT_CONFIG)
    b.add_argument("overrides", nargs="*")
    b.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="run an HTTP service")
    serve_sub = serve.add_subparsers(dest="service", required=True)
    from services.control.__main__ import add_serve_arguments as add_control_arguments
    from services.teacher.__main__ import add_serve_arguments as add_teacher_arguments

    st = add_teacher_arguments(serve_sub.add_parser(
        "teacher", help="the teacher scoring service (POST /v1/score, GET /v1/info)"))
    st.set_defaults(func=cmd_serve_teacher)
    sc = add_control_arguments(serve_sub.add_parser("control", help="the control plane REST API (runs, teachers)"))
    sc.set_defaults(func=cmd_serve_control)

    from onpolicy.client import RemoteTeacherKinds, add_client_commands

    tch = sub.add_parser("teacher", help="external teacher endpoints")
    tch_sub = tch.add_subparsers(dest="teacher_command", required=True)
    tc = tch_sub.add_parser("check", help="is this teacher endpoint usable for this student, and in which mode? "
                            "(exit 1 if not); with --config: the mode of each of a run's teachers")
    tc.add_argument("url", nargs="?", default=None, help="base URL, e.g. http://127.0.0.1:8100")
    tc.add_argument("--student", default=None, help="student model folder (its tokenizer is compared); with "
                    "--config: instead of model.student")
    class CheckKinds(RemoteTeacherKinds):
        """`teacher check --kind` choices: the scoring dialects and a text-only endpoint."""

        def _kinds(self) -> list[str]:
            return [*super()._kinds(), "openai"]

    tc.add_argument("--kind", choices=CheckKinds(), default="service", metavar="KIND",
                    help="the endpoint's dialect: %(choices)s (default: %(default)s)")
    tc.add_argument("--tokenizer", default=None, help="the teacher's own tokenizer folder, when it is not the "
                    "student's (span-aligned distillation, teacher.tokenizer)")
    tc.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                    help="--kind openai: the endpoint asked (default: %(default)s)")
    tc.add_argument("--config", default=None, help="a run config: print the mode each of its teachers gets, and "
                    "why (checks folders, data and loss; starts nothing)")
    tc.add_argument("--top-k", type=int, default=None, help="the top-k the run will ask for")
    tc.add_argument("--api-key-env", default=None, help="environment variable holding the bearer token")
    tc.set_defaults(func=cmd_teacher_check)

    add_client_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["ONPOLICY_DEBUG"] = "1"
    quiet_third_party()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # Config, path and compatibility errors: say what is wrong, no traceback
        # (ONPOLICY_DEBUG=1 shows it, for errors that are bugs rather than bad input).
        if os.environ.get("ONPOLICY_DEBUG") == "1":
            raise
        print(f"onpolicy: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

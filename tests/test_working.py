"""The working task (onpolicy/working): the completions it expects, its splits, its config and prompt source, and
the committed teacher and student (accurate teacher, mid-trained student with a second skill)."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import pytest

from onpolicy.config import ConfigError, load_config
from onpolicy.prompts import PromptSource
from onpolicy.working.task import CHARS, WorkingTask, columns, completion, render

ROOT = Path(__file__).resolve().parents[1]
LONG_STEP = re.compile(r"(\d)([+-])(\d)\2(\d)=(\d)(\d),")


def _check_working(prompt: str, answer: str) -> None:
    """Re-derive a working from its own text: every column's carry is the one the column before wrote, its
    operands are the prompt's digits, and the result is the digits read off the working."""
    op = "+" if "+" in prompt else "-"
    a, b = prompt[:-1].split(op)
    steps, result = answer.split("|")
    cols = LONG_STEP.findall(steps)
    assert "".join(m[0] + m[1] + m[2] + m[1] + m[3] + "=" + m[4] + m[5] + "," for m in cols) == steps
    carry = 0
    for i, (x, _, y, cin, cout, digit) in enumerate(cols):
        assert int(x) == (int(a[::-1][i]) if i < len(a) else 0) and int(y) == (int(b[::-1][i]) if i < len(b) else 0)
        assert int(cin) == carry
        total = int(x) + int(y) + carry if op == "+" else int(x) - int(y) - carry
        assert (int(cout), int(digit)) == ((total // 10, total % 10) if op == "+" else (int(total < 0), total % 10))
        carry = int(cout)
    expected = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert result == str(expected)[::-1]


def test_completions():
    assert completion(4821, 377) == "1+7+0=08,2+7+0=09,8+3+0=11,4+0+1=05,|8915"  # 5198, units first
    assert completion(999, 1).endswith("9+0+1=10,|0001")  # a final carry is a digit of its own
    assert completion(52, 17, "subtract") == "2-7-0=15,5-1-1=03,|53"  # the borrow where addition carries
    assert render(17, 52, "subtract") == render(52, 17, "subtract")  # never negative
    assert render(1000, 999, "subtract").answer.endswith("|1")


@pytest.mark.parametrize("operation", ["add", "subtract"])
def test_the_working_is_right_on_random_operands(operation):
    rng = random.Random(7)
    for _ in range(300):
        a, b = rng.randint(0, 10**8), rng.randint(0, 10**8)
        ex = render(a, b, operation)
        _check_working(ex.prompt, ex.answer)
        assert set(ex.prompt + ex.answer) <= set(CHARS)
        assert len(columns(a, b, operation)) == max(len(str(a)), len(str(b)))


def test_answer_lengths_follow_the_columns():
    """Nine characters a column (`x+y+c=kd,`), then `|` and the result's digits (one more on a final carry):
    about 10 tokens a column, so the length sweep's ranges (1-2, 3-4, 5-6 digit operands; a column per digit of
    the longer operand, ~1.8, ~3.7 and ~5.8 of them) give answers of ~19, ~39 and ~59 tokens."""
    from onpolicy.working.models import LENGTHS

    mean = {}
    for name, (lo, hi) in LENGTHS.items():
        examples = WorkingTask(min_digits=lo, max_digits=hi).heldout(256)
        for e in examples:
            cols, result = max(len(x) for x in e.prompt[:-1].split("+")), e.answer.split("|")[1]
            assert len(e.answer) == 9 * cols + 1 + len(result) and len(result) in (cols, cols + 1)
        lengths = [len(e.answer) for e in examples]
        assert 10 * lo + 1 <= min(lengths) and max(lengths) <= 10 * hi + 2
        mean[name] = sum(lengths) / len(lengths)
    # Medium is twice short (a 1-digit operand is rarely the longer one), long three times it.
    assert 1.8 * mean["short"] < mean["medium"] < 2.2 * mean["short"]
    assert 2.8 * mean["short"] < mean["long"] < 3.3 * mean["short"]
    assert 30 <= 10 * LENGTHS["long"][0] + 1 and 10 * LENGTHS["long"][1] + 2 <= 100  # the task's 30-100 tokens


def test_splits_are_fixed_apart_and_never_trained():
    task = WorkingTask()
    heldout, ood, unseen = task.heldout(256), task.ood(64), task.unseen(64)
    assert heldout == task.heldout(256) and len({e.prompt for e in heldout}) == 256
    assert {len(x) for e in ood for x in e.prompt[:-1].split("+")} == {7}
    assert {len(x) for e in unseen for x in e.prompt[:-1].split("+")} == {8}
    assert all(5 <= len(x) <= 6 for e in heldout for x in e.prompt[:-1].split("+"))
    banned = {e.prompt for e in heldout}
    stream = task.train_stream(seed=3, exclude=heldout)
    assert not any(next(stream).prompt in banned for _ in range(3000))


def test_config_and_prompt_source():
    cfg = load_config(ROOT / "configs" / "working.yaml", ["eval.num_prompts=16", "eval.ood_num_prompts=4"])
    src = PromptSource(cfg.data, cfg.eval, cfg.seed)
    assert len(src.heldout) == 16 and len(src.ood) == len(src.unseen) == 4
    assert all("|" in e.answer for e in src.heldout)
    assert [len(x) for x in src.unseen[0].prompt[:-1].split("+")] == [8, 8]
    assert not {e.prompt for e in src.batch(500)} & {e.prompt for e in src.heldout}
    short = load_config(ROOT / "configs" / "working.yaml", ["data.min_digits=1", "data.max_digits=2"])
    assert len(PromptSource(short.data, short.eval, 0).heldout[0].answer) <= 22
    with pytest.raises(ConfigError, match="data.min_digits must be <= data.max_digits"):
        load_config(ROOT / "configs" / "working.yaml", ["data.min_digits=7"])
    with pytest.raises(ConfigError, match="data.operation"):
        load_config(ROOT / "configs" / "working.yaml", ["data.operation=multiply"])


def test_the_addition_task_has_an_unseen_split_too():
    cfg = load_config(ROOT / "configs" / "toy.yaml", ["eval.ood_num_prompts=8"])
    src = PromptSource(cfg.data, cfg.eval, cfg.seed)
    assert [len(x) for x in src.unseen[0].prompt[:-1].split("+")] == [cfg.data.unseen_digits] * 2 == [5, 5]
    assert not PromptSource(load_config(None, []).data, cfg.eval, 0).unseen  # off unless asked for


def test_the_keep_config_is_the_demo_plus_a_self_share_of_the_probed_skill():
    """configs/working-keep.yaml is configs/working.yaml with a quarter of the prompts sent to `self`, and those
    prompts are the skill the retention probe watches: so bench/retention.py compares the cure, nothing else."""
    import yaml

    demo, keep = (yaml.safe_load((ROOT / "configs" / f"{n}.yaml").read_text()) for n in ("working", "working-keep"))
    changed = {"name", "output_dir", "teacher", "teachers", "data"}
    assert {k: v for k, v in demo.items() if k not in changed} == {k: v for k, v in keep.items() if k not in changed}
    cfg = load_config(ROOT / "configs" / "working-keep.yaml")
    main, kept = cfg.data.sources
    by_name = {t.name: t for t in cfg.teacher_list()}
    assert by_name[main.teacher].model == demo["teacher"]["model"] and by_name[kept.teacher].kind == "self"
    assert {t.top_k for t in by_name.values()} == {demo["teacher"]["top_k"]}  # exact: the whole vocabulary
    assert main.data.model_dump() == load_config(ROOT / "configs" / "working.yaml").data.model_dump()
    assert kept.weight / (kept.weight + main.weight) == 0.25
    assert kept.data.model_dump() == cfg.eval.retention[0].data.model_dump()


def test_retention_bench_reads_a_finished_run(tmp_path):
    """bench/retention.py's row: the distillation task's exact match is the `main` source's in a mixture and the
    whole held-out set's otherwise; the gap and the probe's figures are read from summary.json."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import retention

    for name, before, after in (("mixture", {"source_main_heldout_accuracy": 0.5, "heldout_accuracy": 0.7},
                                 {"source_main_heldout_accuracy": 0.95, "heldout_accuracy": 0.9}),
                                ("single", {"heldout_accuracy": 0.5}, {"heldout_accuracy": 0.95})):
        run = tmp_path / name
        run.mkdir()
        probe = {"accuracy_before": 0.93, "accuracy_after": 0.0, "drop": 0.93, "max_drop": 0.05,
                 "reverse_kl_to_start_after": 2.3, "flagged": True}
        (run / "summary.json").write_text(json.dumps({"steps": 300, "distill_wall_seconds": 150.0, "before": before,
                                                      "after": after, "retention": {"subtraction": probe}}))
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
            {"kind": "eval", "step": 0}, {"kind": "train", "step": 1, "teacher_tokens_processed": 10},
            {"kind": "train", "step": 2, "teacher_tokens_processed": 25}, {"kind": "eval", "step": 2})) + "\n")
        row = retention.row_result(name, 0, run, teacher=1.0)
        assert (row["before"], row["after"], row["teacher_tokens"]) == (0.5, 0.95, 25)
        assert row["gap_closed"] == pytest.approx(0.9) and row["flagged"] and row["kept_after"] == 0.0
    assert "| 0.930 -> **0.000** | 2.300 | yes |" in retention.render([row])
    assert retention.row_result("single", 0, tmp_path / "single", teacher=0.4)["gap_closed"] is None


# ---- the committed models ----------------------------------------------------------------------------------

def test_specs_hash_apart_and_the_student_is_smaller():
    from onpolicy.working.models import STUDENT, TEACHER

    assert TEACHER.spec_hash() != STUDENT.spec_hash() != dataclasses.replace(STUDENT, steps=1).spec_hash()
    assert STUDENT.num_layers * STUDENT.hidden < TEACHER.num_layers * TEACHER.hidden
    assert {op for op, *_ in STUDENT.mix} == {"add", "subtract"} and {op for op, *_ in TEACHER.mix} == {"add"}
    teacher_digits = {d for _, lo, hi, _ in TEACHER.mix for d in range(lo, hi + 1)}
    student_digits = {d for op, lo, hi, _ in STUDENT.mix if op == "add" for d in range(lo, hi + 1)}
    assert 7 in teacher_digits - student_digits and 8 not in teacher_digits  # the OOD and the unseen split


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_assets_are_current_and_small(name):
    from transformers import AutoConfig, AutoTokenizer

    from onpolicy.kit.build import is_current
    from onpolicy.working.build import ASSETS_DIR
    from onpolicy.working.models import SPECS, shared_tokenizer

    folder = ASSETS_DIR / name
    assert is_current(folder, SPECS[name].spec_hash()), (
        f"{folder} is stale for the current spec: run `onpolicy toy build --task working --out working --force` "
        f"and copy working/{name} into onpolicy/working/assets/{name}")
    assert sum(f.stat().st_size for f in folder.iterdir()) < 6e6  # committed: a few MB
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == shared_tokenizer().get_vocab()
    assert AutoConfig.from_pretrained(folder).max_position_embeddings >= 1 + 18 + 96  # unseen prompt + completion


def test_teacher_does_the_long_working_and_the_student_partly():
    """The gap distillation closes: the teacher near-perfect, the mid-trained student well short; and the
    student's second skill (subtraction, which no distillation prompt asks for) learnt well."""
    from onpolicy.working.build import ASSETS_DIR
    from onpolicy.working.models import SECOND_SKILL, SPLITS, greedy_accuracy

    heldout = SPLITS.heldout(64)
    assert greedy_accuracy(ASSETS_DIR / "teacher", heldout) >= 0.95
    assert greedy_accuracy(ASSETS_DIR / "teacher", SPLITS.ood(64)) >= 0.8
    assert 0.15 <= greedy_accuracy(ASSETS_DIR / "student", heldout) <= 0.75
    assert greedy_accuracy(ASSETS_DIR / "student", SECOND_SKILL.heldout(64)) >= 0.8


def test_working_errors_names_the_first_wrong_field_and_the_gradients_match_their_formulas():
    """bench/working_errors.py: the first difference named by column and field, and its two gradient norms
    against the closed forms (reverse KL: q_i (log q_i - log p_i - KL); forward KL: q - p), in float64."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from working_errors import first_error, logit_gradients

    want = completion(492858, 16530)
    assert want.startswith("8+0+0=08,5+3+0=08,8+5+0=13,2+6+1=09,")
    got = want[:27] + "9" + want[28:]  # column 3's digit of a, copied one place off
    assert first_error(got, want) == (27, "column 3 x")
    assert first_error(want[:-1] + "0", want) == (len(want) - 1, "result")
    assert first_error(want[:20], want) == (20, "column 2 y")  # stopped short

    g = logit_gradients(0.996, 0.002, 0.999, 19)
    q = torch.full((19,), 0.002 / 17, dtype=torch.float64)
    q[0], q[1] = 0.996, 0.002
    p = torch.full((19,), 0.001 / 18, dtype=torch.float64)
    p[1] = 0.999
    rkl = (q * (q.log() - p.log())).sum()
    assert g["reverse_kl"] == pytest.approx(rkl.item(), rel=1e-12)
    assert g["reverse_grad_norm"] == pytest.approx((q * (q.log() - p.log() - rkl)).norm().item(), rel=1e-9)
    assert g["forward_grad_norm"] == pytest.approx((q - p).norm().item(), rel=1e-9)
    assert g["forward_grad_norm"] > 20 * g["reverse_grad_norm"]  # the confidently wrong student's case

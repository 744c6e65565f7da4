"""Runs through the driver with the teachers of issue 29, on tiny models: a two-teacher mixture (a teacher with
another tokenizer for one source, `self` for the other) and a text-only teacher (the session's real vLLM server
through /v1/chat/completions, sequence-level). Real vLLM engines, Ray actors and the learner."""

from __future__ import annotations

import math

import pytest
import yaml

from onpolicy.config import config_from_dict, load_config
from onpolicy.driver import Run
from onpolicy.metrics import read_metrics

pytestmark = pytest.mark.slow

PROMPTS = 16


def _run(cfg) -> tuple[dict, Run]:
    run = Run(cfg, show_progress=False)
    try:
        return run.run(), run
    finally:
        run.close()


@pytest.fixture(scope="module")
def mixture_run(ray_session, tiny_model_dir, tiny_bpe_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixture") / "run"
    cfg = config_from_dict({
        "model": {"student": str(tiny_model_dir)}, "output_dir": str(out),
        "teachers": [{"name": "toy", "model": str(tiny_bpe_teacher_dir)}, {"name": "self"}],
        "data": {"task": "mixture", "sources": [
            {"name": "main", "weight": 1, "teacher": "toy", "data": {"min_digits": 3, "max_digits": 3}},
            {"name": "keep", "weight": 1, "teacher": "self", "data": {"min_digits": 1, "max_digits": 2}}]},
        "loss": {"kind": "reverse_kl"}, "rollout": {"num_workers": 1, "prompts_per_step": PROMPTS, "max_new_tokens": 6},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "micro_batch_size": 16},
        "schedule": {"steps": 2}, "eval": {"every": 0, "num_prompts": 8, "ood_num_prompts": 0},
        "checkpoint": {"every": 0},
    })
    summary, _ = _run(cfg)
    return summary, out


def test_each_teacher_gets_its_mode_recorded_in_config_and_summary(mixture_run):
    summary, out = mixture_run
    assert [(t["name"], t["mode"]) for t in summary["teachers"]] == [("toy", "span"), ("self", "token")]
    text = (out / "config.yaml").read_text()
    assert "#   teacher toy (kind=local): span-aligned: another tokenizer" in text
    assert "#   teacher self (kind=self): token-level" in text
    assert load_config(out / "config.yaml", []).teacher_list()[1].kind == "self"  # still a config


def test_per_source_metrics_show_each_source_scored_by_its_own_teacher(mixture_run):
    summary, out = mixture_run
    train = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["source_main_sequences"] + r["source_keep_sequences"] == PROMPTS
        # the random student samples special tokens inside its text, where alignment stops (test_span_teacher)
        assert 0.0 < r["teacher_toy_span_coverage"] <= 1.0 and r["teacher_self_requests"] > 0
    # step 1 is sampled by the starting student: `self` (a frozen copy of it) scores its own samples, so the
    # keep source's KL is ~0 (two kernels of the same weights); the other teacher's is not
    first = train[0]
    assert abs(first["source_keep_teacher_kl"]) < 1e-3 < abs(first["source_main_teacher_kl"]), first
    after = summary["after"]
    assert {"source_main_heldout_accuracy", "source_keep_heldout_reverse_kl", "heldout_accuracy"} <= set(after)
    overall = (after["source_main_heldout_accuracy"] + after["source_keep_heldout_accuracy"]) / 2  # 8 + 8 examples
    assert math.isclose(after["heldout_accuracy"], overall)


def test_a_text_only_teacher_trains_the_student_on_its_samples(ray_session, tiny_model_dir, vllm_server, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, [
        f"model.student={tiny_model_dir}", f"output_dir={out}", "teacher.kind=openai", f"teacher.url={vllm_server.url}",
        "loss.kind=sft", "rollout.num_workers=1", f"rollout.prompts_per_step={PROMPTS}", "rollout.max_new_tokens=6",
        "optim.warmup_steps=0", "schedule.steps=2", "eval.every=0", "eval.num_prompts=8", "eval.ood_num_prompts=0",
        "checkpoint.every=0", "teacher.price_prompt_per_mtok=1", "teacher.price_completion_per_mtok=3",
    ])
    summary, _ = _run(cfg)
    assert [(t["kind"], t["mode"]) for t in summary["teachers"]] == [("openai", "sequence")]
    train = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == [1, 2] and all(r["sequences"] == PROMPTS for r in train)
    last = train[-1]
    assert last["teacher_requests"] >= 2 * PROMPTS and last["teacher_tokens_generated"] > 0
    assert last["teacher_cost"] == pytest.approx((last["teacher_prompt_tokens"] + 3 * last["teacher_tokens_generated"]) / 1e6)
    assert "heldout_accuracy" in summary["after"] and math.isnan(summary["after"]["heldout_reverse_kl"])
    assert yaml.safe_load((out / "config.yaml").read_text())["teacher"]["kind"] == "openai"


def test_teacher_check_gives_a_server_of_another_tokenizer_span_aligned(vllm_server, tiny_teacher_dir,
                                                                         tiny_bpe_teacher_dir, capsys):
    """The session's vLLM server serves the character tokenizer; for a student with the BPE one it is a teacher of
    another tokenizer: refused without its tokenizer, span-aligned with it (checked to be what it serves)."""
    from onpolicy.cli import main

    assert main(["teacher", "check", vllm_server.url, "--kind", "vllm", "--student", str(tiny_bpe_teacher_dir)]) == 1
    assert "[FAIL] tokenizer" in capsys.readouterr().out
    argv = ["teacher", "check", vllm_server.url, "--kind", "vllm", "--student", str(tiny_bpe_teacher_dir),
            "--tokenizer", str(tiny_teacher_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[PASS] tokenizer (vs --tokenizer)" in out and "[PASS] mode: span-aligned: another tokenizer" in out

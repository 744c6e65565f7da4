"""LoRA students: PEFT adapter in the learner, adapter-only push hot-loaded by vLLM (CPU), checkpoints that
hold the adapter and resume, a merged student folder, and `onpolicy export --merge`.

The slow part is one module-scoped LoRA run (real vLLM worker, real teacher, Ray) shared by its checks."""

from __future__ import annotations

import json

import pytest
import torch

from onpolicy.config import ConfigError, LoraConfig, RunConfig, load_config
from onpolicy.learner import lora as lora_lib
from onpolicy.learner.core import Learner
from onpolicy.types import Rollout, ScoreRequestItem, TeacherScores
from tests.tolerances import FP32_KERNELS, assert_nested_close, assert_tensor_close

TARGETS = ["q_proj", "v_proj", "down_proj"]
PROMPTS = [[1, 5, 6, 14, 7, 8, 15], [1, 13, 4, 14, 9, 15], [1, 7, 14, 7, 15]]
COMPLETIONS = [[10, 11, 2], [12, 9, 3, 2], [5, 4]]
ITEMS = [ScoreRequestItem(prompt_ids=p, completion_ids=c) for p, c in zip(PROMPTS, COMPLETIONS)]


def lora_cfg(**lora) -> RunConfig:
    cfg = RunConfig()
    cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.lr = 0, "constant", 3e-2
    cfg.model.lora = LoraConfig(rank=8, alpha=16, target_modules=TARGETS, **lora)
    cfg.resources.learner_device = "cpu"
    return cfg


def batch(learner: Learner) -> tuple[list[Rollout], list[TeacherScores]]:
    lps = learner.score(ITEMS)
    rollouts = [Rollout(prompt_ids=it.prompt_ids, completion_ids=it.completion_ids, sampler_logprobs=lp,
                        policy_version=learner.step) for it, lp in zip(ITEMS, lps)]
    return rollouts, [TeacherScores(logprobs=[x - 0.5 * (i + 1) for i, x in enumerate(lp)]) for lp in lps]


def hf_logprobs(folder, items: list[ScoreRequestItem]) -> list[list[float]]:
    """Reference: a plain transformers model loaded from `folder` (float32), one sequence at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for it in items:
            logp = torch.log_softmax(model(torch.tensor([it.prompt_ids + it.completion_ids])).logits[0].float(), -1)
            out.append([logp[len(it.prompt_ids) - 1 + t, tok].item() for t, tok in enumerate(it.completion_ids)])
    return out


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A LoRA learner after 3 steps (B no longer zero), and its checkpoint folder."""
    learner = Learner(str(tiny_model_dir), lora_cfg())
    rollouts, scores = batch(learner)
    for _ in range(3):
        learner.train_step(rollouts, scores)
    ckpt = tmp_path_factory.mktemp("lora") / "ckpt"
    learner.save_checkpoint(ckpt)
    return learner, ckpt


def test_config_refuses_a_rank_vllm_cannot_serve():
    with pytest.raises(ConfigError, match=r"model\.lora\.rank"):
        load_config(None, ["model.lora={rank: 4}"])
    cfg = load_config(None, ["model.lora={rank: 16, target_modules: [q_proj]}"])
    assert cfg.model.lora.rank == 16 and cfg.model.lora.alpha == 16.0
    assert load_config(None, []).model.lora is None  # full fine-tuning by default


def test_merge_lora_equals_peft_merge(tiny_model_dir):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           PeftLoraConfig(r=8, lora_alpha=24, target_modules=TARGETS))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    base = {k: t.clone() for k, t in lora_lib.base_tensors(model).items()}  # merge_and_unload works in place
    merged = lora_lib.merge_lora(base, dict(lora_lib.adapter_tensors(model)), lora_lib.adapter_config(model))
    assert len(merged) == 2 * 3 and all(k.endswith((".q_proj.weight", ".v_proj.weight", ".down_proj.weight"))
                                        for k in merged)
    reference = model.merge_and_unload().state_dict()
    for key, tensor in merged.items():
        assert_tensor_close(tensor, reference[key], FP32_KERNELS, key)  # our merge vs peft's
        assert not torch.equal(tensor, base[key])  # the adapter moved it


def test_only_the_adapter_trains_and_is_pushed(tiny_model_dir, trained):
    learner, _ = trained
    base = Learner(str(tiny_model_dir), lora_cfg())
    for (name, a), b in zip(lora_lib.base_tensors(learner.model).items(), lora_lib.base_tensors(base.model).values()):
        assert torch.equal(a, b), f"base weight {name} changed"
    n_adapter = sum(1 for _ in lora_lib.adapter_tensors(learner.model))
    assert len(learner.optimizer.param_groups[0]["params"]) == n_adapter == 2 * 2 * len(TARGETS)
    update = learner.weight_update()
    assert update.version == 3 and update.adapter_config["r"] == 8
    assert sorted(update.adapter_config["target_modules"]) == sorted(TARGETS)
    assert all(".lora_A." in n or ".lora_B." in n for n, _ in update.tensors)
    assert learner.push_bytes == lora_lib.tensor_bytes(update.tensors)
    assert learner.push_bytes < learner.full_push_bytes / 5, (learner.push_bytes, learner.full_push_bytes)
    # The learner's log-probs are those of its merged weights.
    assert max_abs_diff(learner.score(ITEMS), base.score(ITEMS)) > 1e-3


def test_checkpoint_holds_the_adapter_and_resumes(tiny_model_dir, trained):
    learner, ckpt = trained
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
    assert not (ckpt / "model.safetensors").exists()  # the base is not copied into every checkpoint
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    fresh = Learner(str(tiny_model_dir), lora_cfg())
    fresh.load_checkpoint(ckpt)
    assert fresh.step == 3
    for (n, a), (_, b) in zip(lora_lib.adapter_tensors(learner.model), lora_lib.adapter_tensors(fresh.model)):
        assert torch.equal(a, b), n
    s1, s2 = learner.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and len(s1) == 2 * 2 * len(TARGETS)
    for k in s1:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][key], s2[k][key]), (k, key)
    assert learner.score(ITEMS) == fresh.score(ITEMS)
    # An adapter written for other target modules is refused, naming the mismatch.
    with pytest.raises(ValueError, match="does not match model.lora"):
        lora_lib.load_adapter_tensors(Learner(str(tiny_model_dir), lora_cfg_other()).model,
                                      dict(lora_lib.adapter_tensors(learner.model)))


def lora_cfg_other() -> RunConfig:
    cfg = lora_cfg()
    cfg.model.lora = LoraConfig(rank=8, target_modules=["k_proj"])
    return cfg


def test_merged_student_folder_and_export_merge(trained, tmp_path):
    from safetensors.torch import load_file

    from onpolicy.cli import main

    learner, ckpt = trained
    learner.save_model(tmp_path / "student")
    assert not (tmp_path / "student" / "adapter_config.json").exists()
    assert_nested_close(hf_logprobs(tmp_path / "student", ITEMS), learner.score(ITEMS), FP32_KERNELS)
    assert main(["export", "--merge", "--student", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    exported, saved = load_file(tmp_path / "merged" / "model.safetensors"), load_file(
        tmp_path / "student" / "model.safetensors")
    assert exported.keys() == saved.keys()
    for key in saved:
        assert_tensor_close(exported[key], saved[key], FP32_KERNELS, key)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    # An adapter folder is not a model: without --merge it is refused, and --merge needs an adapter.
    assert main(["export", "--student", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert main(["export", "--merge", "--student", str(tmp_path / "student"), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------------------------
# A real LoRA run: vLLM worker serving the pushed adapter, a local teacher, Ray.

STEPS = 24


@pytest.fixture(scope="module")
def lora_run(ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path_factory):
    from onpolicy.driver import Run

    out = tmp_path_factory.mktemp("lora_run")
    cfg = load_config(None, [
        f"model.student={tiny_model_dir}", f"teacher.model={tiny_teacher_dir}", f"output_dir={out}",
        "model.lora={rank: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}",
        "rollout.num_workers=1", "rollout.prompts_per_step=32", "rollout.max_new_tokens=6",
        "optim.lr=0.02", "optim.warmup_steps=0", "optim.schedule=constant", "optim.micro_batch_size=32",
        f"schedule.steps={STEPS}", "eval.every=0", "eval.num_prompts=64", "eval.ood_num_prompts=16",
        "checkpoint.every=0", "logging.report_to=[tensorboard]",
    ])
    run = Run(cfg, show_progress=False)
    summary = run.run()
    yield run, summary, out
    run.close()


@pytest.mark.slow
def test_lora_run_lowers_heldout_reverse_kl(lora_run):
    _, summary, _ = lora_run
    before, after = summary["before"]["heldout_reverse_kl"], summary["after"]["heldout_reverse_kl"]
    print(f"LoRA run: held-out reverse KL {before:.4f} -> {after:.4f}")
    assert summary["steps"] == STEPS
    assert after < 0.8 * before, f"held-out reverse KL {before:.4f} -> {after:.4f}"


@pytest.mark.slow
def test_lora_push_is_smaller_and_keeps_sampler_and_learner_in_sync(lora_run):
    from onpolicy.metrics import read_metrics

    _, _, out = lora_run
    train = read_metrics(out / "metrics.jsonl", kind="train")
    assert len(train) == STEPS
    push, full = train[0]["push_bytes"], train[0]["full_push_bytes"]
    print(f"push bytes: LoRA adapter {push:.0f}, full weights {full:.0f} ({full / push:.1f}x)")
    assert push < full / 3
    for r in train:
        # The engine serves exactly the learner's adapter: its sampling log-probs are the learner's.
        assert abs(r["sampler_learner_kl"]) < FP32_KERNELS.at(16), r
        assert r["policy_version"] == r["step"]


@pytest.mark.slow
def test_after_a_lora_push_engine_logprobs_equal_merged_model_logprobs(lora_run):
    run, _, out = lora_run
    import ray

    assert ray.get(run.workers[0].version.remote()) == STEPS
    engine = ray.get(run.workers[0].score.remote(ITEMS))
    merged = hf_logprobs(out / "student", ITEMS)  # the merged student folder the run wrote
    assert_nested_close(engine, merged, FP32_KERNELS, "engine vs merged student")
    assert_nested_close(ray.get(run.learner.score.remote(ITEMS)), merged, FP32_KERNELS, "learner vs merged student")
    assert max_abs_diff(engine, hf_logprobs(run.student_path, ITEMS)) > 1e-2  # not the base model


@pytest.mark.slow
def test_lora_run_checkpoint_and_tensorboard(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, out = lora_run
    (ckpt,) = (out / "checkpoints").glob("step_*")
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/teacher_kl")] == list(range(1, STEPS + 1))
    assert [e.step for e in acc.Scalars("eval/heldout_reverse_kl")] == [0, STEPS]

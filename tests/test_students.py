"""`onpolicy student init`: importance scores against float64 brute force, cuts against the teacher with the
dropped parts zeroed, pruning nothing reproduces the teacher, bad input refused, and (slow, one engine) a
pruned folder served by a real vLLM engine agrees with transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tolerances import FP32_BATCH, FP32_KERNELS, FP64_ORDER, assert_nested_close

from onpolicy.prune.cut import Teacher, check_shape, parse_layers
from onpolicy.prune.importance import channel_scores, collect_importance, head_scores, top_indices
from onpolicy.prune.student_init import init_student
from onpolicy.teacher.local.engines import HFTeacher
from onpolicy.types import ScoreRequestItem

ITEMS = [
    ScoreRequestItem(prompt_ids=[1, 5, 6, 14], completion_ids=[7, 15, 8, 2]),
    ScoreRequestItem(prompt_ids=[1], completion_ids=[4, 4, 9, 13, 14, 5]),
    ScoreRequestItem(prompt_ids=[1, 12, 11, 14, 10, 15], completion_ids=[13]),
]


def logprobs(folder) -> list[list[float]]:
    return [s.logprobs for s in HFTeacher(folder).score(ITEMS)]


def test_head_and_channel_scores_match_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    x_BTD = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    mask_BT = (torch.rand(3, 5, generator=g) > 0.3).double()
    heads = head_scores(x_BTD, mask_BT, heads=2)
    chans = channel_scores(x_BTD, mask_BT)
    for i in range(2):
        ref = sum(mask_BT[b, t].item() * sum(x_BTD[b, t, i * 4 + j].item() ** 2 for j in range(4)) ** 0.5
                  for b in range(3) for t in range(5))
        assert FP64_ORDER.close(heads[i].item(), ref), (i, heads[i].item(), ref)
    for c in range(8):
        ref = sum(mask_BT[b, t].item() * abs(x_BTD[b, t, c].item()) for b in range(3) for t in range(5))
        assert FP64_ORDER.close(chans[c].item(), ref), (c, chans[c].item(), ref)


def test_top_indices_keep_the_highest_in_index_order_ties_to_the_lower():
    assert top_indices(torch.tensor([0.5, 2.0, 1.0, 2.0]), 2) == [1, 3]
    assert top_indices(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]
    assert top_indices(torch.tensor([3.0, 1.0, 2.0]), 3) == [0, 1, 2]


def test_collect_importance_reads_the_right_activations(tiny_teacher_dir):
    """A head whose V rows are zero outputs nothing and an MLP channel whose up row is zero is never active: both
    score exactly 0 while the rest do not (the hooks read o_proj's and down_proj's inputs, masked)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[32:64] = 0.0  # head 1 of layer 0 (head_dim 32)
        model.model.layers[1].mlp.up_proj.weight[5] = 0.0
    ids_BT = torch.tensor([[1, 5, 6, 14, 7, 15], [1, 12, 11, 14, 0, 0]])
    mask_BT = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    imp = collect_importance(model, [(ids_BT, mask_BT)])
    assert imp.tokens == 10
    assert imp.heads_LH[0, 1] == 0.0 and (imp.heads_LH[0, 0] > 0) and (imp.heads_LH[1] > 0).all()
    assert imp.mlp_LI[1, 5] == 0.0 and (imp.mlp_LI[0] > 0).all() and (imp.mlp_LI[1] > 0).sum() == 127


def test_every_other_and_lists_parse_and_bad_layers_are_refused():
    t = Teacher("llama", 4, 256, 4, 4, 64, 512)
    assert parse_layers("every-other", 4) == (0, 2) and parse_layers("1,3", 4) == (1, 3)
    assert parse_layers(None, 4) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match=r"layer index \[5\] out of range: the teacher has 4 layers \(0..3\)"):
        check_shape(t, (1, 5), None, None, None)
    with pytest.raises(ValueError, match="once, in increasing order"):
        check_shape(t, (2, 1), None, None, None)
    with pytest.raises(ValueError, match="expected `every-other` or a comma-separated list"):
        parse_layers("odd", 4)
    with pytest.raises(ValueError, match="--mlp 600: keep 1..512"):
        check_shape(t, (0,), None, 600, None)
    with pytest.raises(ValueError, match="multiple of 2"):
        check_shape(Teacher("llama", 4, 256, 4, 2, 64, 512), (0,), 3, None, None)
    qwen = Teacher("qwen2", 4, 256, 4, 4, 64, 512)
    with pytest.raises(ValueError, match="vLLM's Qwen2 derives head_dim"):
        check_shape(qwen, (0,), 2, None, None)
    assert check_shape(qwen, (0,), 2, None, 128).hidden == 128


def test_an_architecture_not_handled_is_refused_by_name(tmp_path, tiny_teacher_dir):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_teacher_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not handled: `student init` prunes llama, qwen2"):
        init_student(folder, tmp_path / "out", layers="0")
    assert not (tmp_path / "out").exists()


def test_pruning_nothing_reproduces_the_teacher(tmp_path, tiny_teacher_dir):
    build = init_student(tiny_teacher_dir, tmp_path / "same")
    assert build["params"] == build["teacher_params"] and build["calibration"] is None
    assert_nested_close(logprobs(tmp_path / "same"), logprobs(tiny_teacher_dir), FP32_BATCH)


def test_a_cut_equals_the_teacher_with_what_it_dropped_zeroed(tmp_path, tiny_teacher_dir):
    """Dropping an MLP channel is zeroing its down_proj column, a head its o_proj columns, a layer both its
    o_proj and down_proj (it adds nothing to the residual stream): the cut must give the same log-probs."""
    from transformers import AutoModelForCausalLM

    build = init_student(tiny_teacher_dir, tmp_path / "cut", layers="1", heads=1, mlp=48,
                         config="configs/toy.yaml", calibration_prompts=32, calibration_new_tokens=4)
    kept = build["kept"]
    assert build["shape"] == {"num_layers": 1, "heads": 1, "kv_heads": 1, "head_dim": 32, "intermediate": 48,
                              "hidden": 64}
    assert build["calibration"]["data"]["task"] == "addition" and build["calibration"]["tokens"] > 32
    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i not in kept["layers"]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
                continue
            for head in set(range(2)) - set(kept["kv_groups"][str(i)]):
                layer.self_attn.o_proj.weight[:, head * 32 : (head + 1) * 32] = 0.0
            dropped = sorted(set(range(128)) - set(kept["mlp_channels"][str(i)]))
            layer.mlp.down_proj.weight[:, dropped] = 0.0
    zeroed = tmp_path / "zeroed"
    model.save_pretrained(str(zeroed))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_teacher_dir / name, zeroed / name)
    assert_nested_close(logprobs(tmp_path / "cut"), logprobs(zeroed), FP32_KERNELS)


def test_width_cut_keeps_the_most_important_channels(tmp_path, tiny_teacher_dir):
    """The kept MLP channels are the top ones by importance measured on the same calibration sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onpolicy.config import load_config
    from onpolicy.prompts import PromptSource, encode_prompts
    from onpolicy.prune.student_init import calibration_batches

    build = init_student(tiny_teacher_dir, tmp_path / "w", mlp=32, hidden=32, config="configs/toy.yaml",
                         calibration_prompts=16, calibration_new_tokens=2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32).eval()
    cfg = load_config("configs/toy.yaml", [])
    prompts = encode_prompts(AutoTokenizer.from_pretrained(str(tiny_teacher_dir)),
                             PromptSource(cfg.data, cfg.eval, cfg.seed).batch(16))
    imp = collect_importance(model, calibration_batches(model, AutoTokenizer.from_pretrained(str(tiny_teacher_dir)),
                                                        prompts, 2))
    for layer in range(2):
        assert build["kept"]["mlp_channels"][str(layer)] == top_indices(imp.mlp_LI[layer], 32)
    assert build["kept"]["hidden_channels"] == top_indices(imp.hidden_C, 32)
    assert build["calibration"]["tokens"] == imp.tokens


def test_cli_refuses_a_layer_out_of_range(tmp_path, tiny_teacher_dir, capsys):
    from onpolicy.cli import main

    assert main(["student", "init", "--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "s"),
                 "--layers", "0,2"]) == 2
    assert "layer index [2] out of range: the teacher has 2 layers (0..1)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_pruned_folder_serves_in_vllm_as_in_transformers(tmp_path, tiny_teacher_dir, ray_session):
    """Depth, heads, MLP and embedding channels all cut (hidden 32 with head_dim 32 kept: config.head_dim
    must be read); a real vLLM engine (a run's local teacher in its Ray actor: `teacher.backend=vllm`) loads
    it and scores it as transformers does. The suite's one engine start for this."""
    from onpolicy.config import load_config
    from onpolicy.teacher.factory import open_teacher

    folder = tmp_path / "pruned"
    init_student(tiny_teacher_dir, folder, layers="1", heads=1, mlp=64, hidden=32, config="configs/toy.yaml",
                 calibration_prompts=16, calibration_new_tokens=2)
    cfg = load_config(None, [f"teacher.model={folder}", "teacher.backend=vllm"])
    teacher = open_teacher(cfg.teacher, seed=cfg.seed, resources=cfg.resources)
    try:
        served = teacher.score(ITEMS)
    finally:
        teacher.close()
    assert_nested_close([s.logprobs for s in served], logprobs(folder), FP32_KERNELS)

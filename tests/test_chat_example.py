"""The chat example's builder (scripts/build_chat_example.py): its data set, tokenizer and models.

The models are built at the small size (seconds); the full build and the chat-lora run are
measured in the README, not here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from onpolicy.chat_example.build import FULL, SMALL, SPLIT_FILES, build_chat_example
from onpolicy.chat_example.problems import make_dataset, read_parquet, write_parquet

ROOT = Path(__file__).resolve().parents[1]
# vLLM's CPU attention supports these head sizes only.
VLLM_CPU_HEAD_DIMS = {32, 64, 80, 96, 112, 128}


def _expected_answer(user: str) -> int:
    """The answer from the problem's wording alone (written apart from the generator's templates)."""
    a, b = (int(n) for n in re.findall(r"\d+", user))
    if re.search(r"\b(minus|gives away|takes)\b", user):
        return a - b
    if re.search(r"\b(times|in each)\b", user):
        return a * b
    assert re.search(r"\b(plus|more|in all|and \d+ \w+ on)\b", user), user
    return a + b


def test_dataset_is_deterministic_and_seeded():
    assert make_dataset(200, 20, seed=3) == make_dataset(200, 20, seed=3)
    assert make_dataset(200, 20, seed=3) != make_dataset(200, 20, seed=4)


def test_rows_are_well_formed_conversations_with_correct_answers():
    train, heldout = make_dataset(2000, 200, seed=0)
    assert len(train) == 2000 and len(heldout) == 200
    with_system = 0
    for row in train + heldout:
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"]), roles
        with_system += roles[0] == "system"
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
        assert row["messages"][-1]["content"] == row["answer"]
        assert int(row["answer"]) == _expected_answer(row["messages"][-2]["content"]) >= 0
    assert 0.3 < with_system / len(train + heldout) < 0.7  # both shapes of conversation occur
    # Held-out problems are unseen: no held-out question appears in training.
    assert not {r["messages"][-2]["content"] for r in heldout} & {r["messages"][-2]["content"] for r in train}
    assert len({r["messages"][-2]["content"] for r in heldout}) == len(heldout)


def test_parquet_round_trip_and_split_names_datasets_reads(tmp_path):
    from datasets import load_dataset

    train, heldout = make_dataset(50, 10, seed=0)
    write_parquet(train, tmp_path / SPLIT_FILES["train"])
    write_parquet(heldout, tmp_path / SPLIT_FILES["test"])
    assert read_parquet(tmp_path / SPLIT_FILES["train"]) == train
    ds = load_dataset(str(tmp_path))  # a data folder, as data.source names it
    assert set(ds) == {"train", "test"}
    assert ds["test"].to_list() == heldout


def test_committed_data_matches_the_generator():
    """examples/chat/data is what the build writes (rerunning the script leaves it unchanged)."""
    train, heldout = make_dataset(FULL.n_train, FULL.n_heldout, FULL.seed)
    data = ROOT / "examples/chat/data"
    assert read_parquet(data / SPLIT_FILES["train"]) == train
    assert read_parquet(data / SPLIT_FILES["test"]) == heldout
    assert sum((data / f).stat().st_size for f in SPLIT_FILES.values()) < 300_000  # small enough to commit


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("chat")
    logs: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script does: tiny matmuls on a shared machine, where more threads only spin
    try:
        info = build_chat_example(out / "models", out / "data", spec=SMALL, log=logs.append)
    finally:
        torch.set_num_threads(threads)
    return out, info, logs


def test_tokenizer_has_chatml_template_eos_and_round_trips(built):
    from transformers import AutoTokenizer

    out, _, _ = built
    tok = AutoTokenizer.from_pretrained(str(out / "models/student"))
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None
    assert 256 < len(tok) <= SMALL.vocab_size
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    conv = [{"role": "system", "content": "Answer with a single number."},
            {"role": "user", "content": "What is 12 minus 5?"}]
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nAnswer with a single number.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 12 minus 5?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[0] != tok.eos_token_id
    # Digits are tokens of their own (Qwen2's split), so "12" is two tokens.
    assert tok.convert_ids_to_tokens(tok("12", add_special_tokens=False)["input_ids"]) == ["1", "2"]
    for row in read_parquet(out / "data" / SPLIT_FILES["train"])[:100]:
        for m in row["messages"]:
            assert tok.decode(tok(m["content"], add_special_tokens=False)["input_ids"]) == m["content"]


def test_models_load_in_transformers_as_qwen2_with_vllm_head_dims(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out, info, _ = built
    params = {}
    for name in ("teacher", "student"):
        path = out / "models" / name
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path))
        cfg = model.config
        assert cfg.model_type == "qwen2"
        assert cfg.head_dim >= 32 and cfg.head_dim in VLLM_CPU_HEAD_DIMS
        assert cfg.hidden_size // cfg.num_attention_heads == cfg.head_dim
        assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
        assert GenerationConfig.from_pretrained(str(path)).eos_token_id == tok.eos_token_id
        ids = torch.tensor([tok("What is 2 plus 3?", add_special_tokens=False)["input_ids"]])
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
        params[name] = sum(p.numel() for p in model.parameters())
        assert params[name] == info[name]["params"]
    assert params["teacher"] > params["student"]
    # Teacher and student share one tokenizer (the run refuses a pair whose fingerprints differ).
    assert (out / "models/teacher/tokenizer.json").read_bytes() == (out / "models/student/tokenizer.json").read_bytes()


def test_a_second_build_reuses_the_models(built):
    out, _, _ = built
    weights = out / "models/teacher/model.safetensors"
    before = weights.stat().st_mtime_ns
    logs: list[str] = []
    build_chat_example(out / "models", out / "data", spec=SMALL, log=logs.append)
    assert weights.stat().st_mtime_ns == before
    assert sum("up to date" in line for line in logs) == 4  # two data files, two models


def test_the_full_size_pair_fits_vllm_cpu_and_the_teacher_is_larger():
    from onpolicy.kit.spec import hf_config

    class _Tok:  # only the sizes and ids hf_config reads (no BOS, as the chat tokenizer)
        bos_token_id, eos_token_id, pad_token_id = None, 2, 0

        def __len__(self):
            return FULL.vocab_size

    teacher, student = FULL.models
    for spec in FULL.models:
        cfg = hf_config(spec, _Tok())
        assert cfg.head_dim in VLLM_CPU_HEAD_DIMS and cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert teacher.num_layers * teacher.hidden > student.num_layers * student.hidden
    assert teacher.steps > student.steps


def test_script_help_is_fast_and_names_the_next_command():
    res = subprocess.run([sys.executable, str(ROOT / "scripts/build_chat_example.py"), "--help"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "--small" in res.stdout and "onpolicy train configs/chat-lora.yaml" in res.stdout


def test_a_missing_example_model_says_which_script_builds_it(tmp_path):
    from onpolicy.model_dir import require_model_dir

    with pytest.raises(FileNotFoundError, match=r"scripts/build_chat_example\.py"):
        require_model_dir(tmp_path / "examples/chat/models/student", "student")

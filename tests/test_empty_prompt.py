"""A prompt that encodes to no tokens is refused before any engine starts, naming it and where it came from.

The tokenizer is a real `tokenizers` one, as BERT-style vocabularies are built: its normaliser (`BertNormalizer`,
`clean_text`) drops control and format characters, and it adds no BOS, so a prompt of zero-width spaces encodes to
nothing. vLLM would fail on it at the first evaluation ("The decoder prompt cannot be empty")."""

from __future__ import annotations

import json
import shutil

import pytest

from onpolicy.config import load_config
from onpolicy.prompts import PromptSource

INVISIBLE = "\u200b\u200b"  # zero-width spaces: not whitespace to Python, dropped by the normaliser


def dropping_tokenizer(path):
    """A character-level WordLevel tokenizer over digits and arithmetic, saved as a Hugging Face folder."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<pad>", "</s>", *"0123456789+=? abcdefghijklmnopqrstuvwxyz"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True)
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tok.save_pretrained(str(path))
    return tok


@pytest.fixture(scope="module")
def student(tiny_model_dir, tmp_path_factory):
    """The tiny student's weights with the dropping tokenizer (a model folder the run accepts as it is)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("dropping_student")
    for f in tiny_model_dir.iterdir():
        if f.suffix in (".json", ".safetensors") and "token" not in f.name:
            shutil.copy(f, out / f.name)
    dropping_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok(INVISIBLE)["input_ids"] == [] and tok("12+3=")["input_ids"]  # it really drops them
    return out


def test_a_run_refuses_a_jsonl_prompt_with_no_tokens_before_engines_start(student, tiny_teacher_dir, tmp_path):
    from onpolicy.driver import Run

    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8", "split": "heldout"},
             {"prompt": INVISIBLE, "answer": "0", "split": "heldout"}]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    cfg = load_config(None, [f"model.student={student}", f"teacher.model={tiny_teacher_dir}", f"output_dir={out}",
                             "data.task=jsonl", f"data.prompts_path={prompts}", "eval.ood_num_prompts=0"])
    with pytest.raises(ValueError, match="encodes to no tokens") as err:
        Run(cfg, show_progress=False)
    assert f"{prompts}:3:" in str(err.value) and repr(INVISIBLE) in str(err.value)
    assert "Remove or rewrite the prompt" in str(err.value)
    assert not out.exists()  # refused before the teacher or any engine started (they come before the run folder)


def test_a_dataset_row_with_no_tokens_is_named_by_its_row(student, tmp_path):
    import pandas as pd
    from transformers import AutoTokenizer

    rows = [{"question": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]
    rows[5]["question"] = "\u200b"
    pd.DataFrame(rows).to_parquet(tmp_path / "q.parquet")
    cfg = load_config(None, ["data.task=dataset", f"data.source={tmp_path / 'q.parquet'}", "data.prompt_field=question",
                             "data.answer_field=answer", "data.heldout_fraction=0", "eval.num_prompts=4"])
    src = PromptSource(cfg.data, cfg.eval, seed=0)
    with pytest.raises(ValueError, match=r"q\.parquet \(split 'train'\) row 5: the prompt '\\u200b' encodes to no"):
        src.check_lengths(AutoTokenizer.from_pretrained(str(student)), None, "no limit")

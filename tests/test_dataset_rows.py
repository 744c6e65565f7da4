"""Data sources through `datasets` (Parquet, JSONL, dataset folders, streaming), chat templates, stop tokens
and length handling: real files, real `datasets`, real tokenizers; no engine starts here."""

from __future__ import annotations

import time

import pytest
import torch

from onpolicy.chat import (
    CHATML_TEMPLATE,
    compare_chat_templates,
    end_of_turn_ids,
    stop_token_ids,
    with_chat_template,
)
from onpolicy.config import load_config
from onpolicy.learner.batch import build_batch
from onpolicy.prompts import PromptSource, encode_prompts
from onpolicy.types import Rollout, TeacherScores

# A variant that writes a default system prompt when there is none (as Qwen2's template does): the
# probe's first turn is a system turn, so the two differ first at the system prompt's text.
SYSTEM_DEFAULT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nbe brief<|im_end|>\n{% endif %}" + CHATML_TEMPLATE
)
OTHER_MARKER_TEMPLATE = CHATML_TEMPLATE.replace("\n{{ message['content'] }}", ":\n{{ message['content'] }}")


def chat_tokenizer(template: str = CHATML_TEMPLATE):
    """The toy character tokenizer plus lower-case letters, space, `?`, newline and the ChatML markers."""
    from onpolicy.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(list("abcdefghijklmnopqrstuvwxyz ?:\n"))
    return with_chat_template(tok, template)


def conversation(i: int, *, answer: bool = True) -> list[dict]:
    turns = [{"role": "system", "content": "add"}, {"role": "user", "content": f"{i}+{i}="}]
    return turns + ([{"role": "assistant", "content": str(2 * i)}] if answer else [])


def write_parquet(path, rows):
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return path


def dataset_cfg(source, *extra):
    return load_config(None, ["data.task=dataset", f"data.source={source}", "eval.num_prompts=4", *extra])


@pytest.fixture
def chat_parquet(tmp_path):
    rows = [{"messages": conversation(i), "answer": str(2 * i), "id": i} for i in range(40)]
    return write_parquet(tmp_path / "chat.parquet", rows)


def test_parquet_messages_become_rendered_chat_prompts(chat_parquet):
    cfg = dataset_cfg(chat_parquet, "data.messages_field=messages", "data.answer_field=answer")
    src = PromptSource(cfg.data, cfg.eval, seed=0)
    assert src.chat and len(src._train) == 36 and len(src.heldout) == 4  # 10% of 40 held out
    ex = src.next()
    # the final assistant turn is dropped: the student writes it
    assert [r for r, _ in ex.messages] == ["system", "user"] and ex.answer == str(2 * int(ex.prompt.split("+")[0]))
    tok = chat_tokenizer()
    (ids,) = encode_prompts(tok, [ex])
    assert tok.decode(ids) == f"<|im_start|>system\nadd<|im_end|>\n<|im_start|>user\n{ex.prompt}<|im_end|>\n" \
                              "<|im_start|>assistant\n"


def test_heldout_fraction_is_the_same_rows_whatever_the_seed_and_never_trained_on(chat_parquet):
    cfg = dataset_cfg(chat_parquet, "data.messages_field=messages", "data.heldout_fraction=0.25",
                      "eval.num_prompts=100")
    a, b = PromptSource(cfg.data, cfg.eval, seed=0), PromptSource(cfg.data, cfg.eval, seed=1)
    assert len(a.heldout) == 10 and a.heldout == b.heldout
    drawn = a.batch(30)
    assert not {e.prompt for e in drawn} & {e.prompt for e in a.heldout}
    assert len({e.prompt for e in drawn}) == 30  # one epoch: every training row once
    assert [e.prompt for e in drawn] != [e.prompt for e in b.batch(30)]  # shuffled with the run seed


def test_heldout_split_of_a_dataset_folder_is_honoured(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({
        "train": Dataset.from_list([{"text": f"{i}+1=", "sum": str(i + 1)} for i in range(20)]),
        "test": Dataset.from_list([{"text": f"9{i}+9=", "sum": str(90 + i + 9)} for i in range(6)]),
    }).save_to_disk(str(tmp_path / "ds"))
    cfg = dataset_cfg(tmp_path / "ds", "data.prompt_field=text", "data.answer_field=sum", "data.heldout_split=test")
    src = PromptSource(cfg.data, cfg.eval, seed=0)
    assert [e.prompt for e in src.heldout] == ["90+9=", "91+9=", "92+9=", "93+9="]  # eval.num_prompts of them
    assert len(src._train) == 20 and not src.chat  # all of train: the held-out set is another split
    cfg = dataset_cfg(tmp_path / "ds", "data.prompt_field=text", "data.heldout_split=validation")
    with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
        PromptSource(cfg.data, cfg.eval, seed=0)


def test_resume_continues_the_stream_streamed_or_not(chat_parquet):
    for streaming in ("false", "true"):
        cfg = dataset_cfg(chat_parquet, "data.messages_field=messages", f"data.streaming={streaming}")
        full = PromptSource(cfg.data, cfg.eval, seed=3).batch(50)  # past one epoch
        resumed = PromptSource(cfg.data, cfg.eval, seed=3, skip=20)
        assert resumed.batch(30) == full[20:], streaming
    # streamed: the first eval.num_prompts rows are the held-out set and are never trained on
    src = PromptSource(cfg.data, cfg.eval, seed=3)
    assert [e.prompt for e in src.heldout] == ["0+0=", "1+1=", "2+2=", "3+3="]
    assert not {e.prompt for e in src.batch(36)} & {e.prompt for e in src.heldout}


@pytest.mark.parametrize(("rows", "fields", "error"), [
    ([{"messages": conversation(0)}, {"messages": None}], ["messages"], r"row 1: field 'messages' is empty"),
    ([{"messages": conversation(0)}] * 3 + [{"messages": [{"role": "system", "content": "x"},
                                                          {"role": "assistant", "content": "y"}]}],
     ["messages"], r"row 3: field 'messages': the conversation has no user turn"),
    ([{"messages": conversation(0)}, {"messages": [{"role": "user"}]}], ["messages"],
     r"row 1: field 'messages': message 0 \(user\) has no text content"),
    ([{"messages": conversation(0), "answer": "0"}, {"messages": conversation(1), "answer": None}],
     ["messages", "answer"], r"row 1: field 'answer' is empty"),
    ([{"question": "1+1="}], ["messages"], r"no column 'messages' \(data.messages_field\); the columns are question"),
    ([{"text": "1+1="}, {"text": "  "}], ["text"], r"row 1: field 'text' must be a non-empty string"),
])
def test_bad_rows_are_refused_naming_the_row_and_the_field(tmp_path, rows, fields, error):
    source = write_parquet(tmp_path / "bad.parquet", rows)
    kinds = {"messages": "data.messages_field=messages", "text": "data.prompt_field=text",
             "answer": "data.answer_field=answer"}
    cfg = dataset_cfg(source, *(kinds[f] for f in fields))
    with pytest.raises(ValueError, match=error):
        PromptSource(cfg.data, cfg.eval, seed=0)


def test_a_jsonl_line_that_is_not_an_object_is_named_by_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1="}\n["1+1=", "2"]\n')
    cfg = dataset_cfg(f, "data.prompt_field=prompt")
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected a JSON object \(a row\), got a list"):
        PromptSource(cfg.data, cfg.eval, seed=0)
    f.write_text('{"prompt": "1+1="}\n{"prompt": "2+2=", "answer": "4"}\n')
    cfg = dataset_cfg(f, "data.prompt_field=prompt", "data.answer_field=answer")
    with pytest.raises(ValueError, match="row 0: field 'answer' is empty"):
        PromptSource(cfg.data, cfg.eval, seed=0)


def test_an_over_long_chat_prompt_is_filtered_with_a_count_or_refused(tmp_path):
    rows = [{"messages": conversation(i)} for i in range(20)]
    rows[5] = {"messages": [{"role": "user", "content": "1" * 60}]}
    source = write_parquet(tmp_path / "long.parquet", rows)
    tok = chat_tokenizer()
    cfg = dataset_cfg(source, "data.messages_field=messages", "data.heldout_fraction=0")
    with pytest.raises(ValueError, match="1 training prompt.* longer than 40 tokens.*first has 79 tokens"):
        PromptSource(cfg.data, cfg.eval, seed=0).check_lengths(tok, 40, "the student's max length")
    cfg = dataset_cfg(source, "data.messages_field=messages", "data.heldout_fraction=0", "data.skip_long_prompts=true")
    src = PromptSource(cfg.data, cfg.eval, seed=0)
    src.check_lengths(tok, 40, "the student's max length")
    assert src.skipped_long == 1 and len(src._train) == 19
    assert all(len(ids) <= 40 for ids in encode_prompts(tok, src.batch(40)))
    # streamed: filtered (and counted) as the prompts are drawn
    cfg = dataset_cfg(source, "data.messages_field=messages", "data.heldout_fraction=0", "data.streaming=true",
                      "data.skip_long_prompts=true")
    src = PromptSource(cfg.data, cfg.eval, seed=0)
    src.check_lengths(tok, 40, "the student's max length")
    assert len({e.prompt for e in src.batch(19)}) == 19 and src.skipped_long == 1


def test_template_mismatch_names_the_first_differing_token():
    same = compare_chat_templates(chat_tokenizer(), chat_tokenizer())
    assert same is None
    msg = compare_chat_templates(chat_tokenizer(), chat_tokenizer(OTHER_MARKER_TEMPLATE))
    # "<|im_start|>system\n..." vs "<|im_start|>system:\n...": position 7, after the role name
    assert "first difference at token 7: student '\\n' (id" in msg and "teacher ':' (id" in msg
    no_template = chat_tokenizer()
    no_template.chat_template = None
    assert "has no chat template" in compare_chat_templates(chat_tokenizer(), no_template)


def test_stop_tokens_are_eos_plus_the_end_of_turn_token():
    tok = chat_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok) == [im_end]
    assert stop_token_ids(tok, None, chat=True) == sorted([tok.eos_token_id, im_end])
    assert stop_token_ids(tok, None, chat=False) == [tok.eos_token_id]
    assert stop_token_ids(tok, ["<|im_start|>"], chat=True) == sorted([tok.eos_token_id, im_end - 1])
    with pytest.raises(ValueError, match=r"rollout.stop_tokens: \['<\|eot_id\|>'\] are not tokens"):
        stop_token_ids(tok, ["<|eot_id|>"], chat=True)


def test_mask_truncated_leaves_capped_completions_out_of_the_loss():
    rollouts = [Rollout(prompt_ids=[1, 5], completion_ids=[6, 7], sampler_logprobs=[-1.0, -1.0], policy_version=0,
                        finish_reason=reason) for reason in ("stop", "length")]
    scores = [TeacherScores(logprobs=[-0.5, -0.5])] * 2
    kept = build_batch(rollouts, scores, pad_id=0)
    masked = build_batch(rollouts, scores, pad_id=0, mask_truncated=True)
    assert kept.mask_BT.sum().item() == 4 and masked.mask_BT.sum().item() == 2
    assert torch.equal(masked.mask_BT[0], kept.mask_BT[0]) and masked.mask_BT[1].sum().item() == 0


def test_config_requires_a_source_and_one_field():
    from onpolicy.config import ConfigError

    with pytest.raises(ConfigError, match="data.source is required"):
        load_config(None, ["data.task=dataset", "data.prompt_field=p"])
    with pytest.raises(ConfigError, match="exactly one of data.prompt_field"):
        load_config(None, ["data.task=dataset", "data.source=x.parquet"])


def test_template_mismatch_is_refused_before_anything_starts(tmp_path, tiny_model_factory, chat_parquet):
    """Through the driver: a local teacher whose template differs is refused before Ray or an engine starts;
    data.chat_template pointing at the teacher's template makes the two agree."""
    from onpolicy.chat import load_student_tokenizer
    from onpolicy.driver import Run
    from onpolicy.teacher.fingerprint import TeacherIncompatible, load_tokenizer

    student, teacher = tmp_path / "student", tmp_path / "teacher"
    for path, template in ((student, CHATML_TEMPLATE), (teacher, SYSTEM_DEFAULT_TEMPLATE)):
        tiny_model_factory(path)
        chat_tokenizer(template).save_pretrained(str(path))
    cfg = load_config(None, [f"model.student={student}", f"teacher.model={teacher}", f"output_dir={tmp_path / 'run'}",
                             "data.task=dataset", f"data.source={chat_parquet}", "data.messages_field=messages"])
    t0 = time.monotonic()
    # without a system turn the teacher writes its default one: "<|im_start|>user" vs "<|im_start|>system"
    with pytest.raises(TeacherIncompatible, match=r"first difference at token 1: student 'u' \(id \d+\), "
                                                  r"teacher 's' \(id \d+\)"):
        Run(cfg, show_progress=False)
    assert time.monotonic() - t0 < 30 and not (tmp_path / "run").exists()
    (tmp_path / "t.jinja").write_text(SYSTEM_DEFAULT_TEMPLATE)
    overridden = load_student_tokenizer(student, str(tmp_path / "t.jinja"))
    assert compare_chat_templates(overridden, load_tokenizer(teacher)) is None


def test_the_cli_names_the_bad_row_without_a_traceback(tmp_path, tiny_model_dir, tiny_teacher_dir):
    import subprocess
    import sys
    from pathlib import Path

    rows = [{"messages": conversation(0)}, {"messages": conversation(1)},
            {"messages": [{"role": "assistant", "content": "hi"}]}]
    source = write_parquet(tmp_path / "bad.parquet", rows)
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-m", "onpolicy.cli", "train", str(root / "configs/toy.yaml"), "data.task=dataset",
         f"data.source={source}", "data.messages_field=messages", f"model.student={tiny_model_dir}",
         f"teacher.model={tiny_teacher_dir}", f"output_dir={tmp_path / 'run'}"],
        cwd=root, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "row 2: field 'messages': the conversation has no user turn" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_the_documented_data_examples_are_valid_configs():
    """The YAML of docs/data.md ("Data sources and chat templates") and the README's shape of a config."""
    import re
    from pathlib import Path

    import yaml

    from onpolicy.config import config_from_dict

    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs" / "data.md").read_text()
    section = docs[docs.index("## Data sources and chat templates"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    assert config_from_dict(yaml.safe_load(block)).data.messages_field == "messages"
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Your own models and data"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    cfg = config_from_dict(yaml.safe_load(block))
    assert (cfg.data.task, cfg.data.messages_field, cfg.teacher.kind) == ("dataset", "messages", "local")


def test_a_streamed_bad_row_is_named_when_drawn_and_a_missing_file_before(tmp_path):
    rows = [{"messages": conversation(i)} for i in range(10)]
    rows[7] = {"messages": [{"role": "system", "content": "only"}]}
    source = write_parquet(tmp_path / "s.parquet", rows)
    cfg = dataset_cfg(source, "data.messages_field=messages", "data.streaming=true", "data.heldout_fraction=0")
    src = PromptSource(cfg.data, cfg.eval, seed=0)  # nothing read yet but the schema
    with pytest.raises(ValueError, match=r"streamed row \d+ \(epoch 0\): field 'messages': the conversation has no "
                                         r"user turn"):
        src.batch(10)
    cfg = dataset_cfg("no/such.parquet", "data.messages_field=messages")
    with pytest.raises(FileNotFoundError, match="data.source not found: no/such.parquet"):
        PromptSource(cfg.data, cfg.eval, seed=0)

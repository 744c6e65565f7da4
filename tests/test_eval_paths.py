"""`onpolicy eval` and `onpolicy export --eval` judge a student on the prompts and stop tokens a run uses: the
data set's conversations rendered with `data.chat_template`, completions ending at the template's end-of-turn
token. Both assemble their parts through `onpolicy.stack.check`; here a teacher service at the network
boundary (scripted: it records every sequence it scores) sees what each sends, with a chat template file that
differs from the tokenizer's own, on tiny chat models and real vLLM engines."""

from __future__ import annotations

import shutil

import pytest
from fakes.scripted import Script, make_scripted_teacher_app
from fakes.server import ServerThread

from onpolicy.chat import CHATML_TEMPLATE
from onpolicy.config import load_config
from onpolicy.prompts import encode_prompts
from onpolicy.teacher.fingerprint import describe_model
from tests.test_chat_data_run import build_chat_model
from tests.test_dataset_rows import chat_tokenizer, conversation, write_parquet

pytestmark = pytest.mark.slow

# The run's template: ChatML with a colon after the role where the tokenizer's own template has a newline.
TEMPLATE = CHATML_TEMPLATE.replace("{{ message['role'] }}\n", "{{ message['role'] }}:").replace(
    "<|im_start|>assistant\n", "<|im_start|>assistant:")
assert TEMPLATE != CHATML_TEMPLATE


def scored(script: Script) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [seq for batch in script.scored for seq in batch]


def test_eval_and_export_eval_send_the_runs_prompts_and_stop_at_the_end_of_turn(ray_session, tmp_path):
    from onpolicy.eval_student import eval_student
    from onpolicy.export import compare_students
    from onpolicy.stack import check

    student = build_chat_model(tmp_path / "student", 0)
    copy = tmp_path / "copy"
    shutil.copytree(student, copy)
    rows = [{"messages": conversation(i), "answer": str(2 * i)} for i in range(40)]
    data = write_parquet(tmp_path / "chat.parquet", rows)
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    info = describe_model(student, max_top_k=16)
    scripts = {"eval": Script(), "export": Script()}
    for name, script in scripts.items():
        with ServerThread(make_scripted_teacher_app(script, info=info)) as server:
            cfg = load_config(None, [
                f"model.student={student}", "teacher.kind=service", f"teacher.url={server.url}",
                "data.task=dataset", f"data.source={data}", "data.messages_field=messages",
                "data.answer_field=answer", f"data.chat_template={tmp_path / 'template.jinja'}",
                "data.check_chat_template=false", "rollout.max_new_tokens=16", "eval.num_prompts=8",
                "eval.ood_num_prompts=0"])
            if name == "eval":
                eval_student(cfg, str(student))
            else:
                compare_students(cfg, student, copy)
    checked = check(cfg)
    expected = {tuple(p) for p in encode_prompts(checked.tokenizer, checked.source.heldout)}
    own_template = chat_tokenizer()  # the tokenizer's own template renders other prompts
    assert expected != {tuple(p) for p in encode_prompts(own_template, checked.source.heldout)}
    im_end = checked.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # `onpolicy eval` scores every held-out sample through the configured teacher (here a service), once
    batches = scripts["eval"].scored
    assert sum(n * len(b) for b, n in batches.items()) == len(checked.source.heldout), batches.values()
    for name, script in scripts.items():
        seqs = scored(script)
        assert {p for p, _ in seqs} == expected, name  # the run's prompts, data.chat_template applied
        # every completion ends at the end-of-turn token or the cap, never runs past it
        assert im_end in checked.stop["stop_token_ids"]
        assert all(im_end not in c[:-1] for _, c in seqs), name
        assert any(c and c[-1] == im_end for _, c in seqs), name

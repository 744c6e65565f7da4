"""The toy kit: tokenizer, task splits, the committed teacher/student assets, and build caching.

The accuracy checks run on the committed assets (seconds); retraining is tested with a
one-layer spec and a couple of steps, so the caching logic is covered without real training.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from onpolicy.toy import bpe_teacher
from onpolicy.toy.build import ASSETS_DIR, build_toy_models, is_current
from onpolicy.toy.models import SPECS, STUDENT, TEACHER, ToyModelSpec, greedy_accuracy
from onpolicy.toy.task import AdditionTask
from onpolicy.toy.tokenizer import build_tokenizer


def test_tokenizer_round_trip():
    tok = build_tokenizer()
    ids = tok("12+34=")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) == 1 + len("12+34=")
    assert tok.decode(ids, skip_special_tokens=True) == "12+34="
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0 and len(tok) == 16


def test_task_reverses_answer_and_keeps_heldout_out_of_training():
    task = AdditionTask()
    heldout = task.heldout(256)
    assert len({e.prompt for e in heldout}) == 256
    for ex in heldout[:50]:
        a, b = ex.prompt.rstrip("=").split("+")
        assert ex.answer == str(int(a) + int(b))[::-1]
    banned = {e.prompt for e in heldout}
    stream = task.train_stream(seed=17, exclude=heldout)
    assert not any(next(stream).prompt in banned for _ in range(5000))


@pytest.fixture(scope="module")
def heldout():
    return AdditionTask().heldout(256)


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_assets_are_current_and_loadable(name):
    from transformers import AutoConfig, AutoTokenizer

    folder = ASSETS_DIR / name
    assert is_current(folder, SPECS[name]), (
        f"{folder} is stale for the current spec: run `onpolicy toy build --out toy --force` "
        f"and copy toy/{name} into onpolicy/toy/assets/{name}"
    )
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.head_dim in (32, 64, 80, 96, 112, 128)
    assert cfg.tie_word_embeddings is False and cfg.max_position_embeddings >= 64
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.get_vocab() == build_tokenizer().get_vocab()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        cfg.bos_token_id,
        cfg.eos_token_id,
        cfg.pad_token_id,
    )


def test_teacher_is_accurate(heldout):
    assert greedy_accuracy(ASSETS_DIR / "teacher", heldout) >= 0.95


def test_teacher_holds_a_capability_the_student_lacks():
    """4-digit operands: the teacher learnt them, the student never saw them, no distillation prompt asks
    for them (the OOD split measures whether the capability transfers)."""
    from onpolicy.toy.models import OOD_N
    from onpolicy.toy.task import AdditionTask

    ood = AdditionTask().ood(OOD_N)
    assert greedy_accuracy(ASSETS_DIR / "teacher", ood) >= 0.9
    assert greedy_accuracy(ASSETS_DIR / "student", ood) <= 0.05


def test_teacher_is_calibrated_not_one_hot(heldout):
    """Label smoothing: a wrong digit costs a few nats, not ~15 (what made sampled reverse KL blow up)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS_DIR / "teacher")
    model = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / "teacher")
    ids = torch.tensor([tok(heldout[0].prompt)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    top, worst = logp.max().item(), logp[digits].min().item()
    assert top > -0.2, top  # still confident in its answer
    assert -9.0 < worst < -2.0, worst  # wrong digits keep some mass


def test_student_is_mid_trained_and_knows_the_format(heldout):
    """Part of the skill, well short of the teacher: room for distillation, and a start reverse KL learns from."""
    from onpolicy.toy.models import greedy_decode

    assert 0.45 <= greedy_accuracy(ASSETS_DIR / "student", heldout) <= 0.75
    outs = greedy_decode(ASSETS_DIR / "student", heldout[:64])
    # It emits digits then EOS (greedy_decode strips at EOS), of roughly the right length.
    assert all(o.isdigit() and 1 <= len(o) <= 5 for o in outs)


def test_student_is_smaller_than_teacher():
    assert STUDENT.num_layers * STUDENT.hidden < TEACHER.num_layers * TEACHER.hidden


def test_build_uses_prebuilt_copy(tmp_path):
    from transformers import AutoModelForCausalLM

    lines: list[str] = []
    info = build_toy_models(tmp_path / "toy", log=lines.append)
    assert sum("prebuilt copy" in line for line in lines) == 3  # the teacher, the student, the BPE teacher
    for name in ("teacher", "student"):
        assert info[name]["spec_hash"] == SPECS[name].spec_hash()
        AutoModelForCausalLM.from_pretrained(tmp_path / "toy" / name)
    assert info["teacher-bpe"]["spec_hash"] == bpe_teacher.spec_hash()  # the committed copy is current
    AutoModelForCausalLM.from_pretrained(tmp_path / "toy" / "teacher-bpe")


TINY = ToyModelSpec(
    name="tiny",
    num_layers=1,
    hidden=64,
    heads=2,
    intermediate=64,
    steps=2,
    batch_size=8,
    lr=1e-3,
    warmup_steps=1,
)


def test_spec_hash_changes_with_any_field():
    assert TINY.spec_hash() == dataclasses.replace(TINY).spec_hash()
    assert TINY.spec_hash() != dataclasses.replace(TINY, steps=3).spec_hash()
    assert TINY.spec_hash() != dataclasses.replace(TINY, hidden=128).spec_hash()


def test_build_caches_and_retrains_on_spec_change(tmp_path):
    out, no_assets = tmp_path / "toy", tmp_path / "no_assets"
    lines: list[str] = []
    build_toy_models(out, specs={"tiny": TINY}, assets_dir=no_assets, log=lines.append)
    assert any("training" in line for line in lines)
    first = json.loads((out / "tiny" / "build.json").read_text())

    lines.clear()
    build_toy_models(out, specs={"tiny": TINY}, assets_dir=no_assets, log=lines.append)
    assert any("up to date" in line for line in lines) and not any("training" in line for line in lines)

    lines.clear()
    changed = dataclasses.replace(TINY, steps=3)
    build_toy_models(out, specs={"tiny": changed}, assets_dir=no_assets, log=lines.append)
    assert any("training" in line for line in lines)
    second = json.loads((out / "tiny" / "build.json").read_text())
    assert second["spec_hash"] == changed.spec_hash() != first["spec_hash"]

    lines.clear()
    build_toy_models(out, specs={"tiny": changed}, assets_dir=no_assets, force=True, log=lines.append)
    assert any("--force" in line for line in lines)


def test_the_bpe_teacher_asset_is_current_solves_the_task_and_its_tokenizer_is_the_builders():
    """The committed byte-level BPE teacher (cross-tokenizer distillation): its spec hash is the builder's, its
    tokenizer is what the builder trains from the task's text, and it solves the held-out prompts in its tokens."""
    from onpolicy.kit.build import is_current as kit_current
    from onpolicy.teacher.fingerprint import load_tokenizer, tokenizer_fingerprint

    folder = ASSETS_DIR / "teacher-bpe"
    assert kit_current(folder, bpe_teacher.spec_hash())
    committed = load_tokenizer(folder)
    assert tokenizer_fingerprint(committed) == tokenizer_fingerprint(bpe_teacher.train_bpe_tokenizer())
    assert len(committed) == bpe_teacher.VOCAB_SIZE
    assert tokenizer_fingerprint(committed) != tokenizer_fingerprint(build_tokenizer())  # another tokenizer
    assert bpe_teacher.greedy_accuracy(folder, AdditionTask().heldout(64)) >= 0.95

"""Is this teacher usable for this student? Their tokenizers must be the same.

On-policy distillation compares log-probs token by token (log q(y_t) - log p_T(y_t) for the
*same* token id), so a teacher whose ids mean different strings gives garbage silently. A
fingerprint is a sha256 over the vocabulary (sorted (token, id) pairs) and the special tokens
with their ids; it is cheap to send over HTTP (`GET /v1/info`) and compare.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from onpolicy.model_dir import model_max_len
from onpolicy.types import TeacherInfo


class TeacherIncompatible(ValueError):
    """The teacher cannot score the student's tokens; the message names both and the fix."""


def load_tokenizer(path: str | Path) -> Any:
    """`AutoTokenizer` from a model (or tokenizer-only) folder; FileNotFoundError naming the path if it is missing."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {p}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))


def _special_tokens(tokenizer: Any) -> list[tuple[str, str, int]]:
    named = []
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        tok = getattr(tokenizer, name, None)
        if tok is not None:
            named.append((name, str(tok), int(tokenizer.convert_tokens_to_ids(str(tok)))))
    extra = sorted((str(t), int(i)) for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    return named + [("special", t, i) for t, i in extra]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of the sorted vocabulary and the special tokens/ids of a HF tokenizer."""
    payload = {
        "vocab": sorted((str(t), int(i)) for t, i in tokenizer.get_vocab().items()),
        "special": _special_tokens(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=True).encode()).hexdigest()


def eos_token_ids(model_path: str | Path, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus any extra stop ids in generation_config.json, sorted."""
    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    gen = Path(model_path) / "generation_config.json"
    if gen.is_file():
        extra = json.loads(gen.read_text()).get("eos_token_id")
        if extra is not None:
            ids.update(int(i) for i in (extra if isinstance(extra, list) else [extra]))
    return sorted(ids)


def describe_model(model_path: str | Path, *, max_top_k: int = 0, name: str | None = None,
                   max_model_len: int | None = None) -> TeacherInfo:
    """`TeacherInfo` of a local model folder (what `GET /v1/info` reports for it).

    `vocab_size` is the tokenizer's size (`len(tokenizer)`), not the model's padded logit width;
    `max_model_len` defaults to the config's `max_position_embeddings`.
    """
    tok = load_tokenizer(model_path)
    return TeacherInfo(
        model=name or str(model_path),
        vocab_size=len(tok),
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        eos_token_ids=eos_token_ids(model_path, tok),
        bos_token_id=tok.bos_token_id,
        max_top_k=max_top_k,
        max_model_len=max_model_len if max_model_len is not None else model_max_len(model_path),
    )


PROBE_TEXT = "12+34=46"  # a short text teachers are probed with (EOS check, a scoring probe)
CheckStatus = Literal["pass", "fail", "warn", "skip"]
CheckResult = tuple[str, CheckStatus, str]  # (check name, status, message saying what to change)
FIX = "Distill from a teacher that uses the student's tokenizer (same vocabulary and special tokens)."


def compare_info(student_path: str | Path, teacher: TeacherInfo) -> list[CheckResult]:
    """Tokenizer fingerprint and EOS of a teacher against the student folder's, as check results."""
    student = describe_model(student_path)
    out: list[CheckResult] = []
    if teacher.tokenizer_fingerprint != student.tokenizer_fingerprint:
        out.append(
            (
                "tokenizer",
                "fail",
                (f"teacher {teacher.model!r} and student {str(student_path)!r} have different tokenizers "
                f"(student: vocab size {student.vocab_size}, fingerprint {student.tokenizer_fingerprint[:16]}; "
                f"teacher: vocab size {teacher.vocab_size}, fingerprint {teacher.tokenizer_fingerprint[:16]}). "
                f"Log-probs are compared token id by token id, so the ids must mean the same strings. {FIX}"),
            )
        )
    else:
        out.append(
            (
                "tokenizer",
                "pass",
                (f"same tokenizer fingerprint {teacher.tokenizer_fingerprint[:16]} "
                f"(vocab size {teacher.vocab_size})"),
            )
        )
    if not set(student.eos_token_ids) <= set(teacher.eos_token_ids):
        out.append(
            (
                "eos",
                "fail",
                (f"teacher {teacher.model!r} and student {str(student_path)!r} end sequences differently: student "
                f"EOS ids {student.eos_token_ids}, teacher EOS ids {teacher.eos_token_ids}. The teacher would not "
                f"score the student's end of sequence as an ending. {FIX}"),
            )
        )
    else:
        out.append(
            ("eos", "pass", f"teacher ends sequences at the student's EOS ids {student.eos_token_ids}")
        )
    return out


def raise_on_failures(results: list[CheckResult]) -> None:
    failed = [msg for _, status, msg in results if status == "fail"]
    if failed:
        raise TeacherIncompatible(" ".join(failed))


def check_compatible(student_path: str | Path, teacher: TeacherInfo | str | Path) -> TeacherInfo:
    """Raise `TeacherIncompatible` unless the teacher uses the student's tokenizer and EOS.

    `teacher` is a `TeacherInfo` (from a running teacher) or a model folder. Returns the
    student's own description.
    """
    if not isinstance(teacher, TeacherInfo):
        teacher = describe_model(teacher)
    raise_on_failures(compare_info(student_path, teacher))
    return describe_model(student_path)


def assert_compatible(teacher: Any, student_path: str | Path) -> None:
    """Raise `TeacherIncompatible` unless a running teacher (any kind) fits the student's tokenizer and
    EOS; each kind compares what its API publishes (`Teacher.compatibility`)."""
    raise_on_failures(teacher.compatibility(student_path))

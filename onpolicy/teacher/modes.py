"""Which mode each teacher of a run gets, and why: decided before any engine starts from what the config and
the folders say (`factory.plan_teachers`), printed by `onpolicy teacher check`, recorded in the run's config.yaml
and summary.json.

| the teacher                                  | mode       | what the loss sees                                    |
|----------------------------------------------|------------|-------------------------------------------------------|
| the student's tokenizer (and EOS)            | `token`    | a log-prob (and top-k) per student token, as ever      |
| another tokenizer whose tokens map to bytes  | `span`     | span-aligned log-probs (spans.py); no top-k           |
| text only (`kind=openai`)                    | `sequence` | its samples, re-tokenized: sequence-level KD (sft)     |

A teacher whose tokenizer cannot be mapped to bytes, a full-distribution loss across two vocabularies, a
text-only teacher with a loss that needs scores, and a teacher without a chat template for conversations are
refused here, saying what to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from onpolicy.teacher.fingerprint import TeacherIncompatible, compare_info, describe_model, load_tokenizer
from onpolicy.teacher.token_bytes import check_table, token_byte_table

if TYPE_CHECKING:
    from onpolicy.config import LossBase

Mode = Literal["token", "span", "sequence"]
MODE_NAMES: dict[str, str] = {"token": "token-level", "span": "span-aligned", "sequence": "sequence-level"}


@dataclass(frozen=True)
class TeacherPlan:
    """One teacher of a run: its name and kind, the mode it gets, why, and (span) its tokenizer's folder."""

    name: str
    kind: str
    mode: Mode
    why: str
    tokenizer: str | None = None  # the teacher's tokenizer folder (span mode)
    model: str | None = None  # a local (or self) teacher's folder
    local: bool = False  # a folder of its own the run loads (its length limit and template are read before start)

    def line(self) -> str:
        return f"teacher {self.name} (kind={self.kind}): {MODE_NAMES[self.mode]}: {self.why}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mode_name": MODE_NAMES[self.mode]}


def compare_tokenizers(student_path: str | Path, teacher_folder: str | Path) -> tuple[Mode, str]:
    """`token` when the folder's tokenizer and EOS are the student's; `span` when the tokenizer differs and both
    map tokens to bytes; TeacherIncompatible otherwise (the same tokenizer with other EOS ids, or a tokenizer
    alignment cannot read)."""
    results = compare_info(student_path, describe_model(teacher_folder))
    tokenizer = next(r for r in results if r[0] == "tokenizer")
    if tokenizer[1] == "pass":
        failed = [msg for _, status, msg in results if status == "fail"]
        if failed:
            raise TeacherIncompatible(" ".join(failed))
        return "token", f"the student's tokenizer ({tokenizer[2]})"
    for who, folder in (("the student", student_path), (f"the teacher {teacher_folder}", teacher_folder)):
        tok = load_tokenizer(folder)
        problem = check_table(tok, token_byte_table(tok), who)
        if problem:
            raise TeacherIncompatible(problem)
    s_tok, t_tok = load_tokenizer(student_path), load_tokenizer(teacher_folder)
    return "span", (f"another tokenizer (student: {len(s_tok)} tokens, teacher: {len(t_tok)} tokens): the completion's "
                    "text is re-tokenized for it and aligned on byte offsets; exact reverse KL per shared span")


def check_plan(plan: TeacherPlan, loss: LossBase, chat: bool) -> None:
    """Refuse a loss (or data) the teacher's mode cannot serve, saying what to change."""
    if plan.mode == "span" and loss.needs_topk:
        raise TeacherIncompatible(
            f"teacher {plan.name} has another tokenizer than the student, so its top-k is over another vocabulary "
            f"and loss.kind={loss.kind} (a full-distribution loss) cannot compare the two token by token; sorting "
            "both distributions (GOLD's ULD) ignores which token is which. Use loss.kind=reverse_kl (exact per "
            "aligned span) or loss.kind=sft (docs/teachers.md)")
    if plan.mode == "sequence" and (loss.samples != "teacher" or loss.needs_topk):
        raise TeacherIncompatible(f"teacher {plan.name} returns text only: it can score neither tokens nor text, so "
                                  f"it cannot teach loss.kind={loss.kind}; use loss.kind=sft")
    if plan.mode == "span" and chat and not getattr(load_tokenizer(plan.tokenizer or ""), "chat_template", None):
        raise TeacherIncompatible(f"teacher {plan.name} renders conversations with its own chat template, and its "
                                  f"tokenizer ({plan.tokenizer}) has none: give its folder the template it was "
                                  "trained with")

"""Capabilities kept: the `eval.retention` probe sets, the frozen starting student they are scored against, and
the flag on a drop.

Distillation moves the student toward the teacher on the distillation prompts; a skill those prompts never
ask for can be lost on the way, and nothing else in a run would notice. Each probe set is the held-out split
of any prompt source with answers (a `data` section of its own); at every evaluation the student's greedy
completions give its exact match, and its samples, scored by a frozen copy of the student the run started
from, give its per-token reverse KL to that starting self (0 at the start: how far the skill's distribution
has moved). The copy is a transformers model in this process (`teacher.kind=local`, backend `hf`, opened
through the one teacher factory on first use), the same folder as `model.student`, which a run never
writes to.

`retention_summary` compares each probe set's first and last evaluation: exact match that ends more than
`max_drop` below where it started is flagged (summary.json and the demo's report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from onpolicy.config import EvalConfig, LocalTeacherConfig
from onpolicy.prompts import PromptSource, encoded_length
from onpolicy.types import Example

if TYPE_CHECKING:
    from onpolicy.config import RetentionProbe, RunConfig
    from onpolicy.protocols import Teacher


@dataclass
class ProbeSet:
    name: str
    examples: list[Example]
    max_drop: float


@dataclass
class Retention:
    """The probe sets of a run and the frozen starting student (opened when first scored)."""

    probes: list[ProbeSet]
    start_dir: str  # the starting student's folder
    _reference: Teacher | None = field(default=None, repr=False)

    def reference(self) -> Teacher:
        if self._reference is None:
            from onpolicy.teacher.factory import open_teacher

            self._reference = open_teacher(LocalTeacherConfig(model=self.start_dir, backend="hf"), in_process=True)
        return self._reference

    def close(self) -> None:
        if self._reference is not None:
            self._reference.close()
            self._reference = None


def probe_examples(probe: RetentionProbe, seed: int, where: str) -> list[Example]:
    """The probe's prompts: the first `num_prompts` of its source's held-out split, each with an answer."""
    source = PromptSource(probe.data, EvalConfig(num_prompts=probe.num_prompts, ood_num_prompts=0), seed)
    examples = source.heldout[: probe.num_prompts]
    if not examples:
        raise ValueError(f"{where} ({probe.name}): its data source has no held-out prompts; give it a held-out "
                         "split (data.heldout_split, a `split: heldout` line, or an embedded task)")
    missing = [e for e in examples if e.answer is None]
    if missing:
        raise ValueError(f"{where} ({probe.name}): {len(missing)} of its prompts have no answer (first: "
                         f"{missing[0].prompt[:60]!r}); a retention probe needs answers: set its data.answer_field")
    return examples


def open_retention(cfg: RunConfig, start_dir: str, tokenizer, max_prompt_tokens: int | None,
                   limit_by: str) -> Retention | None:
    """The run's probe sets, built and checked before any engine starts (every prompt has an answer, encodes
    to some tokens and fits `max_prompt_tokens`); None when `eval.retention` is empty."""
    if not cfg.eval.retention:
        return None
    probes = []
    for i, probe in enumerate(cfg.eval.retention):
        where = f"eval.retention[{i}]"
        examples = probe_examples(probe, cfg.seed, where)
        too_long = [e for e in examples if max_prompt_tokens is not None and
                    encoded_length(tokenizer, e) > max_prompt_tokens]
        if too_long:
            raise ValueError(f"{where} ({probe.name}): {len(too_long)} prompt(s) are longer than {max_prompt_tokens} "
                             f"tokens ({limit_by}), the first {too_long[0].prompt[:60]!r}; shorten them or lower "
                             "rollout.max_new_tokens")
        probes.append(ProbeSet(probe.name, examples, probe.max_drop))
    return Retention(probes, start_dir)


def retention_summary(before: dict[str, Any], after: dict[str, Any], probes: list[ProbeSet]) -> dict[str, dict]:
    """Per probe set: exact match before and after, the drop (before - after), the reverse KL to the starting
    student after, and `flagged` when the drop is beyond the probe's `max_drop`. A probe set missing from either
    evaluation (a run resumed from before it was configured) is left out."""
    out = {}
    for p in probes:
        key = f"retention_{p.name}"
        if f"{key}_accuracy" not in before or f"{key}_accuracy" not in after:
            continue
        acc0, acc1 = before[f"{key}_accuracy"], after[f"{key}_accuracy"]
        drop = acc0 - acc1
        out[p.name] = {"accuracy_before": acc0, "accuracy_after": acc1, "drop": drop, "max_drop": p.max_drop,
                       "reverse_kl_to_start_after": after.get(f"{key}_reverse_kl"), "flagged": drop > p.max_drop}
    return out

"""Can this running teacher distill into this student? (`onpolicy teacher check URL --student DIR`)

`check_teacher` runs each check against the live server and reports pass / fail / warn with a
message that says what to change. It never raises for a bad teacher: the report is the answer.
What is compared depends on what the dialect publishes (each adapter's `compatibility`):
- `service`: the tokenizer fingerprint and EOS ids from `GET /v1/info`.
- `vllm`: no fingerprint over the API, so probe: `/tokenize` of fixed strings and of text built
  from the student's whole vocabulary must give the student's ids; every student id must be a
  valid teacher id; each student EOS id must end generation on the teacher.
- `sglang`: nothing to compare over its API: a warning says so.
- `openai` (text only): reachable, and a probe prompt comes back as text; nothing to compare.

The last item says which mode the teacher gets (`teacher/modes.py`): token-level when the tokenizers match,
span-aligned when they differ and `--tokenizer DIR` names the teacher's own (it must be what the server serves,
where the dialect can tell), sequence-level for a text-only endpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from onpolicy.teacher.clients.remote import RemoteTeacher
from onpolicy.teacher.errors import TeacherError, TeacherRequestError, TeacherResponseError
from onpolicy.teacher.factory import REMOTE_KINDS, remote_teacher
from onpolicy.teacher.fingerprint import PROBE_TEXT, CheckStatus, TeacherIncompatible, load_tokenizer
from onpolicy.teacher.modes import MODE_NAMES, compare_tokenizers
from onpolicy.types import ScoreRequestItem, check_top_k

_MARK = {"pass": "PASS", "fail": "FAIL", "warn": "WARN", "skip": "SKIP"}
# A check asks once and gives up quickly: it reports, it does not ride out an outage.
CHECK_CLIENT = {"max_retries": 1, "backoff_base_s": 0.2, "breaker_failures": 100, "wait_when_down": False}


class CheckItem(BaseModel):
    name: str
    status: CheckStatus
    message: str


class CheckReport(BaseModel):
    url: str
    kind: str
    student: str
    items: list[CheckItem] = []

    @property
    def ok(self) -> bool:
        return all(it.status != "fail" for it in self.items)

    def add(self, name: str, status: CheckStatus, message: str) -> None:
        self.items.append(CheckItem(name=name, status=status, message=message))

    def render(self) -> str:
        head = f"teacher {self.url} (kind={self.kind}) vs student {self.student}"
        lines = [head] + [f"  [{_MARK[it.status]}] {it.name}: {it.message}" for it in self.items]
        lines.append(
            "OK: this teacher can distill into this student."
            if self.ok
            else "NOT OK: fix the FAIL items above."
        )
        return "\n".join(lines)


def _probe_item(tok: Any) -> ScoreRequestItem:
    ids = list(tok(PROBE_TEXT)["input_ids"])
    if len(ids) < 2:
        ids = [0] + ids if ids else [0, 0]
    cut = max(1, len(ids) // 2)
    return ScoreRequestItem(prompt_ids=ids[:cut], completion_ids=ids[cut:])


def check_teacher(
    url: str,
    kind: str,
    student_dir: str | Path,
    *,
    api_key: str | None = None,
    top_k: int | None = None,
    timeout_s: float = 30.0,
    connect_to: dict[str, str] | None = None,
    tokenizer: str | Path | None = None,
    endpoint: str = "chat",
) -> CheckReport:
    """Run every check of teacher `url` (dialect `kind`) against the student in `student_dir`; `connect_to`
    pins host names to addresses (see teacher/pinned.py). `tokenizer`: the teacher's own tokenizer folder, when
    it is not the student's (span-aligned); `endpoint`: a text-only teacher's (`chat` or `completions`)."""
    student_path = str(student_dir)
    report = CheckReport(url=url, kind=kind, student=student_path)
    if kind == "openai":
        return _check_text_only(report, url, endpoint, api_key, timeout_s, connect_to)
    try:
        tok = load_tokenizer(student_path)
    except (OSError, ValueError) as err:
        report.add(
            "student",
            "fail",
            f"cannot load the student's tokenizer: {err}. Pass --student DIR, a model folder.",
        )
        return report
    if kind not in REMOTE_KINDS:
        report.add("kind", "fail", f"unknown teacher kind {kind!r}: use one of {', '.join(REMOTE_KINDS)}, openai")
        return report
    if tokenizer is not None:  # the probes are in the teacher's own tokens
        try:
            tok = load_tokenizer(tokenizer)
        except (OSError, ValueError) as err:
            report.add("tokenizer", "fail", f"cannot load the teacher's tokenizer from --tokenizer {tokenizer}: {err}")
            return report
    with remote_teacher(
        kind, url, api_key=api_key, timeout_s=timeout_s, max_wait_s=timeout_s, connect_to=connect_to,
        **CHECK_CLIENT,
    ) as teacher:
        try:
            report.add(
                "reachable", "pass", f"{url} answers as a {kind} teacher serving {teacher.describe()!r}"
            )
        except TeacherRequestError as err:
            hint = (
                " (set the API key: --api-key-env / teacher.api_key_env)" if err.status in (401, 403) else ""
            )
            report.add(
                "reachable", "fail", f"{err}{hint}. Is --kind={kind} the right dialect? {teacher.fix_hint}"
            )
        except (TeacherError, httpx.HTTPError) as err:
            report.add(
                "reachable",
                "fail",
                f"cannot reach {url}: {err}. Check that the server is up, the URL "
                f"(scheme, host, port) and --kind={kind}.",
            )
        if not report.ok:
            for n in ("logprobs", "top_k", "tokenizer"):
                report.add(n, "skip", "not checked: the teacher is not reachable")
            return report
        _check_scoring(report, teacher, tok, top_k)
        try:
            if tokenizer is None:
                for name, status, msg in teacher.compatibility(student_path):
                    report.add(name, status, msg)
            else:  # the server must serve the tokenizer named; the student's is another one
                for name, status, msg in teacher.compatibility(tokenizer):
                    report.add(f"{name} (vs --tokenizer)", status, msg)
        except (TeacherError, httpx.HTTPError) as err:
            report.add("tokenizer", "fail", f"could not compare tokenizers: {err}")
        _add_mode(report, student_path, tokenizer)
    return report


def _add_mode(report: CheckReport, student_path: str, tokenizer: str | Path | None) -> None:
    """The mode a run would give this teacher, and why (teacher/modes.py)."""
    if not report.ok:
        report.add("mode", "skip", "not decided: fix the FAIL items above")
        return
    if tokenizer is None:
        report.add("mode", "pass", f"{MODE_NAMES['token']}: the student's tokenizer; per-token log-probs (and top-k)")
        return
    try:
        mode, why = compare_tokenizers(student_path, tokenizer)
    except TeacherIncompatible as err:
        report.add("mode", "fail", str(err))
        return
    report.add("mode", "pass", f"{MODE_NAMES[mode]}: {why} (teacher.tokenizer={tokenizer})")


def _check_text_only(report: CheckReport, url: str, endpoint: str, api_key: str | None, timeout_s: float,
                     connect_to: dict[str, str] | None) -> CheckReport:
    """A text-only endpoint: reachable, a probe prompt answered with text; sequence-level."""
    from onpolicy.teacher.clients.openai_text import OpenAITextClient

    client = OpenAITextClient(url, endpoint=endpoint, api_key=api_key, timeout_s=timeout_s, max_wait_s=timeout_s,
                              connect_to=connect_to, **CHECK_CLIENT)
    try:
        report.add("reachable", "pass", f"{url} answers as an OpenAI-compatible endpoint serving "
                   f"{client.model_name()!r}")
        (probe,) = client.generate_text([PROBE_TEXT.split("=")[0] + "="], n=1, max_tokens=8, temperature=0.0)
        report.add("text", "pass", f"/v1/{'chat/' if endpoint == 'chat' else ''}completions answers a probe prompt "
                   f"with text ({probe.text!r}); no log-probs are asked for")
        report.add("mode", "pass", f"{MODE_NAMES['sequence']}: text only; the student trains on its samples, "
                   "re-tokenized (loss.kind=sft)")
    except (TeacherError, httpx.HTTPError) as err:
        report.add("reachable" if not report.items else "text", "fail",
                   f"{err}. Is it an OpenAI-compatible endpoint (teacher.endpoint={endpoint})?")
    finally:
        client.close()
    return report


def _check_scoring(report: CheckReport, teacher: RemoteTeacher, tok: Any, top_k: int | None) -> None:
    item = _probe_item(tok)
    n = len(item.completion_ids)
    try:
        got = teacher.score([item])[0].logprobs
        report.add(
            "logprobs",
            "pass",
            f"returns a finite log-prob for each of {n} completion tokens of a probe "
            f"(mean {sum(got) / max(n, 1):.3f})",
        )
    except TeacherResponseError as err:
        report.add(
            "logprobs", "fail", f"does not return log-probs of given tokens: {err}. {teacher.fix_hint}"
        )
        report.add("top_k", "skip", "not checked: no log-probs")
        return
    except TeacherError as err:
        report.add("logprobs", "fail", f"scoring a probe sequence failed: {err}")
        report.add("top_k", "skip", "not checked: no log-probs")
        return
    try:
        cap = teacher.max_top_k()
    except TeacherError as err:
        report.add("top_k", "fail", f"could not learn the top-k the teacher serves: {err}")
        return
    fix = teacher.top_k_fix
    try:
        check_top_k(top_k or 0, cap, "the teacher")
    except ValueError:
        report.add(
            "top_k",
            "fail",
            f"the run asks for top-{top_k} but the teacher serves at most {cap}: "
            f"lower teacher.top_k to {cap} or {fix.replace('K', str(top_k))}",
        )
        return
    k = top_k or min(cap, 5)
    if k == 0:
        report.add("top_k", "pass", "the teacher serves no top-k (fine for loss.kind=reverse_kl)")
        return
    try:
        teacher.score([item], top_k=k)
        report.add("top_k", "pass", f"serves top-k up to {cap}; top-{k} verified on a probe")
    except TeacherError as err:
        report.add(
            "top_k",
            "fail",
            f"top-{k} request failed: {err}. Lower teacher.top_k or {fix.replace('K', str(k))}",
        )

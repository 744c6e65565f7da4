"""Can this running teacher distill into this student? (`onpolicy teacher check URL --student DIR`)

`check_teacher` runs each check against the live server and reports pass / fail / warn with a
message that says what to change. It never raises for a bad teacher: the report is the answer.
`assert_compatible(teacher, student_dir)` is the same tokenizer and EOS comparison for a run
about to start; it raises `TeacherIncompatible` naming both sides.

What is compared depends on what the dialect publishes:
- `service` (and local teachers): the tokenizer fingerprint and EOS ids from `GET /v1/info`.
- `vllm`: no fingerprint over the API, so probe: `/tokenize` of fixed strings and of text built
  from the student's whole vocabulary must give the student's ids; every student id must be a
  valid teacher id; each student EOS id must end generation on the teacher.
- `sglang`: nothing to compare over its API: a warning says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from onpolicy.teacher.fingerprint import TeacherIncompatible, describe_model, load_tokenizer
from onpolicy.teacher.http import TeacherError, TeacherRequestError, TeacherResponseError
from onpolicy.teacher.remote import RemoteTeacher, ServiceTeacher, SGLangTeacher
from onpolicy.teacher.vllm_server import PROBE_TEXTS, VLLMServerTeacher
from onpolicy.types import ScoreRequestItem

Status = Literal["pass", "fail", "warn", "skip"]
_MARK = {"pass": "PASS", "fail": "FAIL", "warn": "WARN", "skip": "SKIP"}
PROBE_TEXT = "12+34=46"


class CheckItem(BaseModel):
    name: str
    status: Status
    message: str


class CheckReport(BaseModel):
    url: str
    kind: str
    student: str
    items: list[CheckItem] = []

    @property
    def ok(self) -> bool:
        return all(it.status != "fail" for it in self.items)

    def add(self, name: str, status: Status, message: str) -> None:
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


def _item(name: str, status: Status, message: str) -> tuple[str, Status, str]:
    return (name, status, message)


def _student_vocab_texts(tok: Any, max_ids: int = 4096, per_text: int = 64) -> list[str]:
    """Text made of the student's non-special tokens (up to `max_ids`, spread over the vocabulary)."""
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    if len(ids) > max_ids:
        step = len(ids) / max_ids
        ids = [ids[int(k * step)] for k in range(max_ids)]
    return [tok.decode(ids[s : s + per_text]) for s in range(0, len(ids), per_text)]


def _probe_item(tok: Any) -> ScoreRequestItem:
    ids = list(tok(PROBE_TEXT)["input_ids"])
    if len(ids) < 2:
        ids = [0] + ids if ids else [0, 0]
    cut = max(1, len(ids) // 2)
    return ScoreRequestItem(prompt_ids=ids[:cut], completion_ids=ids[cut:])


def _compare_vllm_tokenizer(
    teacher: VLLMServerTeacher, tok: Any, student_path: str
) -> list[tuple[str, Status, str]]:
    """Tokenizer, vocabulary and EOS probes of a vLLM server against the student's tokenizer."""
    out: list[tuple[str, Status, str]] = []
    fix = "Use a teacher with the student's tokenizer (same vocabulary and special tokens)."
    model = teacher.model_name()
    mismatch = None
    for text in PROBE_TEXTS:
        theirs, ours = teacher.tokenize(text, add_special_tokens=True), list(tok(text)["input_ids"])
        if theirs != ours:
            mismatch = (text, theirs, ours)
            break
    if mismatch is None:
        for text in _student_vocab_texts(tok):
            theirs = teacher.tokenize(text, add_special_tokens=False)
            ours = list(tok(text, add_special_tokens=False)["input_ids"])
            if theirs != ours:
                mismatch = (text, theirs, ours)
                break
    if mismatch:
        text, theirs, ours = mismatch
        out.append(
            _item(
                "tokenizer",
                "fail",
                f"teacher {model!r} and student {student_path!r} tokenize {text[:60]!r} differently "
                f"(teacher: {theirs[:20]}, student: {ours[:20]}). Log-probs are compared token id by token id. {fix}",
            )
        )
    else:
        out.append(
            _item(
                "tokenizer",
                "pass",
                f"teacher {model!r} tokenizes {len(PROBE_TEXTS)} probe strings and the "
                f"student's whole vocabulary exactly as student {student_path!r}",
            )
        )
    n_student, n_teacher = len(tok), teacher.vocab_size()
    if n_teacher < n_student:
        out.append(
            _item(
                "vocabulary",
                "fail",
                f"teacher {model!r} accepts token ids < {n_teacher}, student "
                f"{student_path!r} has {n_student} tokens: ids {n_teacher}..{n_student - 1} are out of the "
                f"teacher's vocabulary. {fix}",
            )
        )
    else:
        pad = f" (the teacher's model vocabulary is padded to {n_teacher})" if n_teacher > n_student else ""
        out.append(("vocabulary", "pass", f"every student id (< {n_student}) is a teacher id{pad}"))
    eos = [int(i) for i in describe_model(student_path).eos_token_ids]
    prompt = list(tok(PROBE_TEXT)["input_ids"])[:4] or [0]
    not_stopping = [i for i in eos if not teacher.stops_at(i, prompt)]
    if not eos:
        out.append(("eos", "warn", f"student {student_path!r} declares no EOS token; nothing to compare"))
    elif not_stopping:
        out.append(
            _item(
                "eos",
                "fail",
                f"teacher {model!r} does not end generation at the student's EOS ids "
                f"{not_stopping} (student {student_path!r} EOS ids: {eos}). {fix}",
            )
        )
    else:
        out.append(("eos", "pass", f"teacher ends generation at the student's EOS ids {eos}"))
    return out


def _compare_info(teacher: RemoteTeacher, student_path: str) -> list[tuple[str, Status, str]]:
    if isinstance(teacher, VLLMServerTeacher):
        return _compare_vllm_tokenizer(teacher, load_tokenizer(student_path), student_path)
    info = teacher.info()
    if isinstance(teacher, SGLangTeacher) or info.tokenizer_fingerprint.startswith("sglang-unverified"):
        return [
            _item(
                "tokenizer",
                "warn",
                f"SGLang does not publish its tokenizer; make sure {info.model!r} uses "
                f"the student's tokenizer ({student_path!r}) -- this cannot be checked over its API",
            )
        ]
    student = describe_model(student_path)
    out: list[tuple[str, Status, str]] = []
    if info.tokenizer_fingerprint != student.tokenizer_fingerprint:
        out.append(
            _item(
                "tokenizer",
                "fail",
                f"teacher {info.model!r} and student {student_path!r} have different "
                f"tokenizers (teacher: vocab size {info.vocab_size}, fingerprint {info.tokenizer_fingerprint[:16]}; "
                f"student: vocab size {student.vocab_size}, fingerprint {student.tokenizer_fingerprint[:16]}). "
                f"Serve a teacher with the student's tokenizer.",
            )
        )
    else:
        out.append(
            _item(
                "tokenizer",
                "pass",
                f"same tokenizer fingerprint {info.tokenizer_fingerprint[:16]} "
                f"(vocab size {info.vocab_size})",
            )
        )
    if not set(student.eos_token_ids) <= set(info.eos_token_ids):
        out.append(
            _item(
                "eos",
                "fail",
                f"teacher {info.model!r} EOS ids {info.eos_token_ids} do not include student "
                f"{student_path!r} EOS ids {student.eos_token_ids}. Serve a teacher that ends sequences "
                f"with the student's EOS token.",
            )
        )
    else:
        out.append(
            ("eos", "pass", f"teacher ends sequences at the student's EOS ids {student.eos_token_ids}")
        )
    return out


def assert_compatible(teacher: Any, student_dir: str | Path) -> None:
    """Raise `TeacherIncompatible` unless `teacher` (remote or local) fits the student's tokenizer/EOS."""
    if not isinstance(teacher, RemoteTeacher):
        from onpolicy.teacher.fingerprint import check_compatible

        check_compatible(student_dir, teacher.info())
        return
    failed = [msg for _, status, msg in _compare_info(teacher, str(student_dir)) if status == "fail"]
    if failed:
        raise TeacherIncompatible(" ".join(failed))


def _fix_for(kind: str) -> str:
    return {
        "vllm": "Serve the teacher with vLLM's OpenAI server (/v1/completions with the `prompt_logprobs` "
        "extension) and do not put a proxy in front that strips it.",
        "sglang": "Serve the teacher with SGLang's native /generate endpoint (return_logprob, logprob_start_len).",
        "service": "Serve the teacher with `python -m services.teacher --model DIR` (POST /v1/score).",
    }.get(kind, "")


def check_teacher(
    url: str,
    kind: str,
    student_dir: str | Path,
    *,
    api_key: str | None = None,
    top_k: int | None = None,
    timeout_s: float = 30.0,
) -> CheckReport:
    """Run every check of teacher `url` (dialect `kind`) against the student in `student_dir`."""
    student_path = str(student_dir)
    report = CheckReport(url=url, kind=kind, student=student_path)
    try:
        tok = load_tokenizer(student_path)
    except (OSError, ValueError) as err:
        report.add(
            "student",
            "fail",
            f"cannot load the student's tokenizer: {err}. Pass --student DIR, a model folder.",
        )
        return report
    cls = {"service": ServiceTeacher, "vllm": VLLMServerTeacher, "sglang": SGLangTeacher}.get(kind)
    if cls is None:
        report.add("kind", "fail", f"unknown teacher kind {kind!r}: use service, vllm or sglang")
        return report
    names = ["logprobs", "top_k", "tokenizer"]
    with cls(
        url,
        api_key=api_key,
        timeout_s=timeout_s,
        max_retries=1,
        backoff_base_s=0.2,
        breaker_failures=100,
        max_wait_s=timeout_s,
    ) as teacher:
        try:
            desc = teacher.model_name() if isinstance(teacher, VLLMServerTeacher) else teacher.info().model
            report.add("reachable", "pass", f"{url} answers as a {kind} teacher serving {desc!r}")
        except TeacherRequestError as err:
            hint = " (set the API key: --api-key / teacher.api_key_env)" if err.status in (401, 403) else ""
            report.add(
                "reachable", "fail", f"{err}{hint}. Is --kind={kind} the right dialect? {_fix_for(kind)}"
            )
        except (TeacherError, httpx.HTTPError) as err:
            report.add(
                "reachable",
                "fail",
                f"cannot reach {url}: {err}. Check that the server is up, the URL "
                f"(scheme, host, port) and --kind={kind}.",
            )
        if not report.ok:
            for n in names:
                report.add(n, "skip", "not checked: the teacher is not reachable")
            return report
        _check_scoring(report, teacher, tok, kind, top_k)
        try:
            for name, status, msg in _compare_info(teacher, student_path):
                report.add(name, status, msg)
        except (TeacherError, httpx.HTTPError) as err:
            report.add("tokenizer", "fail", f"could not compare tokenizers: {err}")
    return report


def _check_scoring(
    report: CheckReport, teacher: RemoteTeacher, tok: Any, kind: str, top_k: int | None
) -> None:
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
        report.add("logprobs", "fail", f"does not return log-probs of given tokens: {err}. {_fix_for(kind)}")
        report.add("top_k", "skip", "not checked: no log-probs")
        return
    except TeacherError as err:
        report.add("logprobs", "fail", f"scoring a probe sequence failed: {err}")
        report.add("top_k", "skip", "not checked: no log-probs")
        return
    try:
        cap = teacher.max_top_k() if isinstance(teacher, VLLMServerTeacher) else teacher.info().max_top_k
    except TeacherError as err:
        report.add("top_k", "fail", f"could not learn the top-k the teacher serves: {err}")
        return
    fix = "restart vLLM with --max-logprobs K" if kind == "vllm" else "lower teacher.top_k"
    if top_k is not None and top_k > cap:
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

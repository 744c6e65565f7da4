"""An external vLLM OpenAI-compatible server as a teacher (checked against vLLM 0.32's own source).

Scoring request, one per chunk of sequences (vLLM takes a list of token-id lists as `prompt`):

    POST /v1/completions
    {"model": M, "prompt": [[ids of prompt+completion], ...], "max_tokens": 1, "temperature": 0,
     "prompt_logprobs": k, "return_token_ids": true}

`prompt_logprobs` is a vLLM extension: `choices[i].prompt_logprobs` is a list with one entry per
input token, `null` for the first and otherwise `{"<id>": {"logprob", "rank", "decoded_token"}}`
holding the actual token at that position plus the top-k (k=0: the actual token only); -inf is
sent as -9999. `return_token_ids` makes vLLM echo `choices[i].prompt_token_ids`, which we check.
The server must allow k: `--max-logprobs` (default 20) caps it, with HTTP 400 above.

Generation request, one per chunk of prompts (one per prompt when seeded, see `_generate_chunk`):

    POST /v1/completions
    {"model": M, "prompt": [[prompt ids], ...], "max_tokens": N, "temperature": T, "top_p": P, "n": n,
     "seed": S, "logprobs": 0, "return_token_ids": true, "top_k": 0, "min_p": 0, "repetition_penalty": 1}

Read off vLLM 0.32's `entrypoints/openai/completion/serving.py`
(`request_output_to_completion_response`, `_create_completion_logprobs`) and `protocol.py`
(`CompletionResponseChoice`): prompt i's j-th sample is `choices[i * n + j]` (`index` counts choices
over the whole request); `token_ids` (with `return_token_ids`) are the sampled ids, EOS included;
`logprobs.token_logprobs[t]` is the log-prob of `token_ids[t]` (raw: the server's default
`logprobs_mode`; -inf sent as -9999); `finish_reason` is one of `FINISH_REASON_STRINGS`
(`v1/engine/__init__.py`): `stop` (EOS or a stop id), `length` (max_tokens, or max_model_len
reached), `repetition` (the server's repetition detector cut it: we call that `length`), `abort`,
`error` (refused). Fields left out of a request take the model's generation_config.json defaults
(`get_diff_sampling_param`), hence the explicit top_k, min_p and repetition_penalty. vLLM refuses
n > 1 when greedy (`SamplingParams._verify_greedy_sampling`): temperature 0 asks for one and repeats it.

vLLM publishes no tokenizer fingerprint, so `info()` probes: `POST /tokenize` of fixed probe
strings (fingerprint `vllm-probe:<sha256 of the tokenizations>`, comparable with
`probe_fingerprint(tokenizer)` of a local tokenizer), the vocabulary size from which token ids
`/v1/completions` rejects as "out of vocabulary", the top-k cap from the 400 message, and
end-of-sequence ids via `stops_at` (forcing a token with `allowed_token_ids`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from onpolicy.teacher.clients.remote import RemoteTeacher
from onpolicy.teacher.errors import TeacherRequestError
from onpolicy.teacher.fingerprint import FIX, PROBE_TEXT, CheckResult, describe_model, load_tokenizer
from onpolicy.teacher.local.engines import repeat_greedy
from onpolicy.types import GeneratedCompletion, ScoreRequestItem, TeacherInfo, TeacherScores, rank_top_k

# vLLM's finish reasons -> ours; anything else (abort, error, null) fails the call.
FINISH_REASONS = {"stop": "stop", "length": "length", "repetition": "length"}

PROBE_TEXTS = [
    "Hello, world! 12+34=46",
    "The quick brown fox jumps over the lazy dog.\n",
    "  leading spaces,\ttabs\nand newlines  ",
    "0123456789 +-*/=()[]{}<>",
    "naïve café, Straße, 東京, привет, 🙂",
    "def f(x):\n    return x ** 2  # square",
]


def probe_fingerprint(tokenize) -> str:
    """`vllm-probe:` + sha256 of how `tokenize(text)` (with special tokens) splits `PROBE_TEXTS`.

    `tokenize` is a callable text -> ids, or a Hugging Face tokenizer.
    """
    if not callable(tokenize) or hasattr(tokenize, "get_vocab"):
        tok = tokenize
        tokenize = lambda text: list(tok(text)["input_ids"])
    payload = [list(map(int, tokenize(t))) for t in PROBE_TEXTS]
    return "vllm-probe:" + hashlib.sha256(json.dumps(payload).encode()).hexdigest()


class VLLMServerTeacher(RemoteTeacher):
    """Scores with `prompt_logprobs` and samples with `logprobs=0` on an external vLLM server; `model` from
    `GET /v1/models` if None."""

    kind = "vllm"
    info_path = "/v1/models"
    fix_hint = (
        "Serve the teacher with vLLM's OpenAI server (/v1/completions with the `prompt_logprobs` "
        "extension) and do not put a proxy in front that strips it."
    )
    top_k_fix = "restart vLLM with --max-logprobs K"

    def __init__(self, url: str, *, model: str | None = None, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._model = model
        self._vocab_size: int | None = None
        self._max_top_k: int | None = None

    # -- probes ---------------------------------------------------------------------------------

    def model_name(self) -> str:
        if self._model is None:
            body = self.client.get_json("/v1/models")
            data = body.get("data") if isinstance(body, dict) else None
            if not data or "id" not in data[0]:
                raise self._bad("GET /v1/models lists no model")
            self._model = str(data[0]["id"])
        return self._model

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = self.client.post_json(
            "/tokenize",
            {"model": self.model_name(), "prompt": text, "add_special_tokens": add_special_tokens},
        )
        if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
            raise self._bad("POST /tokenize returned no tokens")
        return [int(t) for t in body["tokens"]]

    def _complete(self, prompt: list[int], **extra: Any) -> dict[str, Any]:
        body = {"model": self.model_name(), "prompt": prompt, "max_tokens": 1, "temperature": 0.0, **extra}
        return self.client.post_json("/v1/completions", body)

    def accepts_token_id(self, token_id: int) -> bool:
        """Whether the server takes `token_id` as input (False: 'out of vocabulary')."""
        try:
            self._complete([token_id])
        except TeacherRequestError as err:
            if "out of vocabulary" in err.body:
                return False
            raise
        return True

    def vocab_size(self) -> int:
        """Number of ids the server accepts (max of tokenizer and model vocab, as vLLM validates)."""
        if self._vocab_size is None:
            lo, hi = 0, 1  # invariant after the loop: lo accepted, hi rejected
            if not self.accepts_token_id(0):
                raise self._bad("token id 0 is rejected as out of vocabulary")
            while self.accepts_token_id(hi):
                lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.accepts_token_id(mid) else (lo, mid)
            self._vocab_size = hi
        return self._vocab_size

    def max_top_k(self) -> int:
        """Most `prompt_logprobs` the server allows (its `--max-logprobs`; vocab size if unlimited)."""
        if self._max_top_k is None:
            vocab = self.vocab_size()
            try:
                self._complete([0, 0], prompt_logprobs=vocab)
                self._max_top_k = vocab
            except TeacherRequestError as err:
                m = re.search(r"max allowed:\s*(-?\d+)", err.body)
                if not m:
                    raise
                self._max_top_k = vocab if int(m.group(1)) < 0 else int(m.group(1))
        return self._max_top_k

    def stops_at(self, token_id: int, prompt: list[int]) -> bool:
        """Whether generation ends at `token_id` (EOS or a default stop id) after `prompt`."""
        out = self._complete(prompt, max_tokens=2, allowed_token_ids=[token_id])
        choices = out.get("choices") or [{}]
        return choices[0].get("finish_reason") == "stop"

    def describe(self) -> str:
        return self.model_name()

    def known_vocab_size(self) -> int | None:
        return self._vocab_size

    def compatibility(self, student_path: str | Path) -> list[CheckResult]:
        return compare_by_probes(self, str(student_path))

    def info(self) -> TeacherInfo:
        if self._info is None:
            bos = self.tokenize("", add_special_tokens=True)
            self._info = TeacherInfo(
                model=self.model_name(),
                vocab_size=self.vocab_size(),
                tokenizer_fingerprint=probe_fingerprint(self.tokenize),
                eos_token_ids=[],  # not published by vLLM; check.py probes the student's EOS with stops_at
                bos_token_id=bos[0] if len(bos) == 1 else None,
                max_top_k=self.max_top_k(),
            )
        return self._info

    # -- scoring --------------------------------------------------------------------------------

    def _score_chunk(self, items: list[ScoreRequestItem], top_k: int, offset: int) -> list[TeacherScores]:
        seqs = [list(it.prompt_ids) + list(it.completion_ids) for it in items]
        body = self._complete(seqs, prompt_logprobs=top_k, return_token_ids=True)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != len(items):
            n = len(choices) if isinstance(choices, list) else 0
            raise self._bad(f"sent {len(items)} prompts to /v1/completions, got {n} choices")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        return [
            self._parse_choice(c, it, seq, top_k, offset + i)
            for i, (c, it, seq) in enumerate(zip(choices, items, seqs))
        ]

    def _parse_choice(
        self, choice: dict[str, Any], item: ScoreRequestItem, seq_ids: list[int], top_k: int, seq: int
    ) -> TeacherScores:
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != seq_ids:
            j = next(
                (j for j, (a, b) in enumerate(zip(seq_ids, echoed)) if a != b), min(len(seq_ids), len(echoed))
            )
            raise self._bad(
                f"sequence {seq}: the server echoed different token ids than were sent "
                f"(first difference at position {j}; sent {len(seq_ids)} ids, echoed {len(echoed)})"
            )
        plp = choice.get("prompt_logprobs")
        if plp is None:
            raise self._bad(
                f"sequence {seq}: the response has no prompt_logprobs, so the server does not return "
                f"log-probs of given tokens (needs vLLM's `prompt_logprobs` extension on /v1/completions)"
            )
        n_p, comp = len(item.prompt_ids), list(item.completion_ids)
        if len(plp) != len(seq_ids):
            raise self._bad(
                f"sequence {seq}: expected {len(seq_ids)} prompt_logprobs entries, got {len(plp)}"
            )
        logprobs: list[float] = []
        tops: list[list[tuple[int, float]]] | None = [] if top_k else None
        for t, tok in enumerate(comp):
            entry = plp[n_p + t]
            if not isinstance(entry, dict) or str(tok) not in entry:
                raise self._bad(f"sequence {seq}, token {t}: no log-prob for the sampled token {tok}")
            try:
                logprobs.append(float(entry[str(tok)]["logprob"]))
                ranked = [(int(k), float(v["logprob"]), v.get("rank")) for k, v in entry.items()]
            except (KeyError, TypeError, ValueError) as err:
                raise self._bad(
                    f"sequence {seq}, token {t}: malformed prompt_logprobs entry ({err!r})"
                ) from None
            if tops is not None:
                # The dict holds the actual token (any rank) plus the top-k: keep ranks 1..k.
                tops.append(rank_top_k(((i, v) for i, v, r in ranked if r is None or r <= top_k), top_k))
        return TeacherScores(logprobs=logprobs, top_k=tops)

    # -- generation -----------------------------------------------------------------------------

    def _generate_chunk_prompts(self, n: int, seed: int | None) -> int:
        """A request's `seed` seeds every prompt in it alike, so with a seed each prompt goes alone (with a
        seed of its own; the requests still run side by side, up to `max_in_flight`)."""
        return 1 if seed is not None else super()._generate_chunk_prompts(n, seed)

    def _generate_chunk(
        self, prompts: list[list[int]], offset: int, *, n: int, max_new_tokens: int, temperature: float,
        top_p: float, seed: int | None,
    ) -> list[GeneratedCompletion]:
        n_ask = 1 if temperature == 0 else n
        body: dict[str, Any] = {
            "model": self.model_name(), "prompt": prompts, "max_tokens": max_new_tokens,
            "temperature": temperature, "top_p": top_p, "n": n_ask, "logprobs": 0, "return_token_ids": True,
            "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
        }
        if seed is not None:
            body["seed"] = seed
        resp = self.client.post_json("/v1/completions", body)
        choices = resp.get("choices") if isinstance(resp, dict) else None
        want = len(prompts) * n_ask
        if not isinstance(choices, list) or len(choices) != want:
            got = len(choices) if isinstance(choices, list) else 0
            raise self._bad(f"sent {len(prompts)} prompts with n={n_ask} to /v1/completions, got {got} "
                            f"choices (expected {want})")
        index = [c.get("index") if isinstance(c, dict) else None for c in choices]
        if not all(type(i) is int for i in index) or sorted(index) != list(range(want)):
            raise self._bad(f"the choices' indices are not 0..{want - 1}, one each")
        by_index = sorted(zip(index, choices), key=lambda p: p[0])
        out = [self._parse_generated(c, i // n_ask, f"prompt {offset + i // n_ask}, choice {i}")
               for i, c in by_index]
        return repeat_greedy(out, n) if n_ask != n else out

    def _parse_generated(self, choice: dict[str, Any], prompt: int, where: str) -> GeneratedCompletion:
        ids = choice.get("token_ids")
        if not isinstance(ids, list):
            raise self._bad(f"{where}: no token_ids (the server ignored return_token_ids: an older vLLM?)")
        logprobs = choice.get("logprobs")
        lps = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(lps, list):
            raise self._bad(f"{where}: no logprobs.token_logprobs (the server ignored logprobs=0)")
        if len(lps) != len(ids):
            raise self._bad(f"{where}: {len(ids)} token ids but {len(lps)} log-probs")
        given = choice.get("finish_reason")
        reason = FINISH_REASONS.get(given) if isinstance(given, str) else None
        if reason is None:
            # Name vLLM's own values only: the message must not carry what an unknown server wrote.
            said = repr(given) if given in (None, "abort", "error") else "an unknown value"
            raise self._bad(f"{where}: finish_reason is {said}, not stop or length (aborted or failed?)")
        try:
            return GeneratedCompletion(prompt_index=prompt, completion_ids=[int(t) for t in ids],
                                       logprobs=[float(v) for v in lps], finish_reason=reason)
        except (TypeError, ValueError) as err:
            what = f"{where}: a token id or log-prob is not a number ({type(err).__name__})"
            raise self._bad(what) from None


def _student_vocab_texts(tok: Any, max_ids: int = 4096, per_text: int = 64) -> list[str]:
    """Text made of the student's non-special tokens (up to `max_ids`, spread over the vocabulary)."""
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    if len(ids) > max_ids:
        step = len(ids) / max_ids
        ids = [ids[int(k * step)] for k in range(max_ids)]
    return [tok.decode(ids[s : s + per_text]) for s in range(0, len(ids), per_text)]


def compare_by_probes(teacher: VLLMServerTeacher, student_path: str) -> list[CheckResult]:
    """Tokenizer, vocabulary and EOS probes of a vLLM server against the student's tokenizer."""
    tok = load_tokenizer(student_path)
    out: list[CheckResult] = []
    fix = FIX
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
            (
                "tokenizer",
                "fail",
                (f"teacher {model!r} and student {student_path!r} tokenize {text[:60]!r} differently "
                f"(teacher: {theirs[:20]}, student: {ours[:20]}). Log-probs are compared token id by token id. {fix}"),
            )
        )
    else:
        out.append(
            (
                "tokenizer",
                "pass",
                (f"teacher {model!r} tokenizes {len(PROBE_TEXTS)} probe strings and the "
                f"student's whole vocabulary exactly as student {student_path!r}"),
            )
        )
    n_student, n_teacher = len(tok), teacher.vocab_size()
    if n_teacher < n_student:
        out.append(
            (
                "vocabulary",
                "fail",
                (f"teacher {model!r} accepts token ids < {n_teacher}, student "
                f"{student_path!r} has {n_student} tokens: ids {n_teacher}..{n_student - 1} are out of the "
                f"teacher's vocabulary. {fix}"),
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
            (
                "eos",
                "fail",
                (f"teacher {model!r} does not end generation at the student's EOS ids "
                f"{not_stopping} (student {student_path!r} EOS ids: {eos}). {fix}"),
            )
        )
    else:
        out.append(("eos", "pass", f"teacher ends generation at the student's EOS ids {eos}"))
    return out

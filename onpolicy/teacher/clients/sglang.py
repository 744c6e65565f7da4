"""An external SGLang server as a remote teacher (`POST /generate`, `GET /get_model_info`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onpolicy.engines.vllm import derive_seed
from onpolicy.teacher.clients.remote import RemoteTeacher
from onpolicy.teacher.fingerprint import CheckResult
from onpolicy.teacher.local.engines import repeat_greedy
from onpolicy.teacher.validate import validate_scores
from onpolicy.types import GeneratedCompletion, ScoreRequestItem, TeacherInfo, TeacherScores, rank_top_k


class SGLangTeacher(RemoteTeacher):
    """An SGLang server: `POST /generate` with `input_ids`, `return_logprob`, `logprob_start_len`.

    With `logprob_start_len = len(prompt)`, `meta_info.input_token_logprobs` holds one
    `[logprob, token_id, text|null]` per completion token (position start..end of the input),
    and `meta_info.input_top_logprobs` one list of such triples per position. SGLang exposes no
    tokenizer fingerprint, so `info()` reports what `GET /get_model_info` gives and marks the
    fingerprint `sglang-unverified:`; `max_top_k` is the configured `max_top_k`.

    Generation: `POST /generate` with `input_ids` (one batch entry per sample, prompt-major: SGLang's own
    `n` would give every copy of a prompt the same `sampling_seed`), `sampling_params` {max_new_tokens,
    temperature, top_p, top_k=-1, min_p=0, repetition_penalty=1, sampling_seed when seeded} and
    `return_logprob`. Each result's `meta_info.output_token_logprobs` holds one `[logprob, token_id,
    text|null]` per sampled token (EOS included; `output_ids`, where sent, may lack a matched stop token)
    and `meta_info.finish_reason` is `{"type": "stop"|"length"|"abort", ...}`. SGLang's output log-probs are
    those of the distribution it sampled from, after temperature (unless the server runs with
    `SGLANG_RETURN_ORIGINAL_LOGPROB=1`), so unless temperature and top_p are 1 the sampled tokens are
    scored again as above, which gives the raw log-probs our contract promises. `sampling_seed` is
    honoured by servers with deterministic sampling (`--enable-deterministic-inference`).
    """

    kind = "sglang"
    info_path = "/get_model_info"
    fix_hint = "Serve the teacher with SGLang's native /generate endpoint (return_logprob, logprob_start_len)."

    def __init__(self, url: str, *, max_top_k: int = 20, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._max_top_k = max_top_k

    def compatibility(self, student_path: str | Path) -> list[CheckResult]:
        model = self.info().model
        return [("tokenizer", "warn", (f"SGLang does not publish its tokenizer; make sure {model!r} uses the "
                 f"student's tokenizer ({str(student_path)!r}) -- this cannot be checked over its API"))]

    def info(self) -> TeacherInfo:
        if self._info is None:
            body = self.client.get_json("/get_model_info")
            if not isinstance(body, dict) or "model_path" not in body:
                raise self._bad("GET /get_model_info has no model_path")
            self._info = TeacherInfo(
                model=str(body["model_path"]),
                vocab_size=0,
                tokenizer_fingerprint=f"sglang-unverified:{body.get('tokenizer_path') or body['model_path']}",
                eos_token_ids=[],
                max_top_k=self._max_top_k,
            )
        return self._info

    def _score_chunk(self, items: list[ScoreRequestItem], top_k: int, offset: int) -> list[TeacherScores]:
        # A sequence with no completion needs no forward pass (and SGLang would reject start == len).
        todo = [i for i, it in enumerate(items) if it.completion_ids]
        out = [TeacherScores(logprobs=[], top_k=[] if top_k else None) for _ in items]
        if not todo:
            return out
        body = {
            "input_ids": [list(items[i].prompt_ids) + list(items[i].completion_ids) for i in todo],
            "return_logprob": True,
            "logprob_start_len": [len(items[i].prompt_ids) for i in todo],
            "top_logprobs_num": top_k,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        }
        resp = self.client.post_json("/generate", body)
        if isinstance(resp, dict):
            resp = [resp]
        if not isinstance(resp, list) or len(resp) != len(todo):
            raise self._bad(
                f"sent {len(todo)} sequences to /generate, got {len(resp) if isinstance(resp, list) else 0} results"
            )
        for j, i in enumerate(todo):
            out[i] = self._parse_one(resp[j], items[i], top_k, offset + i)
        return out

    def _parse_one(self, res: Any, item: ScoreRequestItem, top_k: int, seq: int) -> TeacherScores:
        meta = res.get("meta_info") if isinstance(res, dict) else None
        tok_lp = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if tok_lp is None:
            raise self._bad(
                f"sequence {seq}: response has no meta_info.input_token_logprobs (return_logprob ignored?)"
            )
        want = list(item.completion_ids)
        if len(tok_lp) != len(want):
            raise self._bad(f"sequence {seq}: expected {len(want)} log-probs, got {len(tok_lp)}")
        logprobs = []
        for t, entry in enumerate(tok_lp):
            if not isinstance(entry, (list, tuple)) or len(entry) < 2 or entry[0] is None:
                raise self._bad(f"sequence {seq}, token {t}: malformed input_token_logprobs entry {entry!r}")
            if int(entry[1]) != want[t]:
                raise self._bad(
                    f"sequence {seq}, token {t}: the server scored token {entry[1]}, but {want[t]} was sent"
                )
            logprobs.append(float(entry[0]))
        tops = None
        if top_k:
            rows = meta.get("input_top_logprobs")
            if not rows or len(rows) != len(want):
                raise self._bad(
                    f"sequence {seq}: asked for top-{top_k}, got input_top_logprobs for "
                    f"{len(rows) if rows else 0} of {len(want)} positions"
                )
            tops = []
            for t, row in enumerate(rows):
                if not isinstance(row, list):
                    raise self._bad(f"sequence {seq}, position {t}: input_top_logprobs entry is {row!r}")
                tops.append(rank_top_k(((e[1], e[0]) for e in row if e and e[0] is not None), top_k))
        return TeacherScores(logprobs=logprobs, top_k=tops)

    # -- generation -----------------------------------------------------------------------------

    def _generate_chunk(
        self, prompts: list[list[int]], offset: int, *, n: int, max_new_tokens: int, temperature: float,
        top_p: float, seed: int | None,
    ) -> list[GeneratedCompletion]:
        n_ask = 1 if temperature == 0 else n
        entries = [i for i in range(len(prompts)) for _ in range(n_ask)]
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": -1,
                  "min_p": 0.0, "repetition_penalty": 1.0}
        body = {
            "input_ids": [prompts[i] for i in entries],
            "sampling_params": params if seed is None
            else [{**params, "sampling_seed": derive_seed(seed, k)} for k in range(len(entries))],
            "return_logprob": True,
        }
        resp = self.client.post_json("/generate", body)
        if isinstance(resp, dict):
            resp = [resp]
        if not isinstance(resp, list) or len(resp) != len(entries):
            got = len(resp) if isinstance(resp, list) else 0
            raise self._bad(f"sent {len(entries)} samples ({len(prompts)} prompts) to /generate, got {got} "
                            "results")
        out = [self._parse_generated(res, i, f"prompt {offset + i}, sample {k % n_ask}")
               for k, (res, i) in enumerate(zip(resp, entries))]
        if temperature != 1.0 or top_p != 1.0:
            out = self._rescored(prompts, out, offset)
        return repeat_greedy(out, n) if n_ask != n else out

    def _parse_generated(self, res: Any, prompt: int, where: str) -> GeneratedCompletion:
        meta = res.get("meta_info") if isinstance(res, dict) else None
        entries = meta.get("output_token_logprobs") if isinstance(meta, dict) else None
        if not isinstance(entries, list):
            raise self._bad(f"{where}: the response has no meta_info.output_token_logprobs (return_logprob "
                            "ignored?)")
        ids, logprobs = [], []
        for t, e in enumerate(entries):
            try:
                logprobs.append(float(e[0]))
                ids.append(int(e[1]))
            except (TypeError, ValueError, IndexError, KeyError):
                raise self._bad(f"{where}, token {t}: malformed output_token_logprobs entry") from None
        finish = meta.get("finish_reason")
        kind = finish.get("type") if isinstance(finish, dict) else finish
        reason = kind if kind in ("stop", "length") else None  # SGLang's finish types are ours (abort fails)
        if reason is None:
            # Name SGLang's own values only: the message must not carry what an unknown server wrote.
            said = repr(kind) if kind in (None, "abort") else "an unknown value"
            raise self._bad(f"{where}: finish_reason type is {said}, not stop or length (aborted?)")
        sent = res.get("output_ids")
        if sent is not None and sent != ids and not (reason == "stop" and sent == ids[:-1]):
            raise self._bad(f"{where}: output_ids differ from the token ids of output_token_logprobs")
        return GeneratedCompletion(prompt_index=prompt, completion_ids=ids, logprobs=logprobs,
                                   finish_reason=reason)

    def _rescored(
        self, prompts: list[list[int]], out: list[GeneratedCompletion], offset: int
    ) -> list[GeneratedCompletion]:
        """`out` with the raw log-probs of its tokens, scored as `score` does (one prefill, no decoding)."""
        items = [ScoreRequestItem(prompt_ids=prompts[c.prompt_index], completion_ids=c.completion_ids)
                 for c in out]
        scores = self._score_chunk(items, 0, offset)
        validate_scores(self.source, items, scores, 0, offset=offset)
        self.client.usage.add(tokens_scored=sum(len(it.completion_ids) for it in items))
        return [c.model_copy(update={"logprobs": s.logprobs}) for c, s in zip(out, scores)]

"""Our teacher service's API (`/v1/score`, `/v1/generate`, `/v1/info`) answering from a script of behaviours.

Each `POST /v1/score` pops the next action from `script.actions` (then `script.default`):
- "ok": a valid answer. Log-probs are a deterministic function of the token (`fake_logprob`).
- ("status", code) or ("status", code, {headers}): that HTTP error.
- ("sleep", seconds): answer correctly after a delay (a slow teacher).
- "short" | "nan" | "missing" | "no_top_k" | "positive" | "topk_out_of_vocab": a broken body of that kind.
The server counts requests (`script.requests`) and correct answers per batch (`script.scored`),
so tests can check "retried" and "scored exactly once" from the server's side. A request that accepts
`application/x-onpolicy-scores` gets the answer in that binary form (broken the same way; "missing" is a
truncated body there) unless `script.binary` is False (a server that predates it: JSON always).

Each `POST /v1/generate` pops the next action the same way: "ok" (n completions per prompt, EOS-ended,
log-probs from `fake_logprob`), ("status", code), ("sleep", seconds), or a broken body: "short" |
"nan" | "positive" | "missing" (as above, in the first completion), "few" (one completion missing),
"unordered" (the first two prompts' completions swapped), "out_of_vocab" (a token id past the
vocabulary), "too_long" (more tokens than max_new_tokens), "bad_finish" (finish_reason "abort").
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter, deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from onpolicy.types import (
    SCORES_MEDIA_TYPE,
    GenerateRequest,
    ScoreRequest,
    ScoreResponse,
    TeacherInfo,
    binary_scores_form,
    encode_scores,
)

BROKEN_GENERATE = ("short", "nan", "positive", "missing", "few", "unordered", "out_of_vocab", "too_long",
                   "bad_finish")


def fake_logprob(token_id: int, position: int) -> float:
    return -0.5 - 0.01 * token_id - 0.001 * position


class Script:
    def __init__(self, actions: list[Any] | None = None, default: Any = "ok") -> None:
        self.actions = deque(actions or [])
        self.default = default
        self.requests: Counter[str] = Counter()
        self.scored: Counter[tuple] = Counter()
        self.binary = True  # answer the binary scores form when asked for it
        self.formats: Counter[str] = Counter()  # the form each score answer went out in
        self.keys: list[str | None] = []  # each score request's Idempotency-Key, in arrival order
        self._lock = threading.Lock()

    def next(self) -> Any:
        with self._lock:
            return self.actions.popleft() if self.actions else self.default


def _answer(req: ScoreRequest) -> dict[str, Any]:
    scores = []
    for seq in req.sequences:
        n_p = len(seq.prompt_ids)
        lps = [fake_logprob(t, n_p + j) for j, t in enumerate(seq.completion_ids)]
        top = None
        if req.top_k:
            top = [[[k, -1.0 - k] for k in range(req.top_k)] for _ in seq.completion_ids]
        scores.append({"logprobs": lps, "top_k": top})
    return {
        "scores": scores,
        "model": "scripted",
        "usage": {"tokens_scored": sum(len(s["logprobs"]) for s in scores)},
    }


def _break(body: dict[str, Any], how: str) -> dict[str, Any]:
    s0 = body["scores"][0]
    if how == "short":
        s0["logprobs"] = s0["logprobs"][:-1]
    elif how == "nan":
        s0["logprobs"][0] = float("nan")
    elif how == "positive":
        s0["logprobs"][0] = 3.0
    elif how == "missing":
        del s0["logprobs"]
    elif how == "no_top_k":
        s0["top_k"] = None
    elif how == "topk_out_of_vocab":
        s0["top_k"][0][0][0] = 99_999
    return body


def _binary(body: dict[str, Any], action: Any, form: str) -> bytes:
    """The (possibly broken) answer in the binary scores form asked for (exact or compact top-k)."""
    if action == "missing":  # nothing to leave out of an array: a body cut short instead
        body["scores"][0]["logprobs"] = []
        return encode_scores(ScoreResponse.model_validate(body), form)[:-5]
    if action == "no_top_k":  # the form carries top-k for all sequences or none
        for sc in body["scores"]:
            sc["top_k"] = None
    return encode_scores(ScoreResponse.model_validate(body), form)


def _generated(req: GenerateRequest, eos: int) -> dict[str, Any]:
    completions = []
    for i, prompt in enumerate(req.prompts):
        for j in range(req.n):
            ids = [4 + (i + j) % 8] * (min(3, req.max_new_tokens) - 1) + [eos]
            lps = [fake_logprob(t, len(prompt) + k) for k, t in enumerate(ids)]
            completions.append({"prompt_index": i, "completion_ids": ids, "logprobs": lps, "finish_reason": "stop"})
    return {
        "completions": completions,
        "model": "scripted",
        "usage": {"prompt_tokens": sum(map(len, req.prompts)), "tokens_generated": 3 * len(completions)},
    }


def _break_generated(body: dict[str, Any], how: str, max_new_tokens: int) -> dict[str, Any]:
    cs = body["completions"]
    if how == "short":
        cs[0]["logprobs"] = cs[0]["logprobs"][:-1]
    elif how == "nan":
        cs[0]["logprobs"][0] = float("nan")
    elif how == "positive":
        cs[0]["logprobs"][0] = 2.5
    elif how == "missing":
        del cs[0]["logprobs"]
    elif how == "few":
        cs.pop()
    elif how == "unordered":
        cs[0]["prompt_index"], cs[-1]["prompt_index"] = cs[-1]["prompt_index"], cs[0]["prompt_index"]
    elif how == "out_of_vocab":
        cs[0]["completion_ids"][0] = 99_999
    elif how == "too_long":
        cs[0]["completion_ids"] = [5] * (max_new_tokens + 1)
        cs[0]["logprobs"] = [-1.0] * (max_new_tokens + 1)
    elif how == "bad_finish":
        cs[0]["finish_reason"] = "abort"
    return body


def make_scripted_teacher_app(script: Script, *, info: TeacherInfo | None = None, api_key: str | None = None):

    app = FastAPI()
    info = info or TeacherInfo(
        model="scripted", vocab_size=16, tokenizer_fingerprint="0" * 64, eos_token_ids=[2], max_top_k=16
    )

    def _authorised(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    async def _next_action():
        """The script's next action; a scripted status comes back as the response to send, a sleep is slept."""
        action = script.next()
        if isinstance(action, tuple) and action[0] == "status":
            headers = action[2] if len(action) > 2 else None
            return action, JSONResponse({"detail": f"scripted {action[1]}"}, status_code=action[1], headers=headers)
        if isinstance(action, tuple) and action[0] == "sleep":
            await asyncio.sleep(action[1])
        return action, None

    @app.get("/v1/info")
    async def get_info(request: Request):
        script.requests["info"] += 1
        if not _authorised(request):
            return JSONResponse({"detail": "bad token"}, status_code=401)
        return info.model_dump()

    @app.post("/v1/score")
    async def score(request: Request):
        script.requests["score"] += 1
        script.keys.append(request.headers.get("idempotency-key"))
        if not _authorised(request):
            return JSONResponse({"detail": "bad token"}, status_code=401)
        req = ScoreRequest.model_validate(await request.json())
        action, refusal = await _next_action()
        if refusal is not None:
            return refusal
        body = _answer(req)
        if action in ("short", "nan", "missing", "no_top_k", "positive", "topk_out_of_vocab"):
            body = _break(body, action)
        else:
            key = tuple((tuple(s.prompt_ids), tuple(s.completion_ids)) for s in req.sequences)
            script.scored[key] += 1
        form = binary_scores_form(request.headers.get("accept"))
        if script.binary and form is not None:
            script.formats["binary" if form == "exact" else form] += 1
            return Response(_binary(body, action, form), media_type=SCORES_MEDIA_TYPE)
        script.formats["json"] += 1
        # json.dumps, not JSONResponse: the "nan" case must reach the client as a NaN literal.
        return Response(json.dumps(body, allow_nan=True), media_type="application/json")

    @app.post("/v1/generate")
    async def generate(request: Request):
        script.requests["generate"] += 1
        if not _authorised(request):
            return JSONResponse({"detail": "bad token"}, status_code=401)
        req = GenerateRequest.model_validate(await request.json())
        action, refusal = await _next_action()
        if refusal is not None:
            return refusal
        body = _generated(req, info.eos_token_ids[0] if info.eos_token_ids else 2)
        if action in BROKEN_GENERATE:
            body = _break_generated(body, action, req.max_new_tokens)
        return Response(json.dumps(body, allow_nan=True), media_type="application/json")

    return app

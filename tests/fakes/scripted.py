"""Our teacher service's API (`/v1/score`, `/v1/info`) answering from a script of behaviours.

Each `POST /v1/score` pops the next action from `script.actions` (then `script.default`):
- "ok": a valid answer. Log-probs are a deterministic function of the token (`fake_logprob`).
- ("status", code) or ("status", code, {headers}): that HTTP error.
- ("sleep", seconds): answer correctly after a delay (a slow teacher).
- "short" | "nan" | "missing" | "no_top_k" | "positive" | "topk_out_of_vocab": a broken body of that kind.
The server counts requests (`script.requests`) and correct answers per batch (`script.scored`),
so tests can check "retried" and "scored exactly once" from the server's side.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter, deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from onpolicy.types import ScoreRequest, TeacherInfo


def fake_logprob(token_id: int, position: int) -> float:
    return -0.5 - 0.01 * token_id - 0.001 * position


class Script:
    def __init__(self, actions: list[Any] | None = None, default: Any = "ok") -> None:
        self.actions = deque(actions or [])
        self.default = default
        self.requests: Counter[str] = Counter()
        self.scored: Counter[tuple] = Counter()
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


def make_scripted_teacher_app(script: Script, *, info: TeacherInfo | None = None, api_key: str | None = None):

    app = FastAPI()
    info = info or TeacherInfo(
        model="scripted", vocab_size=16, tokenizer_fingerprint="0" * 64, eos_token_ids=[2], max_top_k=16
    )

    def _authorised(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    @app.get("/v1/info")
    async def get_info(request: Request):
        script.requests["info"] += 1
        if not _authorised(request):
            return JSONResponse({"detail": "bad token"}, status_code=401)
        return info.model_dump()

    @app.post("/v1/score")
    async def score(request: Request):
        script.requests["score"] += 1
        if not _authorised(request):
            return JSONResponse({"detail": "bad token"}, status_code=401)
        req = ScoreRequest.model_validate(await request.json())
        action = script.next()
        if isinstance(action, tuple) and action[0] == "status":
            headers = action[2] if len(action) > 2 else None
            return JSONResponse({"detail": f"scripted {action[1]}"}, status_code=action[1], headers=headers)
        if isinstance(action, tuple) and action[0] == "sleep":
            await asyncio.sleep(action[1])
        body = _answer(req)
        if action in ("short", "nan", "missing", "no_top_k", "positive", "topk_out_of_vocab"):
            body = _break(body, action)
        else:
            key = tuple((tuple(s.prompt_ids), tuple(s.completion_ids)) for s in req.sequences)
            script.scored[key] += 1
        # json.dumps, not JSONResponse: the "nan" case must reach the client as a NaN literal.
        return Response(json.dumps(body, allow_nan=True), media_type="application/json")

    return app

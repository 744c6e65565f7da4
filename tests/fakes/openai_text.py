"""An OpenAI-compatible text endpoint (`/v1/models`, `/v1/chat/completions`, `/v1/completions`) answering from a
script, as a hosted model would: text only, no log-probs.

Each completion text is `script.reply(prompt_text, j)` (default: the prompt's digits reversed, then `j`, so
tests can tell prompts and samples apart). Each POST pops the next action from `script.actions` (then "ok"):
"ok", ("status", code) (that HTTP error), "few" (one choice missing), "bad_finish" (`finish_reason`
"content_filter"), "no_text" (a choice without text). Every request body is kept in `script.bodies`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def default_reply(prompt: str, j: int) -> str:
    return "".join(c for c in prompt if c.isdigit())[::-1] + str(j)


class TextScript:
    def __init__(self, actions: list[Any] | None = None, reply: Callable[[str, int], str] = default_reply,
                 finish: str = "stop", model: str = "hosted-model") -> None:
        self.actions, self.reply, self.finish, self.model = deque(actions or []), reply, finish, model
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def next_action(self) -> Any:
        with self._lock:
            return self.actions.popleft() if self.actions else "ok"


def _usage(prompts: list[str], texts: list[str]) -> dict[str, int]:
    return {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": sum(len(t) for t in texts),
            "total_tokens": sum(len(p) for p in prompts) + sum(len(t) for t in texts)}


def make_openai_text_app(script: TextScript, api_key: str | None = None) -> FastAPI:
    app = FastAPI()

    def refused(request: Request) -> JSONResponse | None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "bad key"}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        return refused(request) or {"object": "list", "data": [{"id": script.model, "object": "model"}]}

    def answer(prompts: list[str], body: dict[str, Any], chat: bool):
        action = script.next_action()
        if isinstance(action, tuple) and action[0] == "status":
            return JSONResponse({"error": "scripted"}, status_code=action[1])
        n = int(body.get("n", 1))
        choices, texts = [], []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                text = script.reply(prompt, j)[: int(body["max_tokens"])]
                texts.append(text)
                content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                choices.append({"index": j if chat else i * n + j, **content, "finish_reason": script.finish})
        if action == "few":
            choices = choices[:-1]
        elif action == "bad_finish":
            choices[0]["finish_reason"] = "content_filter"
        elif action == "no_text":
            choices[0].pop("message" if chat else "text")
        choices.reverse()  # out of order on the wire: the client orders them by index
        return {"id": "x", "object": "chat.completion" if chat else "text_completion", "model": script.model,
                "choices": choices, "usage": _usage(prompts, texts)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        script.bodies.append(body)
        return refused(request) or answer([m["content"] for m in body["messages"]][-1:], body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        script.bodies.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return refused(request) or answer(prompts, body, chat=False)

    return app

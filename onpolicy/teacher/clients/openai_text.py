"""A text-only OpenAI-compatible endpoint (a hosted model, or any vLLM/SGLang/TGI server asked for text): the
teacher of sequence-level KD. No log-probs are asked for or read.

    POST /v1/chat/completions {"model": M, "messages": [...], "n": n, "max_tokens": N, "temperature": T,
                               "top_p": P, "seed": S}
        -> {"choices": [{"index": j, "message": {"content": "..."}, "finish_reason": "stop"|"length"}],
            "usage": {"prompt_tokens", "completion_tokens"}}
    POST /v1/completions      {"model": M, "prompt": ["text", ...], "n": n, ...}
        -> {"choices": [{"index": i * n + j, "text": "...", "finish_reason": ...}], "usage": {...}}

Chat asks once per prompt (a chat request holds one conversation); completions takes a chunk of prompts per
request (choice i * n + j is prompt i's j-th sample, as OpenAI and vLLM number them). Requests go through
`RobustClient` (retries, breaker, bounded concurrency, the key from the environment). Usage counts requests,
the prompt and completion tokens the server reports, and the cost when prices are configured.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from onpolicy.teacher.clients.http import BreakerState, RobustClient
from onpolicy.teacher.errors import TeacherResponseError

Prompt = str | list[dict[str, str]]
FINISH = {"stop": True, "eos": True, "end_turn": True, "length": False, "max_tokens": False}


@dataclass(frozen=True)
class TextCompletion:
    prompt_index: int
    text: str
    stopped: bool  # the model ended it (False: cut at max_tokens)


class OpenAITextClient:
    """Samples text from an OpenAI-compatible endpoint (`endpoint`: `chat` or `completions`)."""

    kind = "openai"

    def __init__(self, url: str, *, endpoint: str = "chat", model: str | None = None,
                 price_prompt_per_mtok: float | None = None, price_completion_per_mtok: float | None = None,
                 batch_size: int = 32, on_state_change: Callable[[BreakerState], None] | None = None,
                 **client_kw: Any) -> None:
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be chat or completions, got {endpoint!r}")
        self.url, self.endpoint, self._model = url.rstrip("/"), endpoint, model
        self.prices = (price_prompt_per_mtok, price_completion_per_mtok)
        self.batch_size = batch_size
        self.client = RobustClient(self.url, on_state_change=on_state_change, **client_kw)
        self._max_in_flight = client_kw.get("max_in_flight", 4)

    @property
    def source(self) -> str:
        return f"text-only teacher at {self.url}"

    def model_name(self) -> str:
        if self._model is None:
            body = self.client.get_json("/v1/models")
            data = body.get("data") if isinstance(body, dict) else None
            if not data or not isinstance(data[0], dict) or "id" not in data[0]:
                raise TeacherResponseError(f"{self.source}: GET /v1/models lists no model; set teacher.served_name")
            self._model = str(data[0]["id"])
        return self._model

    def usage(self) -> dict[str, Any]:
        u = self.client.snapshot()
        price_in, price_out = self.prices
        if price_in is not None or price_out is not None:
            u["cost"] = (u["prompt_tokens"] * (price_in or 0.0) + u["tokens_generated"] * (price_out or 0.0)) / 1e6
        return u

    def close(self) -> None:
        self.client.close()

    def generate_text(self, prompts: list[Prompt], *, n: int = 1, max_tokens: int, temperature: float = 1.0,
                      top_p: float = 1.0, seed: int | None = None) -> list[TextCompletion]:
        """`n` completions per prompt, grouped by prompt in prompt order."""
        if self.endpoint == "completions":
            bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
            if bad is not None:
                raise ValueError(f"prompt {bad} is a conversation, which /v1/completions cannot take: set "
                                 "teacher.endpoint=chat")
            size = max(1, self.batch_size // n)
            chunks = [(s, prompts[s : s + size]) for s in range(0, len(prompts), size)]
        else:
            chunks = [(s, [p]) for s, p in enumerate(prompts)]
        sample = {"n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        self.model_name()  # once, before the requests go out in parallel

        def run(chunk: tuple[int, list[Prompt]]) -> list[TextCompletion]:
            start, part = chunk
            chunk_seed = None if seed is None else seed + start
            return self._request(part, start, sample, chunk_seed)

        if len(chunks) == 1:
            return run(chunks[0])
        with ThreadPoolExecutor(max_workers=min(len(chunks), self._max_in_flight)) as pool:
            return [c for part in pool.map(run, chunks) for c in part]

    def _request(self, prompts: list[Prompt], start: int, sample: dict[str, Any],
                 seed: int | None) -> list[TextCompletion]:
        body: dict[str, Any] = {"model": self.model_name(), **sample}
        if seed is not None:
            body["seed"] = seed
        if self.endpoint == "chat":
            (prompt,) = prompts
            body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            answer = self.client.post_json("/v1/chat/completions", body)
        else:
            body["prompt"] = prompts
            answer = self.client.post_json("/v1/completions", body)
        n = sample["n"]
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts) * n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise TeacherResponseError(f"{self.source}: asked for {len(prompts) * n} completions, got {got} choices")
        out = []
        for k, choice in enumerate(sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)):
            text = self._text_of(choice)
            reason = choice.get("finish_reason")
            if reason not in FINISH:
                raise TeacherResponseError(f"{self.source}: choice {k} finished with {reason!r} (expected stop or "
                                           "length)")
            out.append(TextCompletion(prompt_index=start + k // n, text=text, stopped=FINISH[reason]))
        usage = answer.get("usage") or {}
        self.client.usage.add(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                              tokens_generated=int(usage.get("completion_tokens") or 0))
        return out

    def _text_of(self, choice: Any) -> str:
        if not isinstance(choice, dict):
            raise TeacherResponseError(f"{self.source}: a choice is not an object")
        if self.endpoint == "chat":
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        if not isinstance(text, str):
            raise TeacherResponseError(f"{self.source}: a choice carries no text ({self.endpoint} endpoint)")
        return text

"""A fake SGLang server: `/generate` and `/get_model_info` in SGLang's shape, values from HFTeacher.

SGLang's documented shape with `return_logprob=True`, `logprob_start_len=s`, `top_logprobs_num=k`:
`meta_info.input_token_logprobs` has one `[logprob, token_id, text|null]` per input position
s..n-1 (len = prompt_tokens - s), and `meta_info.input_top_logprobs` one list of k such triples
per position. A batch (`input_ids` a list of lists) answers with a list of results.

A request without `logprob_start_len` samples (SGLang's default start, -1, returns output log-probs
only): `sampling_params` (one dict for all, or one per entry) with `max_new_tokens`, `temperature`,
`top_p`, `n` (entries repeated n times, prompt-major, as SGLang expands them) and `sampling_seed`.
Each result has `output_ids` (EOS included), `meta_info.output_token_logprobs` (one triple per sampled
token) and `meta_info.finish_reason` ({"type": "stop", "matched": eos} or {"type": "length", "length": N}).
As SGLang does by default (without SGLANG_RETURN_ORIGINAL_LOGPROB), the output log-probs are those of
the tempered distribution, log softmax(logits / T), unless T is 0 (greedy) or 1; the samples come from
`HFTeacher.generate` on the same model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from onpolicy.types import ScoreRequestItem, TeacherScores


def make_fake_sglang_app(model_dir: str | Path):

    from onpolicy.teacher.local.engines import HFTeacher

    hf = HFTeacher(model_dir)
    eos = hf.info().eos_token_ids[0]
    vocab = hf.info().vocab_size
    app = FastAPI()
    app.state.requests = 0
    app.state.bodies = []  # every /generate body, for tests that check what was sent

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": str(model_dir), "tokenizer_path": str(model_dir), "is_generation": True}

    def one(ids: list[int], start: int, k: int, sc: TeacherScores) -> dict[str, Any]:
        meta = {
            "prompt_tokens": len(ids),
            "completion_tokens": 1,
            "input_token_logprobs": [[lp, t, None] for lp, t in zip(sc.logprobs, ids[start:])],
            "input_top_logprobs": [[[lp, t, None] for t, lp in row] for row in sc.top_k]
            if k
            else [None] * (len(ids) - start),
            # The one generated token is not what we check; a fixed EOS keeps the shape.
            "output_token_logprobs": [[-0.1, eos, None]],
            "output_top_logprobs": [[[-0.1, eos, None]] * k] if k else [None],
            "finish_reason": {"type": "length", "length": 1},
        }
        return {"text": "", "output_ids": [eos], "meta_info": meta}

    def tempered(prompt: list[int], completion: list[int], temperature: float) -> list[float]:
        """log softmax(logits / T) of each sampled token, from the teacher's full distribution."""
        rows = hf.score([ScoreRequestItem(prompt_ids=prompt, completion_ids=completion)], top_k=vocab)[0].top_k
        out = []
        for tok, row in zip(completion, rows):
            scaled = {i: lp / temperature for i, lp in row}
            norm = max(scaled.values())
            norm += math.log(sum(math.exp(v - norm) for v in scaled.values()))
            out.append(scaled[tok] - norm)
        return out

    def sample(prompt: list[int], params: dict[str, Any]) -> dict[str, Any]:
        temperature = float(params.get("temperature", 1.0))
        max_new = int(params.get("max_new_tokens", 128))
        c = hf.generate([prompt], n=1, max_new_tokens=max_new, temperature=temperature,
                        top_p=float(params.get("top_p", 1.0)), seed=params.get("sampling_seed"))[0]
        lps = c.logprobs if temperature in (0.0, 1.0) else tempered(prompt, c.completion_ids, temperature)
        finish = ({"type": "stop", "matched": c.completion_ids[-1]} if c.finish_reason == "stop"
                  else {"type": "length", "length": max_new})
        meta = {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(c.completion_ids),
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, c.completion_ids)],
            "finish_reason": finish,
        }
        return {"text": "", "output_ids": c.completion_ids, "meta_info": meta}

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        app.state.requests += 1
        app.state.bodies.append(body)
        ids = body["input_ids"]
        batched = bool(ids) and isinstance(ids[0], list)
        ids = ids if batched else [ids]
        if "logprob_start_len" not in body:
            params = body.get("sampling_params") or {}
            per_entry = params if isinstance(params, list) else [params] * len(ids)
            n = int(per_entry[0].get("n", 1))
            out = [sample(p, s) for p, s in zip(ids, per_entry) for _ in range(n)]
            return out if batched or n > 1 else out[0]
        start, k = body.get("logprob_start_len", 0), int(body.get("top_logprobs_num", 0))
        starts = start if isinstance(start, list) else [start] * len(ids)
        # One batched forward pass, as the real server would run (padding changes float noise).
        scores = hf.score(
            [ScoreRequestItem(prompt_ids=i[:s], completion_ids=i[s:]) for i, s in zip(ids, starts)], k
        )
        out = [one(i, s, k, sc) for i, s, sc in zip(ids, starts, scores)]
        return out if batched else out[0]

    return app

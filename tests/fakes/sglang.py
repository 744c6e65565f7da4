"""A fake SGLang server: `/generate` and `/get_model_info` in SGLang's shape, values from HFTeacher.

SGLang's documented shape with `return_logprob=True`, `logprob_start_len=s`, `top_logprobs_num=k`:
`meta_info.input_token_logprobs` has one `[logprob, token_id, text|null]` per input position
s..n-1 (len = prompt_tokens - s), and `meta_info.input_top_logprobs` one list of k such triples
per position. A batch (`input_ids` a list of lists) answers with a list of results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from onpolicy.types import ScoreRequestItem, TeacherScores


def make_fake_sglang_app(model_dir: str | Path):

    from onpolicy.teacher.local import HFTeacher

    hf = HFTeacher(model_dir)
    eos = hf.info().eos_token_ids[0]
    app = FastAPI()
    app.state.requests = 0

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

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        app.state.requests += 1
        ids, start, k = (
            body["input_ids"],
            body.get("logprob_start_len", 0),
            int(body.get("top_logprobs_num", 0)),
        )
        batched = bool(ids) and isinstance(ids[0], list)
        ids = ids if batched else [ids]
        starts = start if isinstance(start, list) else [start] * len(ids)
        # One batched forward pass, as the real server would run (padding changes float noise).
        scores = hf.score(
            [ScoreRequestItem(prompt_ids=i[:s], completion_ids=i[s:]) for i, s in zip(ids, starts)], k
        )
        out = [one(i, s, k, sc) for i, s, sc in zip(ids, starts, scores)]
        return out if batched else out[0]

    return app

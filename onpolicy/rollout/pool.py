"""The rollout workers as one pool: fan prompts out and gather rollouts in order, push weights to all.

Weight push, CPU path: the `WeightUpdate` is put in the Ray object store once; every worker
reads it (zero-copy on the same node) and loads it with vLLM's
`collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, then resets its prefix
cache (`VLLMEngine.load_weights`). GPU path (later): vLLM's weight-transfer API over NCCL
(`WeightTransferConfig(backend="nccl")`, `start_weight_update` / `update_weights` /
`finish_weight_update`), which moves tensors GPU to GPU without the object store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from onpolicy.types import Rollout, RolloutBatch, WeightUpdate


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


@dataclass
class LaunchedPart:
    """One worker's share in flight: where its prompts start in the step, the ObjectRef of its
    `RolloutBatch`, and what it was asked (to ask again if the worker dies)."""

    offset: int
    ref: Any
    worker: int
    prompts: list[list[int]]
    kwargs: dict[str, Any]


@dataclass
class Launched:
    """Generation in flight on the workers: one part per busy worker."""

    parts: list[LaunchedPart]


@dataclass
class Part:
    """One worker's share of a step, back from the worker (rollouts re-indexed to the step's prompts)."""

    rollouts: list[Rollout]
    engine_seconds: float
    arrived_at: float = 0.0  # time.perf_counter() when the worker's answer was in
    result: Any = None  # what the caller's `on_part` made of it (e.g. the teacher's scores)


def launch_generate(workers: list[Any], prompts: list[list[int]], **kwargs: Any) -> Launched:
    """Fan prompts out over the rollout workers without waiting (contiguous shards, in order).

    Worker i gets `seed + i` (when a seed is given), so workers never draw the same samples."""
    parts, offset = [], 0
    for i, (worker, part) in enumerate(zip(workers, shard(prompts, len(workers)))):
        if part:
            seed = kwargs.get("seed")
            kw = dict(kwargs, seed=None if seed is None else seed + len(parts))
            parts.append(LaunchedPart(offset, worker.sample.remote(part, **kw), i, part, kw))
        offset += len(part)
    return Launched(parts)


def _part(batch: RolloutBatch, offset: int) -> Part:
    rollouts = batch.rollouts
    if offset:
        rollouts = [r.model_copy(update={"prompt_index": r.prompt_index + offset}) for r in rollouts]
    return Part(rollouts, batch.seconds, time.perf_counter())


def gather(launched: Launched, on_part: Callable[[list[Rollout]], Any] | None = None,
           recover: Callable[[int, BaseException], Any] | None = None) -> list[Part]:
    """Every worker's part of `launched`, in prompt order. With `on_part`, each part is handed over as soon
    as its worker finishes (e.g. to start scoring it while other workers still sample).

    With `recover(worker_index, error)`: a part whose worker died is asked again of the worker `recover`
    returns (restarted and serving current weights); the other workers' parts are kept."""
    import ray

    from onpolicy.ray_utils import is_actor_death

    pending = {p.ref: p for p in launched.parts}
    done: dict[int, Part] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending) if on_part is None else 1)
        for ref in ready:
            lp = pending.pop(ref)
            try:
                batch = ray.get(ref)
            except Exception as err:
                if recover is None or not is_actor_death(err):
                    raise
                worker = recover(lp.worker, err)
                lp = LaunchedPart(lp.offset, worker.sample.remote(lp.prompts, **lp.kwargs), lp.worker, lp.prompts,
                                  lp.kwargs)
                pending[lp.ref] = lp
                continue
            part = _part(batch, lp.offset)
            if on_part is not None:
                part.result = on_part(part.rollouts)
            done[lp.offset] = part
    return [done[off] for off in sorted(done)]


def generate_on(workers: list[Any], prompts: list[list[int]], *,
                recover: Callable[[int, BaseException], Any] | None = None, **kwargs: Any) -> list[Rollout]:
    """Fan prompts out over the rollout workers and gather rollouts in prompt order (`recover`: see `gather`)."""
    return [r for part in gather(launch_generate(workers, prompts, **kwargs), recover=recover) for r in part.rollouts]


def push_weights_async(update: Any, workers: list[Any]) -> list[Any]:
    """Queue `update` (a `WeightUpdate` or an ObjectRef to one) on every worker; returns the refs of the
    versions they will report. Ray runs one caller's calls to an actor in submission order, so any
    generation launched after this call samples from the new weights, and one launched before it
    (in flight) finishes on the old ones: the push never blocks sampling longer than the swap."""
    import ray

    ref = update if isinstance(update, ray.ObjectRef) else ray.put(update)
    return [w.load_weights.remote(ref) for w in workers]


def push_weights(update: WeightUpdate | Any, workers: list[Any]) -> list[int]:
    """Make every worker serve `update`; return the version each reports (all equal).

    `update` is a `WeightUpdate` or an `ObjectRef` to one (then it is not put again). Workers
    are `RolloutWorker` actor handles; they load in parallel.
    """
    import ray

    expected = None if isinstance(update, ray.ObjectRef) else update.version
    return check_push(ray.get(push_weights_async(update, workers)), expected)


def check_push(versions: list[int], expected: int | None) -> list[int]:
    """`versions` if every worker reports `expected` (None: the first worker's), else WeightPushError."""
    if expected is None:
        expected = versions[0] if versions else None
    bad = [(i, v) for i, v in enumerate(versions) if v != expected]
    if bad:
        raise WeightPushError(
            f"weight push of version {expected}: workers report other versions "
            + ", ".join(f"worker {i}: {v}" for i, v in bad)
        )
    return versions


def open_collective(learner: Any, workers: list[Any], timeout_s: float = 120.0) -> None:
    """Form the weight-sync group: the learner's rank 0 (it hosts the store) and every worker, which learns the
    names, shapes and dtype of a push once (`engines/collective.py`). Raises if the group cannot form."""
    import ray

    meta = ray.get(learner.weight_meta.remote())
    address, port = ray.get(learner.endpoint.remote())
    world = 1 + len(workers)
    ray.get([learner.open_sync.remote(address, port, world, timeout_s)]
            + [w.open_sync.remote(address, port, i + 1, world, meta, timeout_s) for i, w in enumerate(workers)],
            timeout=timeout_s)


def push_collective_async(learner: Any, workers: list[Any]) -> tuple[Any, list[Any]]:
    """Broadcast the learner's current weights to every worker: the ref of the learner's side (it fails at once
    if the learner cannot send, while the engines would wait for the group's timeout) and the refs of the
    versions the workers will serve (queued behind their sampling in flight, as `push_weights_async`)."""
    return learner.broadcast_weights.remote(), [w.receive_weights.remote() for w in workers]

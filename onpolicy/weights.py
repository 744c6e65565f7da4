"""Publishing the learner's weights to the rollout workers.

CPU path (this module): the `WeightUpdate` is put in the Ray object store once; every worker
reads it (zero-copy on the same node) and loads it with vLLM's
`collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, then resets its prefix
cache (`VLLMEngine.load_weights`). GPU path (later): vLLM's weight-transfer API over NCCL
(`WeightTransferConfig(backend="nccl")`, `start_weight_update` / `update_weights` /
`finish_weight_update`), which moves tensors GPU to GPU without the object store.
"""

from __future__ import annotations

from typing import Any

from onpolicy.types import WeightUpdate


class WeightPushError(RuntimeError):
    """A worker did not end up serving the pushed version."""


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

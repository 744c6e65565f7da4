"""The learner across ranks: one torch.distributed group, the student sharded with FSDP2.

Every rank receives the whole batch and builds the same `LearnBatch` (advantages and the loss
normaliser are the whole batch's, as on one rank). Micro-batch i goes to rank i % world; a rank with
one fewer runs an empty forward (weight 0) so every rank takes part in the same FSDP collectives.
Each micro-batch's loss is divided by the whole batch's normaliser, so the gradient is the SUM of the
ranks' gradients; FSDP's reduce-scatter averages (gloo has no pre-multiplied sum), so each rank
back-propagates `world` x its loss (`grad_scale`).
The loss and the per-token learner log-probs (for metrics) are summed across ranks, so every rank
logs the same numbers. Parameters are DTensors (sharded on dim 0); `full` gathers one.

Gloo on CPU, NCCL on GPU. Checkpoints: `torch.distributed.checkpoint` (sharded model and optimiser,
reshardable: N ranks save, M ranks load) plus a Hugging Face folder gathered on rank 0.
"""

from __future__ import annotations

import datetime
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, address: str, port: int, device: torch.device, timeout_s: float) -> str:
    """Join the learner's process group; returns the backend (nccl on CUDA, else gloo)."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each decoder layer its own unit (its parameters gathered only while it runs), then the rest."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"learner.num_ranks > 1 needs a decoder with `model.layers` ({type(model).__name__})")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) parameter or gradient; every rank must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def my_micro_batches(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """(indices of the micro-batches rank `rank` runs, how many empty forwards it adds so that every rank
    runs ceil(n / world))."""
    mine = list(range(rank, n, world))
    return mine, -(-n // world) - len(mine)


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks (in place, returned)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

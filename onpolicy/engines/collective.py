"""Collective weight sync: the learner's rank 0 broadcasts the weights to every rollout engine.

A process group of its own (not torch.distributed's default one, which a learner group uses for
FSDP): rank 0 is the learner, ranks 1..n the engines, rendezvous through a TCPStore at the learner's
address; gloo on CPU, NCCL on GPU. The engines know the names, shapes and dtype once (`WeightMeta`,
sent at set-up), so a push moves only tensor bytes: the weights are packed into flat buckets of at
most `bucket_bytes`, broadcast bucket by bucket, and unpacked on the engine into (name, tensor)
views that go straight into vLLM's `reload_weights`. Versioned: the learner sends the version first.

The object-store path (`WeightUpdate` through `ray.put`) stays the fallback (LoRA adapters, or when
no group can be formed).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

BUCKET_BYTES = 64 << 20


@dataclass(frozen=True)
class WeightMeta:
    """What the engines must know to receive a push: (name, shape) in order, and the one dtype."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str  # "float32", "bfloat16", ...

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def total_bytes(self) -> int:
        return sum(_numel(s) for s in self.shapes) * self.torch_dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def meta_of(tensors: list[tuple[str, torch.Tensor]]) -> WeightMeta:
    dtypes = {t.dtype for _, t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"a collective push sends one dtype, the weights have {sorted(map(str, dtypes))}")
    return WeightMeta(tuple(n for n, _ in tensors), tuple(tuple(t.shape) for _, t in tensors),
                      str(dtypes.pop()).removeprefix("torch."))


def buckets(meta: WeightMeta, bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Consecutive tensor indices grouped so each group's bytes stay under `bucket_bytes` (a tensor larger
    than that travels alone)."""
    out: list[list[int]] = []
    size = 0
    item = meta.torch_dtype.itemsize
    for i, shape in enumerate(meta.shapes):
        nbytes = _numel(shape) * item
        if out and size + nbytes <= bucket_bytes:
            out[-1].append(i)
            size += nbytes
        else:
            out.append([i])
            size = nbytes
    return out


def open_group(address: str, port: int, rank: int, world: int, device: torch.device, timeout_s: float):
    """A process group of `world` members apart from the default one (rank 0 hosts the store)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world, is_master=rank == 0, timeout=timeout)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def _broadcast(group, t: torch.Tensor) -> None:
    group.broadcast(t, 0).wait()


def send(group, version: int, tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int = BUCKET_BYTES) -> int:
    """(Learner, rank 0.) Broadcast the version, then the weights bucket by bucket; returns bytes sent."""
    _broadcast(group, torch.tensor([version], dtype=torch.int64, device=tensors[0][1].device))
    meta = meta_of(tensors)
    sent = 0
    for idx in buckets(meta, bucket_bytes):
        flat = torch.cat([tensors[i][1].reshape(-1) for i in idx])
        _broadcast(group, flat)
        sent += flat.numel() * flat.element_size()
    return sent


def receive(group, meta: WeightMeta, device: torch.device,
            bucket_bytes: int = BUCKET_BYTES) -> tuple[int, list[tuple[str, torch.Tensor]]]:
    """(Engine.) The version and every (name, tensor) the learner broadcast, as views of the buckets."""
    version = torch.zeros(1, dtype=torch.int64, device=device)
    _broadcast(group, version)
    out: list[tuple[str, torch.Tensor]] = []
    for idx in buckets(meta, bucket_bytes):
        flat = torch.empty(sum(_numel(meta.shapes[i]) for i in idx), dtype=meta.torch_dtype, device=device)
        _broadcast(group, flat)
        offset = 0
        for i in idx:
            n = _numel(meta.shapes[i])
            out.append((meta.names[i], flat[offset : offset + n].view(meta.shapes[i])))
            offset += n
    return int(version.item()), out

"""Collective weight sync (engines/collective.py): bucket plan, and a real gloo group between a sender and
two receivers (threads of this process, each its own group member) moving weights exactly."""

from __future__ import annotations

import threading

import pytest
import torch

from onpolicy.engines.collective import WeightMeta, buckets, meta_of, open_group, receive, send
from onpolicy.learner.distributed import free_port


def test_buckets_stay_under_the_size_and_keep_order():
    meta = WeightMeta(("a", "b", "c", "d"), ((4,), (2, 2), (16,), (1,)), "float32")  # 16, 16, 64, 4 bytes
    assert buckets(meta, 32) == [[0, 1], [2], [3]]  # c (64 B) is over the size: it travels alone
    assert buckets(meta, 1 << 20) == [[0, 1, 2, 3]]
    assert meta.total_bytes == 100


def test_meta_refuses_mixed_dtypes():
    with pytest.raises(ValueError, match="one dtype"):
        meta_of([("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.bfloat16))])


def test_broadcast_moves_every_tensor_exactly_in_several_buckets():
    g = torch.Generator().manual_seed(0)
    weights = [(f"layer.{i}.weight", torch.randn(8, 4 + i, generator=g)) for i in range(5)]
    meta = meta_of(weights)
    port, world = free_port(), 3
    got: dict[int, tuple[int, list]] = {}
    errors: list[BaseException] = []

    def member(rank: int) -> None:
        try:
            group = open_group("127.0.0.1", port, rank, world, torch.device("cpu"), 30.0)
            if rank == 0:
                got[0] = (send(group, 7, weights, bucket_bytes=300), [])
            else:
                got[rank] = receive(group, meta, torch.device("cpu"), bucket_bytes=300)
        except BaseException as err:  # noqa: BLE001 -- surfaced below
            errors.append(err)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert got[0][0] == meta.total_bytes and len(buckets(meta, 300)) > 1
    for rank in (1, 2):
        version, tensors = got[rank]
        assert version == 7 and [n for n, _ in tensors] == [n for n, _ in weights]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tensors, weights))

"""GPU check of the scale-out paths (run by bench/gpu_check.sh on a CUDA machine; not part of CI).

Needs torch and transformers only (no vLLM, no Ray). Prints, on one line each:
1. learner: the FSDP2 learner (`learner.num_ranks` path, world size 1 on one GPU) against the plain learner,
   3 steps in bf16 autocast on CUDA from the same tiny Llama: loss and weights, max |diff|;
2. sync: the collective weight broadcast (onpolicy/engines/collective.py) between two processes on the
   GPU: NCCL when it accepts two ranks on one device, else gloo over CUDA tensors; bytes/s and exactness.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_llama(path: Path) -> str:
    from onpolicy.kit.build import save_random_model
    from onpolicy.kit.spec import ModelSpec
    from onpolicy.toy.tokenizer import build_tokenizer

    spec = ModelSpec(name="gpu-check", arch="llama", num_layers=4, hidden=256, heads=4, intermediate=512,
                     max_positions=128)
    return str(save_random_model(path, spec, build_tokenizer(), seed=0))


def learner_parity(model: str) -> None:
    import torch.distributed as dist

    from onpolicy.config import RunConfig
    from onpolicy.learner.core import Learner
    from onpolicy.learner.distributed import free_port, init_group
    from onpolicy.types import Rollout, TeacherScores

    cfg = RunConfig()
    cfg.model.dtype = "bfloat16"
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = 1e-3, 0, "constant"
    cfg.resources.learner_device = "cuda"
    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(prompt_ids=[1, 5, 6], completion_ids=torch.randint(3, 16, (12,), generator=g).tolist(),
                        sampler_logprobs=[-1.0] * 12, policy_version=0) for _ in range(16)]
    scores = [TeacherScores(logprobs=(-torch.rand(12, generator=g) * 3).tolist()) for _ in rollouts]
    plain = Learner(model, cfg, device="cuda")
    init_group(0, 1, "127.0.0.1", free_port(), torch.device("cuda"), 120)
    sharded = Learner(model, cfg, device="cuda", rank=0, world=1)
    from onpolicy.learner.distributed import shard

    shard(sharded.model)  # the FSDP2 path on one rank (world 1 does not shard by itself)
    sharded.optimizer = torch.optim.AdamW(sharded.model.parameters(), lr=cfg.optim.lr)
    sharded.trainable = list(sharded.model.parameters())
    losses = []
    for _ in range(3):
        a, b = plain.train_step(rollouts, scores), sharded.train_step(rollouts, scores)
        losses.append(abs(a["loss"] - b["loss"]))
    wa, wb = dict(plain.weights()), dict(sharded.weights())
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    print(f"learner: FSDP2 (1 rank, bf16 autocast, CUDA) vs plain, 3 steps: max |loss diff| {max(losses):.2e}, "
          f"max |weight diff| {diff:.2e}")
    dist.destroy_process_group()


def _sync_member(rank: int, port: int, backend: str, n: int, out: dict) -> None:
    from onpolicy.engines import collective

    torch.cuda.set_device(0)
    device = torch.device("cuda")
    store = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    group = (torch.distributed.ProcessGroupNCCL(store, rank, 2) if backend == "nccl"
             else torch.distributed.ProcessGroupGloo(store, rank, 2))
    g = torch.Generator().manual_seed(1)
    weights = [(f"w{i}", torch.randn(1024, 1024, generator=g).to(device)) for i in range(n)]
    meta = collective.meta_of(weights)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if rank == 0:
        sent = collective.send(group, 1, weights)
        torch.cuda.synchronize()
        out["seconds"], out["bytes"] = time.perf_counter() - t0, sent
    else:
        _, got = collective.receive(group, meta, device)
        torch.cuda.synchronize()
        out["exact"] = all(torch.equal(a, b) for (_, a), (_, b) in zip(got, weights))


def sync_check(n: int = 64) -> None:
    from onpolicy.learner.distributed import free_port

    for backend in ("nccl", "gloo"):
        with mp.Manager() as manager:
            out = manager.dict()
            ctx = mp.get_context("spawn")
            port = free_port()
            procs = [ctx.Process(target=_sync_member, args=(r, port, backend, n, out)) for r in range(2)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout=300)
            if all(p.exitcode == 0 for p in procs) and "seconds" in out:
                gb = out["bytes"] / 1e9
                print(f"sync: {backend} broadcast of {gb:.2f} GB in {out['seconds']:.3f}s = {gb / out['seconds']:.2f} "
                      f"GB/s, exact: {out.get('exact')}")
                return
            print(f"sync: {backend} failed on one GPU (exit codes {[p.exitcode for p in procs]}); trying the next")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_llama(Path(tmp) / "student")
        learner_parity(model)
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    sync_check()


if __name__ == "__main__":
    main()

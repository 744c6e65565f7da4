"""Weight push, object store vs collective broadcast, side by side on the same actors.

    .venv/bin/python bench/weight_sync.py [--pair mid|toy] [--workers 2] [--pushes 5]

One learner actor and N vLLM rollout workers serving the pair's student. Each push is timed from the
call to every worker serving the new version (what a synchronous step waits for):
- object store: the learner's `WeightUpdate` put once in Ray's object store, each worker reads it and
  reloads (what a run does with `rollout.weight_sync=object_store`, and for LoRA adapters);
- collective: the learner's rank 0 broadcasts the weights over a gloo group to the workers, in buckets,
  and each reloads (`rollout.weight_sync=collective`, the default `auto` when the group forms).
After the collective pushes, every engine's log-probs of fixed sequences are compared with the learner's.
Prints bytes per push, median seconds per push, MB/s and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="mid", choices=("mid", "toy"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pushes", type=int, default=5)
    args = ap.parse_args()

    import ray
    from vs_trl_assets import prepare_pair

    from onpolicy.config import RunConfig
    from onpolicy.learner.actor import make_learner_actor
    from onpolicy.rollout.pool import check_push, open_collective, push_collective_async, push_weights_async
    from onpolicy.rollout.worker import make_rollout_workers
    from onpolicy.types import ScoreRequestItem

    pair, _ = prepare_pair(args.pair, ROOT / "bench" / ".cache", None, log=print)
    cfg = RunConfig()
    cfg.resources.learner_device = "cpu"
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    learner = make_learner_actor(cfg, pair.student)
    workers = make_rollout_workers(args.workers, pair.student, cfg)
    open_collective(learner, workers)
    meta = ray.get(learner.weight_meta.remote())

    def object_store(version: int) -> None:
        check_push(ray.get(push_weights_async(learner.weight_update.remote(), workers)), None)

    def collective(version: int) -> None:
        check_push(ray.get(push_collective_async(learner, workers)[1]), None)

    times: dict[str, list[float]] = {"object store": [], "collective": []}
    for i in range(args.pushes + 1):  # the first of each is a warm-up
        for name, push in (("object store", object_store), ("collective", collective)):
            t0 = time.perf_counter()
            push(i)
            if i:
                times[name].append(time.perf_counter() - t0)

    items = [ScoreRequestItem(prompt_ids=[1, 5, 6, 7], completion_ids=[8, 9, 10]),
             ScoreRequestItem(prompt_ids=[1, 11, 12], completion_ids=[13, 14, 15, 16])]
    ref = ray.get(learner.score.remote(items))
    worst = max(abs(a - b) for w in workers for ra, rb in zip(ref, ray.get(w.score.remote(items)))
                for a, b in zip(ra, rb))
    mb = meta.total_bytes / 1e6
    print(f"\n{args.pair} student, {len(meta.names)} tensors, {mb:.1f} MB per push ({meta.dtype}), "
          f"{args.workers} workers, median of {args.pushes} pushes")
    print("| path | seconds per push | MB/s (to all workers) |")
    print("|---|---|---|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, s in med.items():
        print(f"| {name} | {s:.3f} | {mb * args.workers / s:.0f} |")
    print(f"collective / object store time: {med['collective'] / med['object store']:.2f}x; engine vs learner "
          f"log-probs after the collective pushes: max |diff| {worst:.1e}")
    ray.shutdown()


if __name__ == "__main__":
    main()

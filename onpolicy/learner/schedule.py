"""The learning-rate schedule: warm-up, then constant, linear or cosine decay (a pure function)."""

from __future__ import annotations

import math


def lr_at(step: int, optim, total_steps: int | None) -> float:
    """Learning rate for update number `step` (0-based), from an `OptimConfig`:

        warm-up (step < W):  lr * (step + 1) / W       (the first update is not wasted at lr 0)
        after, with progress u = (step - W) / max(1, total_steps - 1 - W) clipped to [0, 1]:
          constant: lr
          linear:   lr * (1 - (1 - min_lr_ratio) u)
          cosine:   lr * (min_lr_ratio + (1 - min_lr_ratio) (1 + cos(pi u)) / 2)

    So the last update (step = total_steps - 1) runs at min_lr_ratio * lr. Without
    `total_steps` the rate stays at lr after warm-up."""
    peak, warmup = optim.lr, optim.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if optim.schedule == "constant" or total_steps is None:
        return peak
    u = min(max((step - warmup) / max(1, total_steps - 1 - warmup), 0.0), 1.0)
    floor = optim.min_lr_ratio
    if optim.schedule == "linear":
        return peak * (1.0 - (1.0 - floor) * u)
    if optim.schedule == "cosine":
        return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * u)))
    raise ValueError(f"unknown lr schedule {optim.schedule!r}")

"""The learner as a Ray actor: a thin shell that forwards to `Learner`.

Ray and torch are imported only when an actor is made or started, so importing
`onpolicy.learner` stays cheap for the CLI and the control API.
"""

from __future__ import annotations

from typing import Any

from onpolicy.ray_utils import actor_class


class LearnerShell:
    """Plain class wrapped by `ray.remote`; every method forwards to a `Learner`."""

    def __init__(self, model_path: str, cfg, *, device: str | None = None, total_steps: int | None = None):
        from onpolicy.learner.core import Learner

        self.learner = Learner(model_path, cfg, device=device, total_steps=total_steps)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def train_step(self, rollouts, scores) -> dict[str, float]:
        return self.learner.train_step(rollouts, scores)

    def weight_update(self):
        return self.learner.weight_update()

    def score(self, items) -> list[list[float]]:
        return self.learner.score(items)

    def save_checkpoint(self, path: str, extra_json: dict[str, dict] | None = None) -> None:
        self.learner.save_checkpoint(path, extra_json)

    def load_checkpoint(self, path: str) -> int:
        self.learner.load_checkpoint(path)
        return self.learner.step

    def save_model(self, path: str) -> None:
        self.learner.save_model(path)

    def step(self) -> int:
        return self.learner.step

    def endpoint(self) -> tuple[str, int]:
        """(this node's address, a free port): where this learner hosts a process group."""
        import ray

        from onpolicy.learner.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def weight_meta(self):
        return self.learner.weight_meta()

    def open_sync(self, address: str, port: int, world: int, timeout_s: float) -> bool:
        self.learner.open_sync(address, port, world, timeout_s)
        return True

    def broadcast_weights(self) -> dict[str, float]:
        return self.learner.broadcast_weights()


def make_learner_actor(
    cfg,
    model_path: str,
    *,
    num_cpus: float | None = None,
    num_gpus: float = 0,
    device: str | None = None,
    total_steps: int | None = None,
    **options: Any,
):
    """Start a learner actor and return its handle. `num_cpus` defaults to
    `cfg.resources.learner_num_cpus`; extra keyword arguments go to `.options()` (name, ...). Ray restarts
    it `cfg.resources.max_restarts` times from its constructor (the base student): the driver then loads
    the last checkpoint into it."""
    cpus = cfg.resources.learner_num_cpus if num_cpus is None else num_cpus
    options.setdefault("max_restarts", cfg.resources.max_restarts)
    return actor_class(LearnerShell).options(num_cpus=cpus, num_gpus=num_gpus, **options).remote(
        model_path, cfg, device=device, total_steps=total_steps
    )

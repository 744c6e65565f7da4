"""A learner group: `learner.num_ranks` Ray actors forming one torch.distributed group (FSDP2).

`LearnerGroup` looks to the driver like one learner actor handle: `group.train_step.remote(...)`
sends the call to every rank (each takes its share of the micro-batches, see `distributed.py`) and
returns rank 0's ObjectRef, whose answer stands for the group (every rank computes the same
metrics; only rank 0 returns the weights). The ranks are placed with a Ray placement group
(`learner.placement`: pack or spread). Rank 0 names the rendezvous address once every rank is placed.

A group is not restarted rank by rank (a rank that dies breaks the collectives): its ranks are
created with max_restarts=0, and the driver makes a new group and loads the last checkpoint. A rank's
death reaches the others as an error of their collectives ("Connection closed by peer"), not as an
actor death, so `learner_lost` asks every rank whether it is still there.
"""

from __future__ import annotations

from typing import Any

from onpolicy.learner.actor import LearnerShell
from onpolicy.ray_utils import actor_class, died


class LearnerRank(LearnerShell):
    """One rank: joins the group in `setup` (after every rank is placed), then forwards like `LearnerShell`."""

    def __init__(self, model_path: str, cfg, *, rank: int, world: int, device: str | None = None,
                 total_steps: int | None = None):
        self.args = (model_path, cfg, device, total_steps)
        self.rank, self.world = rank, world
        self.learner = None

    def setup(self, address: str, port: int, timeout_s: float) -> bool:
        import torch

        from onpolicy.learner.core import Learner, resolve_device
        from onpolicy.learner.distributed import init_group

        model_path, cfg, device, total_steps = self.args
        dev = resolve_device(device if device is not None else cfg.resources.learner_device)
        init_group(self.rank, self.world, address, port, dev, timeout_s)
        self.learner = Learner(model_path, cfg, device=device, total_steps=total_steps, rank=self.rank,
                               world=self.world)
        torch.set_num_threads(max(1, cfg.threads()["learner"] // self.world))  # the ranks share the cores
        return True

    def weight_update(self):
        update = self.learner.weight_update()  # every rank gathers its shards...
        return update if self.rank == 0 else None  # ...rank 0 sends them

    def score(self, items) -> list[list[float]]:
        return self.learner.score(items)

    def open_sync(self, address: str, port: int, world: int, timeout_s: float) -> bool:
        if self.rank == 0:  # the engines' group has the learner's rank 0 only
            self.learner.open_sync(address, port, world, timeout_s)
        return True


class _FanOut:
    def __init__(self, ranks: list[Any], name: str) -> None:
        self.ranks, self.name = ranks, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        refs = [getattr(r, self.name).remote(*args, **kwargs) for r in self.ranks]
        return refs[0]


class LearnerGroup:
    """The ranks of one learner, called like a single learner actor (see the module doc)."""

    def __init__(self, ranks: list[Any], placement: Any) -> None:
        self.ranks, self.placement = ranks, placement

    def __getattr__(self, name: str) -> _FanOut:
        if name.startswith("_"):
            raise AttributeError(name)
        return _FanOut(self.ranks, name)

    @property
    def _actor_id(self) -> Any:
        """Rank 0's id: a death the driver sees comes through rank 0's answer."""
        return self.ranks[0]._actor_id

    def lost_rank(self, timeout_s: float = 30.0) -> bool:
        """Whether any rank has died (a live rank answers at once unless busy: busy counts as alive)."""
        import ray

        refs = [r.pid.remote() for r in self.ranks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                return True
        return False

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for r in self.ranks:
            ray.kill(r, no_restart=True)
        remove_placement_group(self.placement)


def make_learner_group(cfg, model_path: str, *, device: str | None = None, total_steps: int | None = None,
                       timeout_s: float = 600.0) -> LearnerGroup:
    """Place `cfg.learner.num_ranks` ranks, join them into one process group, load the student on each."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = cfg.learner.num_ranks
    cpus = max(cfg.resources.learner_num_cpus, 0.01)  # a bundle needs some resource
    pg = placement_group([{"CPU": cpus}] * world, strategy=cfg.learner.placement.upper())
    ray.get(pg.ready(), timeout=timeout_s)
    ranks = [
        actor_class(LearnerRank).options(
            num_cpus=cpus, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(model_path, cfg, rank=i, world=world, device=device, total_steps=total_steps)
        for i in range(world)
    ]
    address, port = ray.get(ranks[0].endpoint.remote())
    ray.get([r.setup.remote(address, port, timeout_s) for r in ranks])
    return LearnerGroup(ranks, pg)


def learner_lost(err: BaseException, learner: Any) -> bool:
    """Whether `err`, from a learner call or a call that waited on one, means the learner is gone: its actor
    died, or (a group) one of its ranks did."""
    if isinstance(learner, LearnerGroup):
        return died(err, learner) or learner.lost_rank()
    return died(err, learner)


def kill_learner(learner: Any) -> None:
    """Stop a learner actor or a learner group for good."""
    import ray

    if isinstance(learner, LearnerGroup):
        learner.kill()
    else:
        ray.kill(learner, no_restart=True)


def make_learner(cfg, model_path: str, **kwargs: Any) -> Any:
    """The run's learner: one actor (`learner.num_ranks = 1`) or a group, behind the same calls."""
    from onpolicy.learner.actor import make_learner_actor

    if cfg.learner.num_ranks > 1:
        return make_learner_group(cfg, model_path, **kwargs)
    return make_learner_actor(cfg, model_path, **kwargs)

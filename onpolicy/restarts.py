"""Bringing a run's dead actors back (the driver's only failure path besides failing the run).

- A rollout worker: wait for Ray's restart of it (`resources.max_restarts`) or make a new one, give it the
  current weights, and let the caller ask it again for its part of the step (other workers' parts are kept).
- The learner (or a rank of a learner group: the group is made again whole, a rank cannot rejoin its
  collectives): a new one at the last whole checkpoint, with the prompt stream and `metrics.jsonl` rewound
  to it (`schedule.max_learner_restarts` times).
- The push check, where both deaths show: every worker took the last push, or it is brought back.

Which checkpoint to trust and the fault counts are pure (`onpolicy.recovery`); this module acts on the run's
actors, so it holds the run (`Restarts(run)`) and changes its learner, workers, step, stream and log.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from onpolicy.learner.group import LearnerGroup, kill_learner, learner_lost, make_learner
from onpolicy.ray_utils import died, wait_until_back
from onpolicy.recovery import TooManyRestarts, restore_checkpoint
from onpolicy.rollout.pool import check_push, push_weights
from onpolicy.rollout.weight_sync import Push
from onpolicy.step_stats import NonFinite


class Restarts:
    """What the run does when one of its actors dies; every method may be called from a sampler thread."""

    def __init__(self, run: Any) -> None:  # the driver's Run (this module sits below it)
        self.run = run
        self._lock = threading.Lock()
        self.worker_pids: list[int] = []  # a pid that changed is a worker Ray restarted

    def watch(self, workers: list) -> None:
        import ray

        self.worker_pids = ray.get([w.pid.remote() for w in workers])

    def worker(self, i: int, err: BaseException):
        """Rollout worker i died: wait for Ray's restart (or make a new one), give it the current weights; returns
        the live handle. Called by whoever saw the death (a sampler thread, the push check); the pid tells a
        fresh restart from one another thread already handled."""
        import ray

        from onpolicy.rollout.worker import make_rollout_workers

        run = self.run
        if run.closing:
            raise err
        with self._lock:
            t0 = time.perf_counter()
            action = "restarted"
            if not wait_until_back(run.workers[i], run.cfg.resources.restart_timeout_s, give_up=lambda: run.closing):
                if run.closing:
                    raise err
                ray.kill(run.workers[i], no_restart=True)
                run.workers[i] = make_rollout_workers(1, run.student_path, run.cfg, seed_offset=i)[0]
                action = "re-created"
            worker = run.workers[i]
            pid = ray.get(worker.pid.remote())
            if pid == self.worker_pids[i]:
                return worker  # already brought back by another thread
            self.worker_pids[i] = pid
            run.sync.leave("a rollout worker was restarted")
            version = push_weights(run.learner.weight_update.remote(), [worker])[0]
            run.faults.rollout += 1
        run.on_fault({"actor": f"rollout_worker_{i}", "action": action, "weights_version": version,
                      "recover_seconds": time.perf_counter() - t0, "error": type(err).__name__})
        return worker

    def learner_back(self, err: BaseException) -> bool:
        """A call that needed the learner failed with `err`: True if the learner (or a rank of its group) was lost
        and is back at its last checkpoint; False if the error is the run's own."""
        if self.run.closing or not learner_lost(err, self.run.learner):
            return False
        self._learner(err)
        return True

    def _learner(self, err: BaseException) -> None:
        """The learner died: restart it (Ray's restart, or a new actor), load the last whole checkpoint (none: the
        base student, step 0), rewind the prompt stream and the metrics to it, push its weights."""
        import ray

        run = self.run
        run.faults.learner += 1
        limit = run.cfg.schedule.max_learner_restarts
        if run.faults.learner > limit:
            raise TooManyRestarts(f"the learner died {run.faults.learner} times (schedule.max_learner_restarts="
                                  f"{limit}); last: {err}") from err
        t0 = time.perf_counter()
        group = isinstance(run.learner, LearnerGroup)
        if group:  # made again whole (a rank cannot rejoin its collectives); first, so a broadcast it owed ends
            kill_learner(run.learner)
        self._drain()
        action = "restarted"
        if group or not wait_until_back(run.learner, run.cfg.resources.restart_timeout_s):
            if not group:
                kill_learner(run.learner)
            run.stack.learner, action = make_learner(run.cfg, run.student_path), "re-created"
        restored = restore_checkpoint(run.out / "checkpoints", lambda p: ray.get(run.learner.load_checkpoint.remote(p)))
        step, drawn = (restored.state["step"], restored.state["prompts_drawn"]) if restored else (0, 0)
        lost, run.step = run.step - step, step
        run.source.rewind(drawn)
        run.nonfinite = NonFinite()
        run.log.rewind(step)
        run.sync.leave("the learner was restarted")
        push_weights(run.learner.weight_update.remote(), run.workers)
        run.on_fault({"actor": "learner", "action": action, "checkpoint": str(restored.path) if restored else None,
                      "steps_redone": lost, "recover_seconds": time.perf_counter() - t0, "error": type(err).__name__})

    def _drain(self) -> None:
        """Let the batches sampled ahead finish (their results are dropped) and forget queued pushes."""
        import ray

        run = self.run
        for p in run.pending:
            try:
                p.sampled.result()
            except Exception:  # noqa: BLE001, S110 -- dropped anyway
                pass
        run.pending.clear()
        for ref in run.pushed.worker_refs:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001, S110 -- the push is redone after the rewind
                pass
        run.pushed = Push()

    def check_pushes(self) -> bool:
        """The previous push landed on every worker (a worker that died meanwhile is brought back and given the
        current weights instead). False when the learner was lost: it is back at its last checkpoint."""
        import ray

        run = self.run
        pushed, versions = run.pushed, []
        try:
            if pushed.learner_ref is not None:  # a broadcast: the learner's side first (the engines would wait)
                ray.get(pushed.learner_ref)
        except Exception as err:
            if not self.learner_back(err):
                raise
            return False
        for i, ref in enumerate(pushed.worker_refs):
            try:
                versions.append(ray.get(ref))
            except Exception as err:
                if died(err, run.workers[i]):
                    self.worker(i, err)
                elif pushed.by == "collective" and not learner_lost(err, run.learner):
                    # a broadcast cut short by a fault: send it the other way
                    run.sync.leave(f"a broadcast failed ({type(err).__name__})")
                    try:
                        versions = push_weights(run.learner.weight_update.remote(), run.workers)
                    except Exception as again:  # the learner died with the broadcast: it shows only now
                        if self.learner_back(again):
                            return False
                        raise
                    break
                elif self.learner_back(err):
                    return False
                else:
                    raise
        check_push(versions, run.step)
        return True

"""A run as a detached Ray actor, so the control plane holds no training state.

One named actor per run (`onpolicy-run-<id>` in namespace `onpolicy`, lifetime detached,
num_cpus=0). It calls `driver.train` (optionally from the latest checkpoint) in a background
thread; `stop()`/`pause()` set a flag the loop checks between steps. Everything a reader needs
(status, step, metrics) goes to files in the run directory, so the API can restart, or run as
several replicas, while the run goes on.

The actor is a thin shell: the pure helpers below (names, CPU needs, the final status) are tested
without Ray.
"""

from __future__ import annotations

import threading
import traceback
from typing import Any

from onpolicy.config import RunConfig
from onpolicy.ray_utils import actor_class
from onpolicy.status import TERMINAL, RunStatus

NAMESPACE = "onpolicy"
ACTOR_PREFIX = "onpolicy-run-"


def actor_name(run_id: str) -> str:
    return f"{ACTOR_PREFIX}{run_id}"


def run_id_of(name: str) -> str | None:
    return name[len(ACTOR_PREFIX):] if name.startswith(ACTOR_PREFIX) else None


def required_cpus(cfg: RunConfig) -> float:
    """Ray CPUs a run reserves: its rollout workers plus its learner ranks (the driver itself takes none)."""
    res = cfg.resources
    return cfg.rollout.num_workers * res.worker_num_cpus + cfg.learner.num_ranks * res.learner_num_cpus


def final_status(stopped: bool, pause_requested: bool) -> RunStatus:
    """What a run that left its loop is: paused (a pause was asked), stopped, or finished."""
    if stopped:
        return RunStatus.PAUSED if pause_requested else RunStatus.STOPPED
    return RunStatus.FINISHED


class RunActor:
    """The body of the run actor (a plain class; `launch_run_actor` makes it a detached Ray actor)."""

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self._stop = threading.Event()
        self._pause = False
        self._phase: RunStatus | str = "created"
        self._error: str | None = None
        self._run = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def ping(self) -> str:
        return "ok"

    def pid(self) -> int:
        import os

        return os.getpid()

    def start(self) -> None:
        """Start training in a background thread (a second call does nothing)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="onpolicy-run", daemon=True)
        self._thread.start()

    def _on_start(self, run) -> None:
        self._run = run
        self._phase = RunStatus.RUNNING

    def _main(self) -> None:
        from onpolicy.driver import train

        self._phase = RunStatus.STARTING
        try:
            summary = train(self.cfg, resume=self.resume, show_progress=False, should_stop=self._stop.is_set,
                            stopped_status=lambda: final_status(True, self._pause), on_start=self._on_start)
            self._phase = final_status(bool(summary.get("stopped")), self._pause)
        except BaseException as err:  # noqa: BLE001 -- train() wrote the reason to status.json
            self._phase = RunStatus.FAILED
            self._error = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        finally:
            self._closed = True

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        return self.state()

    def pause(self) -> dict[str, Any]:
        self._pause = True
        self._stop.set()
        return self.state()

    def state(self) -> dict[str, Any]:
        run = self._run
        return {
            "phase": str(self._phase),
            "step": run.step if run is not None else 0,
            "stop_requested": self._stop.is_set(),
            "pause_requested": self._pause,
            "error": self._error,
            "done": self._phase in TERMINAL,
            "closed": self._closed,
        }


def launch_run_actor(run_id: str, cfg: RunConfig, resume: bool = False, ping_timeout_s: float = 60.0):
    """Create the detached actor of `run_id`, wait until it answers, start its run; return the handle."""
    import ray

    handle = actor_class(RunActor).options(
        name=actor_name(run_id), namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_restarts=0,
        max_concurrency=8,
    ).remote(cfg, resume)
    ray.get(handle.ping.remote(), timeout=ping_timeout_s)
    ray.get(handle.start.remote(), timeout=ping_timeout_s)
    return handle


def get_run_actor(run_id: str):
    """The live actor of `run_id`, or None."""
    import ray

    try:
        return ray.get_actor(actor_name(run_id), namespace=NAMESPACE)
    except ValueError:
        return None

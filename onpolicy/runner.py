"""A run as a detached Ray actor, so the control plane holds no training state.

One named actor per run (`onpolicy-run-<id>` in namespace `onpolicy`, lifetime detached,
num_cpus=0). It builds a `Run`, starts it (optionally from the latest checkpoint) and trains in a
background thread; `stop()`/`pause()` set a flag the loop checks between steps. Everything a
reader needs (status, step, metrics) goes to files in the run directory, so the API can restart,
or run as several replicas, while the run goes on.

The actor is a thin shell: the pure helpers below (names, CPU needs, the final status) are tested
without Ray.
"""

from __future__ import annotations

import threading
import traceback
from typing import Any

NAMESPACE = "onpolicy"
ACTOR_PREFIX = "onpolicy-run-"
TERMINAL = ("finished", "stopped", "paused", "failed")


def actor_name(run_id: str) -> str:
    return f"{ACTOR_PREFIX}{run_id}"


def run_id_of(name: str) -> str | None:
    return name[len(ACTOR_PREFIX):] if name.startswith(ACTOR_PREFIX) else None


def required_cpus(cfg: dict[str, Any]) -> float:
    """Ray CPUs a run reserves: its rollout workers plus its learner (the driver itself takes none)."""
    res = cfg.get("resources") or {}
    workers = int((cfg.get("rollout") or {}).get("num_workers", 1))
    return workers * float(res.get("worker_num_cpus", 0.0)) + float(res.get("learner_num_cpus", 0.0))


def final_status(stopped: bool, pause_requested: bool) -> str:
    """What a run that left its loop is: paused (a pause was asked), stopped, or finished."""
    if stopped:
        return "paused" if pause_requested else "stopped"
    return "finished"


class RunDriver:
    """The body of the driver actor (plain class: `ray.remote` wraps it in `driver_actor_class`)."""

    def __init__(self, cfg: dict[str, Any], resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self._stop = threading.Event()
        self._pause = False
        self._phase = "created"
        self._error: str | None = None
        self._summary: dict[str, Any] | None = None
        self._run = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def ping(self) -> str:
        return "ok"

    def start(self) -> None:
        """Start training in a background thread (a second call does nothing)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="onpolicy-run", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        from onpolicy.config import config_from_dict
        from onpolicy.driver import Run
        from onpolicy.status import write_status

        run = None
        try:
            self._phase = "starting"
            run = self._run = Run(config_from_dict(self.cfg), show_progress=False)
            run.start(resume=self.resume)
            self._phase = "running"
            summary = run.run(should_stop=self._stop.is_set)
            self._summary = summary
            self._phase = final_status(bool(summary.get("stopped")), self._pause)
            if self._phase == "paused":
                run.set_status("paused")  # type: ignore[arg-type]
        except BaseException as err:  # noqa: BLE001 -- any failure ends the run; say why in status.json
            self._phase = "failed"
            self._error = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            step = getattr(run, "step", 0) if run is not None else 0
            write_status(self.cfg["output_dir"], "failed", step=step, reason=self._error)
        finally:
            if run is not None:
                try:
                    run.close()
                except Exception:  # noqa: BLE001 -- closing is best effort
                    traceback.print_exc()
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
            "phase": self._phase,
            "step": getattr(run, "step", 0) if run is not None else 0,
            "stop_requested": self._stop.is_set(),
            "pause_requested": self._pause,
            "error": self._error,
            "done": self._phase in TERMINAL,
            "closed": self._closed,
        }


def driver_actor_class():
    """`RunDriver` as a Ray actor class (imports Ray only when called)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)(RunDriver)


def launch_driver(run_id: str, cfg: dict[str, Any], resume: bool = False, ping_timeout_s: float = 60.0):
    """Create the detached driver actor of `run_id`, wait until it answers, start its run; return the handle."""
    import ray

    cls = driver_actor_class()
    handle = cls.options(name=actor_name(run_id), namespace=NAMESPACE, lifetime="detached").remote(cfg, resume)
    ray.get(handle.ping.remote(), timeout=ping_timeout_s)
    ray.get(handle.start.remote(), timeout=ping_timeout_s)
    return handle


def get_driver(run_id: str):
    """The live driver actor of `run_id`, or None."""
    import ray

    try:
        return ray.get_actor(actor_name(run_id), namespace=NAMESPACE)
    except ValueError:
        return None

"""Where runs execute. `RayLauncher`: one detached driver actor per run on an existing Ray cluster.
`InMemoryLauncher`: no Ray; runs "start" and "stop" by writing status.json (tests of the HTTP layer).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from onpolicy.config import RunConfig
from onpolicy.ray_utils import match_cluster_auth
from onpolicy.status import RunStatus, write_status

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The run could not be started (the reason is shown on the run)."""


@runtime_checkable
class Launcher(Protocol):
    def submit(self, run_id: str, cfg: RunConfig, resume: bool) -> None:
        """Start the run's driver (raise LaunchError if it cannot be)."""

    def request_stop(self, run_id: str, pause: bool) -> bool:
        """Ask the driver to stop (or pause) after its current step; False if it has no driver."""

    def is_alive(self, run_id: str) -> bool | None:
        """Whether the run's driver exists (None: cannot tell now, e.g. the cluster is unreachable)."""

    def live_run_ids(self) -> set[str] | None:
        """Ids of every run that has a driver (None: cannot tell)."""

    def driver_state(self, run_id: str) -> dict[str, Any] | None:
        """What the run's driver says of itself (`RunActor.state()`: phase, error, closed); None: no driver,
        or it does not answer now."""

    def reap(self, run_id: str, force: bool = False) -> bool:
        """Remove a driver whose run is over (once it has closed its actors; `force`: now)."""

    def free_cpus(self) -> float | None:
        """CPUs the cluster has free (None: unknown, do not limit)."""

    def ready(self) -> str | None:
        """None when runs can be launched and watched now, else why not (one short phrase)."""


def gcs_listening(address: str, timeout_s: float = 2.0) -> None:
    """LaunchError at once if nothing listens at a `host:port` address: `ray.init` would retry for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # `auto` and the like: Ray finds the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise LaunchError(f"nothing answers at the Ray address {address} ({err.strerror or type(err).__name__}). "
                          "Start the cluster (`ray start --head`) or fix RAY_ADDRESS.") from err


class RayLauncher:
    """Joins the cluster at `address` (RAY_ADDRESS, or `auto`: a cluster already running on this host).

    The API never starts a Ray instance of its own: if it did, killing the API would kill the runs.
    """

    def __init__(self, address: str | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or "auto"
        self._lock = threading.Lock()
        self._connected = False

    def _ray(self):
        import ray

        from onpolicy.run_actor import NAMESPACE

        with self._lock:
            if not self._connected:
                if ray.is_initialized():
                    ray.shutdown()
                match_cluster_auth(self.address)
                gcs_listening(self.address)
                try:
                    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
                    ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                             runtime_env={"env_vars": env})
                except Exception as err:
                    raise LaunchError(f"cannot connect to the Ray cluster at {self.address!r}: {err}. Start one "
                                      "(`ray start --head`) and set RAY_ADDRESS.") from err
                self._connected = True
        return ray

    def submit(self, run_id: str, cfg: RunConfig, resume: bool) -> None:
        from onpolicy.run_actor import launch_run_actor

        self._ray()
        self.reap(run_id, force=True)  # a previous driver of this run (stopped/paused) is done
        try:
            launch_run_actor(run_id, cfg, resume=resume)
        except Exception as err:
            raise LaunchError(f"could not start the driver actor: {type(err).__name__}: {err}") from err

    def _handle(self, run_id: str):
        from onpolicy.run_actor import get_run_actor

        self._ray()
        return get_run_actor(run_id)

    def request_stop(self, run_id: str, pause: bool) -> bool:
        ray = self._ray()
        handle = self._handle(run_id)
        if handle is None:
            return False
        try:
            ray.get((handle.pause if pause else handle.stop).remote(), timeout=30)
        except Exception as err:  # noqa: BLE001 -- a dead actor: the run is lost, refresh says so
            log.warning("stop of run %s failed: %s", run_id, err)
            return False
        return True

    def is_alive(self, run_id: str) -> bool | None:
        try:
            return self._handle(run_id) is not None
        except LaunchError:
            return None

    def live_run_ids(self) -> set[str] | None:
        from onpolicy.run_actor import NAMESPACE, run_id_of

        try:
            ray = self._ray()
            names = ray.util.list_named_actors(all_namespaces=True)
        except Exception:  # noqa: BLE001
            return None
        ids = set()
        for entry in names:
            if isinstance(entry, dict) and entry.get("namespace") == NAMESPACE:
                rid = run_id_of(entry.get("name", ""))
                if rid:
                    ids.add(rid)
        return ids

    def driver_state(self, run_id: str) -> dict[str, Any] | None:
        try:
            ray = self._ray()
            handle = self._handle(run_id)
            return None if handle is None else ray.get(handle.state.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 -- no answer now; the next pass asks again
            log.info("driver of run %s did not say its state: %s", run_id, err)
            return None

    def reap(self, run_id: str, force: bool = False) -> bool:
        ray = self._ray()
        handle = self._handle(run_id)
        if handle is None:
            return False
        if not force:
            try:
                if not ray.get(handle.state.remote(), timeout=10).get("closed"):
                    return False
            except Exception as err:  # noqa: BLE001 -- unresponsive: kill it
                log.info("driver of run %s does not answer (%s); removing it", run_id, err)
        ray.kill(handle, no_restart=True)
        return True

    def free_cpus(self) -> float | None:
        try:
            return float(self._ray().available_resources().get("CPU", 0.0))
        except LaunchError:
            return None

    def ready(self) -> str | None:
        try:
            ray = self._ray()
        except LaunchError as err:
            return f"cannot join the cluster at {self.address} ({type(err.__cause__ or err).__name__})"
        try:
            ray.cluster_resources()
        except Exception as err:  # noqa: BLE001 -- a reason, not an error
            return f"the cluster at {self.address} does not answer ({type(err).__name__})"
        return None


class InMemoryLauncher:
    """Runs that exist only as status files: `submit` writes `running`, a stop writes `stopped`/`paused`.

    For tests of the HTTP layer and the fuzz: `fail_with` makes every submission fail with that reason
    (`fail_after_create`: after its driver exists, as when a Ray actor does not answer in time);
    `gate`, while not set, holds each submission (a launch in progress); `list_gate`, while not set, holds
    `live_run_ids` (a cluster slow to answer the reconciler).
    """

    def __init__(self, cpus: float | None = None, fail_with: str | None = None, fail_after_create: bool = False,
                 gate: threading.Event | None = None, list_gate: threading.Event | None = None):
        self.cpus = cpus
        self.fail_with = fail_with
        self.fail_after_create = fail_after_create
        self.gate = gate
        self.list_gate = list_gate
        self.unready: str | None = None  # what `ready()` says (None: ready)
        self.live: dict[str, dict[str, Any]] = {}
        self.submits: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    def submit(self, run_id: str, cfg: RunConfig, resume: bool) -> None:
        if self.fail_with and not self.fail_after_create:
            raise LaunchError(self.fail_with)
        if self.gate is not None and not self.gate.wait(timeout=60):
            raise LaunchError("the test never opened the launch gate")
        with self._lock:
            self.submits.append((run_id, resume))
            self.live[run_id] = {"cfg": cfg, "step": 0, "phase": "running", "error": None}
        if self.fail_with:
            raise LaunchError(self.fail_with)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        write_status(cfg.output_dir, RunStatus.RUNNING, step=0)

    def request_stop(self, run_id: str, pause: bool) -> bool:
        with self._lock:
            entry = self.live.pop(run_id, None)
        if entry is None:
            return False
        write_status(entry["cfg"].output_dir, RunStatus.PAUSED if pause else RunStatus.STOPPED, step=entry["step"])
        return True

    def is_alive(self, run_id: str) -> bool | None:
        return run_id in self.live

    def live_run_ids(self) -> set[str] | None:
        if self.list_gate is not None and not self.list_gate.wait(timeout=60):
            return None
        return set(self.live)

    def driver_state(self, run_id: str) -> dict[str, Any] | None:
        entry = self.live.get(run_id)
        if entry is None:
            return None
        done = entry["phase"] in ("finished", "stopped", "paused", "failed")
        return {"phase": entry["phase"], "step": entry["step"], "error": entry["error"], "done": done,
                "closed": done}

    def reap(self, run_id: str, force: bool = False) -> bool:
        return self.live.pop(run_id, None) is not None

    def free_cpus(self) -> float | None:
        return self.cpus

    def ready(self) -> str | None:
        return self.unready

    def lose(self, run_id: str) -> None:
        """Simulate a driver that died (node lost) without writing a final status."""
        self.live.pop(run_id, None)

    def fail_unrecorded(self, run_id: str, error: str) -> None:
        """Simulate a driver whose `train()` failed and whose write of the failure to status.json failed too
        (a full disk): the actor lives on and says `failed`, the file still says `running`."""
        self.live[run_id].update(phase="failed", error=error)

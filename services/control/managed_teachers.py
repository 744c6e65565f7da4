"""Managed teachers: our scoring service as Ray Serve applications on the cluster the control plane uses.

One application per teacher, named by its id, at route `/teachers/<id>` of Serve's HTTP proxy. Runs reach
it at `<proxy>/teachers/<id>/runs/<run id>` (onpolicy/teacher/clients/managed.py). The application is built
from its import path, `SERVE_APP`, as Serve's own `serve run module:builder` does: the control plane never
imports the teacher service (pyproject's independence contract), and the control API process never loads a
model. Serve's proxy settings are cluster-wide and come from the environment:

- `ONPOLICY_SERVE_HOST` (127.0.0.1) and `ONPOLICY_SERVE_PORT` (8000): where each node's proxy listens. The
  loopback default keeps the teacher off the network: every node runs a proxy, so a run on any node reaches
  it at 127.0.0.1.
- `ONPOLICY_SERVE_URL` (http://127.0.0.1:<port>): the proxy's address as runs see it.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from services.control.schemas import DeployTeacher, ManagedView

log = logging.getLogger(__name__)
SERVE_APP = "services.teacher.ray_serve:build_app"
LEDGER = "services.teacher.ray_serve:ledger_name"
LEDGER_NAMESPACE = "services.teacher.ray_serve:LEDGER_NAMESPACE"
ROUTE = "/teachers/{id}"  # the same as onpolicy.teacher.clients.managed.route


class ServeUnavailable(RuntimeError):
    """The cluster's Ray (and so Serve) cannot be reached now."""


def _attr(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    url: str = "http://127.0.0.1:8000"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServeSettings:
        env = dict(os.environ if env is None else env)
        port = int(env.get("ONPOLICY_SERVE_PORT", "8000"))
        return cls(host=env.get("ONPOLICY_SERVE_HOST", "127.0.0.1"), port=port,
                   url=env.get("ONPOLICY_SERVE_URL", f"http://127.0.0.1:{port}").rstrip("/"))


def serve_args(teacher_id: str, body: DeployTeacher) -> dict[str, Any]:
    """The arguments of `SERVE_APP` for `body` (what `build_app` documents)."""
    return {
        "teacher_id": teacher_id,
        "app": {"model": body.model, "backend": body.backend, "dtype": body.dtype, "max_top_k": body.max_top_k},
        "replicas": {"min": body.replicas.min, "max": body.replicas.max},
        "num_cpus": body.num_cpus,
        "target_ongoing_requests": body.target_ongoing_requests,
        "per_run_in_flight": body.per_run_in_flight,
        "api_key_env": body.api_key_env,
        "autoscaling": {"upscale_delay_s": body.upscale_delay_s, "downscale_delay_s": body.downscale_delay_s,
                        # the replicas' load is looked at this often and over this window: a short
                        # downscale delay is only meaningful with a window as short
                        "metrics_interval_s": min(10.0, max(0.5, body.upscale_delay_s / 2)),
                        "look_back_period_s": min(30.0, max(1.0, body.upscale_delay_s))},
    }


class ManagedTeachers:
    """Deploy, inspect and delete managed teachers through Serve's Python API (Ray must be connected:
    `connect` is the launcher's, which joins the cluster the runs use)."""

    def __init__(self, connect: Any, settings: ServeSettings | None = None):
        self._connect = connect
        self.settings = settings or ServeSettings.from_env()

    def _serve(self) -> Any:
        try:
            ray = self._connect()
            if not ray.is_initialized():
                raise ServeUnavailable("this API process is not connected to a Ray cluster")
            from ray import serve
        except ServeUnavailable:
            raise
        except Exception as err:
            raise ServeUnavailable(f"{type(err).__name__}: {err}") from err
        return serve

    def url(self, teacher_id: str) -> str:
        return self.settings.url + ROUTE.format(id=teacher_id)

    def deploy(self, teacher_id: str, body: DeployTeacher) -> None:
        """Start the application and return at once (replicas load the model meanwhile: GET shows DEPLOYING)."""
        serve = self._serve()
        serve.start(http_options={"host": self.settings.host, "port": self.settings.port})  # no-op when running
        app = _attr(SERVE_APP)(serve_args(teacher_id, body))
        serve.run(app, name=teacher_id, route_prefix=ROUTE.format(id=teacher_id), blocking=False,
                  _local_testing_mode=False)

    def _ledger(self, teacher_id: str) -> Any:
        import ray

        try:
            return ray.get_actor(_attr(LEDGER)(teacher_id), namespace=_attr(LEDGER_NAMESPACE))
        except ValueError:  # no replica has started yet
            return None

    def view(self, teacher_id: str, spec: dict[str, Any]) -> ManagedView:
        import ray

        serve = self._serve()
        app = serve.status().applications.get(teacher_id)
        deployment = next(iter(app.deployments.values()), None) if app is not None else None
        replicas = {getattr(k, "value", str(k)): int(v) for k, v in (deployment.replica_states if deployment else {}).items()}
        usage: dict[str, Any] = {"runs": {}, "replicas": {}}
        ledger = self._ledger(teacher_id)
        if ledger is not None:
            try:
                usage = ray.get(ledger.snapshot.remote(), timeout=10)
            except Exception as err:  # noqa: BLE001 -- usage is best effort; the state above is Serve's
                log.warning("usage of managed teacher %s not read: %s", teacher_id, err)
        # A replica reports when a request ends; one gone quiet for a minute (replaced, drained) holds nothing.
        live = [r for r in usage["replicas"].values() if time.time() - r["updated"] < 60]
        runs = {run: {**u, "mean_latency_s": u["seconds"] / max(u["requests"], 1)} for run, u in usage["runs"].items()}
        return ManagedView(
            status=getattr(app.status, "value", str(app.status)) if app is not None else "NOT_DEPLOYED", message=app.message if app else "",
            replicas=replicas, replicas_min=spec["replicas"]["min"], replicas_max=spec["replicas"]["max"],
            in_flight=sum(int(r["in_flight"]) for r in live),
            queued_sequences=sum(int(r["queued_sequences"]) for r in live), runs=runs, spec=spec)

    def delete(self, teacher_id: str) -> None:
        import ray

        serve = self._serve()
        if teacher_id in serve.status().applications:
            serve.delete(teacher_id, _blocking=False)  # replicas drain: those in flight finish first
        ledger = self._ledger(teacher_id)
        if ledger is not None:
            ray.kill(ledger, no_restart=True)

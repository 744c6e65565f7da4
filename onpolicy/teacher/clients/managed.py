"""A managed teacher (`teacher.kind=managed`, deployed on Ray Serve by `POST /v1/teachers`) as the remote
teacher it is underneath: our service's dialect at `<serve proxy>/teachers/<id>/runs/<run>`.

The run's part of the path names it to the teacher (its usage and its bound in flight: services/teacher/
ray_serve.py). When this process is on a Ray cluster, the id is looked up among Serve's applications first,
so an unknown id fails here, before any engine starts, naming the ids there are.
"""

from __future__ import annotations

import os
import socket

from onpolicy.config import ManagedTeacherConfig, RemoteTeacherConfig

DEFAULT_SERVE_URL = "http://127.0.0.1:8000"  # Serve's proxy listens on every node, on this port by default


class UnknownManagedTeacher(ValueError):
    """The run names a managed teacher that is not deployed on this cluster."""


def route(teacher_id: str) -> str:
    """The Serve route prefix of managed teacher `teacher_id` (the control plane deploys it there)."""
    return f"/teachers/{teacher_id}"


def default_run_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def check_deployed(teacher_id: str) -> None:
    """UnknownManagedTeacher unless Serve on the connected Ray cluster has an application `teacher_id`
    (nothing to check when this process is not on a cluster: the first request then says)."""
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    apps = serve.status().applications
    if teacher_id not in apps:
        known = ", ".join(sorted(apps)) or "none"
        raise UnknownManagedTeacher(
            f"teacher.id={teacher_id!r}: no managed teacher with that id on this Ray cluster (deployed: {known}). "
            "Deploy one with POST /v1/teachers {\"model\": ...} or fix the id (GET /v1/teachers lists them).")


def as_remote(tc: ManagedTeacherConfig) -> RemoteTeacherConfig:
    """The `service` teacher config that reaches managed teacher `tc.id` through Serve's proxy."""
    check_deployed(tc.id)
    base = (tc.serve_url or os.environ.get("ONPOLICY_SERVE_URL") or DEFAULT_SERVE_URL).rstrip("/")
    url = f"{base}{route(tc.id)}/runs/{tc.run_tag or default_run_tag()}"
    return RemoteTeacherConfig(kind="service", url=url, top_k=tc.top_k, api_key_env=tc.api_key_env,
                               timeout_s=tc.timeout_s, max_retries=tc.max_retries, max_in_flight=tc.max_in_flight,
                               max_wait_s=tc.max_wait_s, backoff_base_s=0.5, backoff_max_s=5.0)

"""Ray in one place: joining or starting a cluster, and turning a plain class into an actor class.

Ray is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_ACTOR_CLASSES: dict[type, Any] = {}

# A Ray instance of our own starts no idle workers. Ray prestarts one Python worker per CPU for tasks; the engines
# cannot use them (each has a runtime_env of its own, so Ray starts a process for it), and on a small machine
# their start competes with the engines' for CPU (1.5-2.7 CPU seconds here, bench/startup.py). The learner,
# which could take one, starts alongside the engines and is up before them.
LOCAL_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}


def ray_token_available() -> bool:
    """Whether this process has a Ray auth token: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or
    ~/.ray/auth_token (where `ray start --head` and a local `ray.init()` keep it)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path)


def match_cluster_auth(address: str | None) -> None:
    """Joining a cluster by explicit address, use token auth when we hold a token and nobody chose.

    Ray 2.5x+ turns token auth on for `ray start --head` when a token exists, and for a cluster found
    with address `auto`, but a client given an explicit address (RAY_ADDRESS) stays in mode
    `disabled` and then fails every call with InvalidAuthToken. An explicit RAY_AUTH_MODE always wins."""
    if address in (None, "", "local", "auto") or "RAY_AUTH_MODE" in os.environ or not ray_token_available():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import; re-read it as Ray's own token set-up does
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS if set, else start a local Ray instance of our own (address
    `local`: never a stale or unrelated cluster that `ray start` once recorded on this machine)."""
    from onpolicy.console import quiet_third_party, ray_logging_level

    quiet_third_party()
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    match_cluster_auth(address)
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=ray_logging_level(),
        log_to_driver=os.environ.get("ONPOLICY_RAY_LOGS", "0") == "1",
        runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}},
        **({"_system_config": LOCAL_SYSTEM_CONFIG} if address == "local" else {}),
    )


def actor_class(cls: type) -> Any:
    """`ray.remote(cls)`, made once per class. Per-actor resources and options go through
    `.options(...)` where the actor is created, so this is the only way a class becomes an actor."""
    if cls not in _ACTOR_CLASSES:
        import ray

        _ACTOR_CLASSES[cls] = ray.remote(cls)
    return _ACTOR_CLASSES[cls]


def is_actor_death(err: BaseException) -> bool:
    """Whether `err` says an actor's process died (or was unreachable) before finishing a call: the
    caller may wait for Ray to restart it and try again. A Python error raised *inside* the actor is a
    RayTaskError instead, and is not retried."""
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError)


def died(err: BaseException, handle: Any) -> bool:
    """Whether `err` is the death of the actor behind `handle` (not of some other actor)."""
    if not is_actor_death(err):
        return False
    actor_id = getattr(err, "actor_id", None)
    if actor_id is None:
        return True
    return (actor_id.hex() if isinstance(actor_id, bytes) else str(actor_id)) == handle._actor_id.hex()


def wait_until_back(handle: Any, timeout_s: float, poll_s: float = 0.5,
                    give_up: Callable[[], bool] = lambda: False) -> bool:
    """Wait until the actor behind `handle` answers `ready()` again (Ray restarts an actor created with
    `max_restarts`, re-running its constructor); False if it has not within `timeout_s` (restarts spent,
    or its node gone): then the caller creates a new one. `give_up()` true (the run is closing): False."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not give_up():
        try:
            ray.get(handle.ready.remote(), timeout=max(1.0, min(30.0, deadline - time.monotonic())))
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(poll_s)
    return False

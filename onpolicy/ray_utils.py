"""Ray in one place: joining or starting a cluster, and turning a plain class into an actor class.

Ray is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from typing import Any

_ACTOR_CLASSES: dict[type, Any] = {}


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS if set, else start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        include_dashboard=False,
        log_to_driver=os.environ.get("ONPOLICY_RAY_LOGS", "0") == "1",
        runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}},
    )


def actor_class(cls: type) -> Any:
    """`ray.remote(cls)`, made once per class. Per-actor resources and options go through
    `.options(...)` where the actor is created, so this is the only way a class becomes an actor."""
    if cls not in _ACTOR_CLASSES:
        import ray

        _ACTOR_CLASSES[cls] = ray.remote(cls)
    return _ACTOR_CLASSES[cls]

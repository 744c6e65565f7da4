"""The learner: losses (pure torch), batching, the `Learner` class and its Ray actor shell.

Names resolve lazily so `import onpolicy.learner` pulls in neither torch nor ray.
"""

from __future__ import annotations

_EXPORTS = {
    "Learner": "onpolicy.learner.core",
    "LearnBatch": "onpolicy.learner.batch",
    "build_batch": "onpolicy.learner.batch",
    "split_micro_batches": "onpolicy.learner.batch",
    "make_learner_actor": "onpolicy.learner.actor",
    "LearnerShell": "onpolicy.learner.actor",
    "lr_at": "onpolicy.learner.losses",
}

__all__ = [
    "LearnBatch",
    "Learner",
    "LearnerShell",
    "build_batch",
    "lr_at",
    "make_learner_actor",
    "split_micro_batches",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'onpolicy.learner' has no attribute {name!r}")

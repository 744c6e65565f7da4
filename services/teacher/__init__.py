"""The teacher service: FastAPI over a local teacher that scores (with request batching) and generates.

`create_app` (app.py), `ScoreBatcher` (batcher.py), `serve_teacher` / `build_teacher_app`
(serve.py). Imports are lazy so `import services.teacher` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ScoreBatcher", "build_teacher_app", "create_app", "serve_teacher"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from services.teacher.app import create_app

        return create_app
    if name == "ScoreBatcher":
        from services.teacher.batcher import ScoreBatcher

        return ScoreBatcher
    if name in ("serve_teacher", "build_teacher_app"):
        from services.teacher import serve

        return getattr(serve, name)
    raise AttributeError(f"module 'services.teacher' has no attribute {name!r}")

"""The local teacher as a Ray actor, and `ActorTeacher`, the driver's `Teacher` view of it.

The actor is a thin shell over `VLLMTeacher` / `HFTeacher` (vLLM allows one engine per
process, so the teacher gets its own). `ActorTeacher` turns `.remote()` calls back into the
plain `Teacher` protocol, so the driver treats local and HTTP teachers alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onpolicy.rollout.engine import check_model_dir, vllm_env
from onpolicy.types import ScoreRequestItem, TeacherInfo, TeacherScores

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from onpolicy.config import RunConfig


class TeacherActor:
    """Actor body owning one local teacher. Call through `.remote()`."""

    def __init__(self, model_path: str, backend: str = "vllm", **kwargs: Any) -> None:
        from onpolicy.teacher.local import build_local_teacher

        self.teacher = build_local_teacher(model_path, backend, **kwargs)

    def ready(self) -> bool:
        return True

    def info(self) -> TeacherInfo:
        return self.teacher.info()

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        return self.teacher.score(items, top_k)


class ActorTeacher:
    """Implements `Teacher` by calling a `TeacherActor` (blocking). `info()` is fetched once."""

    def __init__(self, handle: ActorHandle) -> None:
        self.handle = handle
        self._info: TeacherInfo | None = None

    def info(self) -> TeacherInfo:
        import ray

        if self._info is None:
            self._info = ray.get(self.handle.info.remote())
        return self._info

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        import ray

        return ray.get(self.handle.score.remote(items, top_k))


def make_local_teacher(cfg: RunConfig, *, max_model_len: int | None = None) -> ActorTeacher:
    """Start the teacher `cfg.teacher` describes in its own actor; blocks until it is up.

    It must be able to return `cfg.teacher.top_k` entries per position (checked here).
    """
    import ray

    tc, res = cfg.teacher, cfg.resources
    model_path = str(check_model_dir(tc.model).resolve())
    kwargs: dict[str, Any] = {"dtype": tc.dtype}
    if tc.backend == "vllm":
        kwargs.update(
            seed=cfg.seed,
            kv_cache_gib=res.vllm_kv_cache_gib,
            threads_bind=res.vllm_threads_bind,
            max_model_len=max_model_len,
        )
    handle = (
        ray.remote(TeacherActor)
        .options(num_cpus=0, runtime_env={"env_vars": vllm_env(res.vllm_kv_cache_gib, res.vllm_threads_bind)})
        .remote(model_path, tc.backend, **kwargs)
    )
    ray.get(handle.ready.remote())
    teacher = ActorTeacher(handle)
    if tc.top_k > teacher.info().max_top_k:
        raise ValueError(
            f"teacher.top_k={tc.top_k} but teacher {tc.model!r} returns at most {teacher.info().max_top_k}"
        )
    return teacher

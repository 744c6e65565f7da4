"""The local teacher as a Ray actor, and `ActorTeacher`, the driver's `Teacher` view of it.

The actor is a thin shell over `VLLMTeacher` / `HFTeacher` (vLLM allows one engine per
process, so the teacher gets its own). `ActorTeacher` turns `.remote()` calls back into the
plain `Teacher` protocol, so the driver treats local and HTTP teachers alike.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onpolicy.engines.vllm import vllm_env
from onpolicy.ray_utils import actor_class
from onpolicy.teacher.fingerprint import CheckResult, compare_info
from onpolicy.types import GeneratedCompletion, ScoreRequestItem, TeacherInfo, TeacherScores

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from onpolicy.config import ResourcesConfig


class TeacherActor:
    """Actor body owning one local teacher. Call through `.remote()`."""

    def __init__(self, model_path: str, backend: str = "vllm", threads: int = 0, **kwargs: Any) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        from onpolicy.teacher.local import build_local_teacher

        self.teacher = build_local_teacher(model_path, backend, **kwargs)

    def ready(self) -> bool:
        return True

    def info(self) -> TeacherInfo:
        return self.teacher.info()

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        return self.teacher.score(items, top_k)

    def generate(self, prompts: list[list[int]], **sampling: Any) -> list[GeneratedCompletion]:
        return self.teacher.generate(prompts, **sampling)


class ActorTeacher:
    """Implements `Teacher` by calling a `TeacherActor` (blocking). `info()` is fetched once;
    usage is counted on this side (no extra round trip); `close()` kills the actor."""

    def __init__(self, handle: ActorHandle) -> None:
        self.handle = handle
        self._info: TeacherInfo | None = None
        self._usage = {"requests": 0, "tokens_scored": 0, "tokens_generated": 0, "prompt_tokens": 0}
        self._lock = threading.Lock()

    def info(self) -> TeacherInfo:
        import ray

        if self._info is None:
            self._info = ray.get(self.handle.info.remote())
        return self._info

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        import ray

        scores = ray.get(self.handle.score.remote(items, top_k))
        with self._lock:  # the driver scores from its sampler threads
            self._usage["requests"] += 1
            self._usage["tokens_scored"] += sum(len(it.completion_ids) for it in items)
        return scores

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GeneratedCompletion]:
        import ray

        completions = ray.get(self.handle.generate.remote(
            prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        ))
        with self._lock:
            self._usage["requests"] += 1
            self._usage["prompt_tokens"] += sum(len(p) for p in prompts)
            self._usage["tokens_generated"] += sum(len(c.completion_ids) for c in completions)
        return completions

    def usage(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._usage)

    def max_top_k(self) -> int:
        return self.info().max_top_k

    def compatibility(self, student_path: str | Path) -> list[CheckResult]:
        return compare_info(student_path, self.info())

    def close(self) -> None:
        import ray

        ray.kill(self.handle)


def start_teacher_actor(model_path: str, backend: str, resources: ResourcesConfig, threads: int = 0,
                        **teacher_kwargs: Any) -> ActorTeacher:
    """Start a local teacher in its own actor (no CPUs reserved: it shares the run's); blocks until up."""
    import ray

    env = vllm_env(resources.vllm_kv_cache_gib, resources.vllm_threads_bind)
    handle = (
        actor_class(TeacherActor)
        .options(num_cpus=0, runtime_env={"env_vars": env})
        .remote(model_path, backend, threads, **teacher_kwargs)
    )
    ray.get(handle.ready.remote())
    return ActorTeacher(handle)

"""The local teacher as a Ray actor, and `ActorTeacher`, the driver's `Teacher` view of it.

The actor is a thin shell over `VLLMTeacher` / `HFTeacher` (vLLM allows one engine per
process, so the teacher gets its own). `ActorTeacher` turns `.remote()` calls back into the
plain `Teacher` protocol, so the driver treats local and HTTP teachers alike, and validates what
comes back as the remote adapters do (one finite log-prob <= 0 per token, top-k as asked).

A teacher actor whose process dies is restarted by Ray (`max_restarts`); the call that saw it die
waits until the actor answers again (or, after `restart_timeout_s`, creates a new one) and is sent
again: scoring and sampling are pure functions of their inputs, so nothing is lost or counted twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onpolicy.engines.vllm import vllm_env
from onpolicy.ray_utils import actor_class, is_actor_death, wait_until_back
from onpolicy.teacher.fingerprint import CheckResult, compare_info
from onpolicy.teacher.validate import validate_completions, validate_scores
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
        from onpolicy.teacher.local.engines import build_local_teacher

        self.teacher = build_local_teacher(model_path, backend, **kwargs)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> TeacherInfo:
        return self.teacher.info()

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        return self.teacher.score(items, top_k)

    def generate(self, prompts: list[list[int]], **sampling: Any) -> list[GeneratedCompletion]:
        return self.teacher.generate(prompts, **sampling)


class ActorTeacher:
    """Implements `Teacher` by calling a `TeacherActor` (blocking). `info()` is fetched once;
    usage is counted on this side (no extra round trip); `close()` kills the actor.

    `restart`: how to make a new actor when a dead one does not come back; `on_fault(event)` hears each
    restart (actor, action, seconds) for the run's log; `max_restarts` bounds the restarts per call."""

    def __init__(self, handle: ActorHandle, *, max_restarts: int = 0, restart_timeout_s: float = 600.0,
                 restart: Callable[[], ActorHandle] | None = None,
                 on_fault: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.handle = handle
        self.max_restarts, self.restart_timeout_s = max_restarts, restart_timeout_s
        self._restart, self.on_fault = restart, on_fault
        self._info: TeacherInfo | None = None
        self._usage = {"requests": 0, "tokens_scored": 0, "tokens_generated": 0, "prompt_tokens": 0, "restarts": 0}
        self._lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._incarnation = 0  # bumped by each recovery, so threads that saw the same death recover once
        self._closed = False  # closed on purpose: a call that sees the actor gone does not wait for it

    @property
    def source(self) -> str:
        return f"local teacher {self.info().model!r}"

    def info(self) -> TeacherInfo:
        if self._info is None:
            self._info = self._call("info")
        return self._info

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`ray.get(handle.<method>.remote(...))`, sent again after the actor died and came back."""
        import ray

        for attempt in range(self.max_restarts + 1):
            seen = self._incarnation
            try:
                return ray.get(getattr(self.handle, method).remote(*args, **kwargs))
            except Exception as err:
                if not is_actor_death(err) or attempt == self.max_restarts or self._closed:
                    raise
                self._recover(seen, err)
        raise AssertionError("unreachable")

    def _recover(self, seen: int, err: BaseException) -> None:
        """Wait for Ray's restart of the actor (or make a new one); once per death, whoever saw it."""
        import ray

        with self._recover_lock:
            if self._incarnation != seen:
                return  # another thread already brought it back
            t0 = time.perf_counter()
            action = "restarted"
            if not wait_until_back(self.handle, self.restart_timeout_s, give_up=lambda: self._closed):
                if self._restart is None or self._closed:
                    raise RuntimeError(f"the local teacher actor died and did not come back within "
                                       f"{self.restart_timeout_s}s ({err})") from err
                ray.kill(self.handle, no_restart=True)
                self.handle, action = self._restart(), "re-created"
            self._incarnation += 1
            with self._lock:
                self._usage["restarts"] += 1
        if self.on_fault is not None:
            self.on_fault({"actor": "teacher", "action": action, "recover_seconds": time.perf_counter() - t0,
                           "error": type(err).__name__})

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        scores = self._call("score", items, top_k)
        validate_scores(self.source, items, scores, top_k, vocab_size=self.info().vocab_size)
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
        completions = self._call("generate", prompts, n=n, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed)
        validate_completions(self.source, prompts, n, completions, max_new_tokens, vocab_size=self.info().vocab_size)
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

        self._closed = True
        ray.kill(self.handle)


def start_teacher_actor(model_path: str, backend: str, resources: ResourcesConfig, threads: int = 0,
                        on_fault: Callable[[dict[str, Any]], None] | None = None, wait: bool = True,
                        **teacher_kwargs: Any) -> ActorTeacher:
    """Start a local teacher in its own actor (no CPUs reserved: it shares the run's); with `wait`, blocks until
    it is up (else its first call waits: the run starts its other actors meanwhile). Ray restarts it
    `resources.max_restarts` times if its process dies (see `ActorTeacher`)."""
    import ray

    env = vllm_env(resources.vllm_kv_cache_gib, resources.vllm_threads_bind)

    def start(wait: bool = True) -> ActorHandle:
        handle = (
            actor_class(TeacherActor)
            .options(num_cpus=0, runtime_env={"env_vars": env}, max_restarts=resources.max_restarts)
            .remote(model_path, backend, threads, **teacher_kwargs)
        )
        if wait:
            ray.get(handle.ready.remote())
        return handle

    return ActorTeacher(start(wait), max_restarts=resources.max_restarts,
                        restart_timeout_s=resources.restart_timeout_s, restart=start, on_fault=on_fault)

"""The one place a teacher is made: `open_teacher(cfg)` returns something that scores and generates,
whatever `teacher.kind` says. The driver, `onpolicy eval`, `onpolicy serve teacher` and the compatibility
check all come through here, so nothing else branches on the kind.

| kind      | what you get                                                                        |
|-----------|-------------------------------------------------------------------------------------|
| `local`   | the model folder in a Ray actor (`ActorTeacher`), or in this process (`in_process`) |
| a dialect | the adapter its row of `REMOTE_DIALECTS` names (onpolicy/config/teacher.py): e.g.   |
|           | `ServiceTeacher` (our scoring service), `VLLMServerTeacher`, `SGLangTeacher`        |

A remote kind with `teacher.urls` instead of `teacher.url` gives a `TeacherPool` over one adapter per
replica (pool.py: least-outstanding-requests routing, a breaker per replica).

With `student=DIR` the teacher is checked against the student before it is returned (tokenizer,
EOS), and for `local` before its engine even starts (the folders are compared). `wait=False` (local kind)
returns as soon as the folders passed and the actor is starting: the run starts its other engines meanwhile,
and the teacher's first call waits for it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onpolicy.config import REMOTE_DIALECTS
from onpolicy.model_dir import model_vocab_size, require_model_dir
from onpolicy.protocols import Teacher
from onpolicy.teacher.clients.http import BreakerState
from onpolicy.teacher.clients.pool import REPLICA_CLIENT, TeacherPool
from onpolicy.teacher.clients.remote import RemoteTeacher
from onpolicy.teacher.fingerprint import assert_compatible, check_compatible
from onpolicy.types import check_top_k

if TYPE_CHECKING:
    from onpolicy.config import ResourcesConfig, TeacherConfig


def _adapter(path: str) -> type[RemoteTeacher]:
    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, RemoteTeacher)):
        raise TypeError(f"REMOTE_DIALECTS names {path}, which is not a RemoteTeacher")
    return cls


# dialect -> its adapter class, from the config's one table of dialects
REMOTE_KINDS: dict[str, type[RemoteTeacher]] = {kind: _adapter(d.adapter) for kind, d in REMOTE_DIALECTS.items()}


def remote_teacher(kind: str, url: str, **client_kw: Any) -> RemoteTeacher:
    """The HTTP adapter for dialect `kind` at `url`; `client_kw` go to `RobustClient` (retries, breaker)."""
    if kind not in REMOTE_KINDS:
        raise ValueError(f"unknown remote teacher kind {kind!r}: use one of {', '.join(REMOTE_KINDS)}")
    return REMOTE_KINDS[kind](url, **client_kw)


def local_teacher_dir(tc: TeacherConfig) -> Path | None:
    """The model folder of a local teacher (its tokenizer and chat template can be read before it starts);
    None for a remote one."""
    return require_model_dir(tc.model, "teacher") if tc.kind == "local" else None


def api_key_from_env(var: str | None) -> str | None:
    """The bearer token held by environment variable `var` (None: no auth); the key never enters a config."""
    if not var:
        return None
    key = os.environ.get(var)
    if not key:
        raise ValueError(
            f"teacher.api_key_env={var!r} but that environment variable is empty or unset; "
            f"export it (the key is never written into the config)"
        )
    return key


def open_teacher(
    tc: TeacherConfig,
    *,
    student: str | Path | None = None,
    seed: int = 0,
    resources: ResourcesConfig | None = None,
    in_process: bool = False,
    on_state_change: Callable[[BreakerState], None] | None = None,
    on_fault: Callable[[dict[str, Any]], None] | None = None,
    max_model_len: int | None = None,
    threads: int = 0,
    wait: bool = True,
) -> Teacher:
    """The teacher `tc` describes, able to serve `tc.top_k`; checked against `student` when given.

    `in_process` (local kind only): load the engine in this process instead of a Ray actor (what
    the teacher service does). `on_state_change` hears a remote teacher's breaker open and close;
    `on_fault` hears a local teacher actor restarted after its process died.
    `threads`: CPU threads of a local teacher actor (0: the library default).
    """
    from onpolicy.config import ResourcesConfig

    if tc.kind == "local":
        model = str(require_model_dir(tc.model, "teacher"))
        if student is not None:
            check_compatible(student, model)  # compare the folders before an engine starts
        vocab = model_vocab_size(model)
        if tc.top_k and vocab:  # a local engine returns up to its whole vocabulary per position
            check_top_k(tc.top_k, vocab, f"teacher {model!r}")
        res = resources or ResourcesConfig()
        kwargs: dict[str, Any] = {"dtype": tc.dtype}
        if tc.backend == "vllm":
            kwargs.update(
                seed=seed,
                kv_cache_gib=res.vllm_kv_cache_gib,
                threads_bind=res.vllm_threads_bind,
                max_model_len=max_model_len,
            )
        if in_process:
            from onpolicy.teacher.local.engines import build_local_teacher

            teacher: Teacher = build_local_teacher(model, tc.backend, **kwargs)
        else:
            from onpolicy.teacher.local.actor import start_teacher_actor

            teacher = start_teacher_actor(model, tc.backend, res, threads, on_fault=on_fault, wait=wait, **kwargs)
            if not wait:
                return teacher  # checked above from its folder; `info()` waits for the engine
    else:
        client_kw: dict[str, Any] = {
            "api_key": api_key_from_env(tc.api_key_env), "timeout_s": tc.timeout_s,
            "max_in_flight": tc.max_in_flight, "breaker_failures": tc.breaker_failures,
            "breaker_cooldown_s": tc.breaker_cooldown_s, "connect_to": tc.connect_to,
        }
        retry_kw: dict[str, Any] = {
            "max_retries": tc.max_retries, "backoff_base_s": tc.backoff_base_s, "backoff_max_s": tc.backoff_max_s,
            "max_wait_s": tc.max_wait_s,
        }
        if tc.urls:  # replicas fail fast; the pool retries on another one and does the waiting
            replicas = [remote_teacher(tc.kind, url, **client_kw, **REPLICA_CLIENT) for url in tc.urls]
            teacher = TeacherPool(replicas, **retry_kw, max_in_flight=tc.max_in_flight,
                                  on_state_change=on_state_change)
        else:
            teacher = remote_teacher(tc.kind, tc.url or "", **client_kw, **retry_kw, on_state_change=on_state_change)
    try:
        if student is not None:
            assert_compatible(teacher, student)  # reachable, the same tokenizer and EOS
        if tc.top_k:
            check_top_k(tc.top_k, teacher.max_top_k(), f"teacher {teacher.info().model!r}")
    except BaseException:
        teacher.close()
        raise
    return teacher

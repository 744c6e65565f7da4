"""The one place a teacher is made: `open_teacher(cfg)` returns something that scores and generates,
whatever `teacher.kind` says. The driver, `onpolicy eval`, `onpolicy serve teacher` and the compatibility
check all come through here, so nothing else branches on the kind.

| kind      | what you get                                                                        |
|-----------|-------------------------------------------------------------------------------------|
| `local`   | the model folder in a Ray actor (`ActorTeacher`), or in this process (`in_process`) |
| `managed` | our service on the cluster's Ray Serve (clients/managed.py), then as `service`      |
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
from onpolicy.teacher.modes import TeacherPlan, check_plan, compare_tokenizers
from onpolicy.types import check_top_k

if TYPE_CHECKING:
    from onpolicy.config import LossBase, ResourcesConfig, TeacherConfig


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


def plan_teacher(tc: TeacherConfig, student_path: str | Path) -> TeacherPlan:
    """The mode of teacher `tc` for the student in `student_path` (teacher/modes.py; folders are read, nothing is
    started)."""
    if tc.kind == "self":
        return TeacherPlan(tc.name, tc.kind, "token", "a frozen copy of the starting student: its own tokenizer",
                           model=str(student_path))
    if tc.kind == "openai":
        return TeacherPlan(tc.name, tc.kind, "sequence", "text only: sequence-level KD on its samples, re-tokenized "
                           "for the student (loss.kind=sft)")
    if tc.kind == "local":
        folder = require_model_dir(tc.model, "teacher")
        mode, why = compare_tokenizers(student_path, folder)
        return TeacherPlan(tc.name, tc.kind, mode, why, tokenizer=str(folder) if mode == "span" else None,
                           model=str(folder), local=True)
    folder = getattr(tc, "tokenizer", None)
    if folder:
        mode, why = compare_tokenizers(student_path, require_model_dir(folder, "teacher tokenizer"))
        return TeacherPlan(tc.name, tc.kind, mode, why + " (teacher.tokenizer; the server's is compared when reached)",
                           tokenizer=str(folder) if mode == "span" else None)
    return TeacherPlan(tc.name, tc.kind, "token", "scores the student's token ids (its tokenizer and EOS are compared "
                       "with the student's when it is reached; set teacher.tokenizer to its own tokenizer's folder "
                       "if it differs)")


def plan_teachers(teachers: list[TeacherConfig], student_path: str | Path, loss: LossBase,
                  chat: bool) -> list[TeacherPlan]:
    """Every teacher's plan, each checked against the loss and the data (`modes.check_plan`)."""
    plans = [plan_teacher(tc, student_path) for tc in teachers]
    for plan in plans:
        check_plan(plan, loss, chat)
    return plans


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


def endpoint_client_kwargs(tc: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(connection, retry) keyword arguments of `RobustClient` for an endpoint teacher section (the key is read
    from the environment variable it names)."""
    client_kw: dict[str, Any] = {
        "api_key": api_key_from_env(tc.api_key_env), "timeout_s": tc.timeout_s,
        "max_in_flight": tc.max_in_flight, "breaker_failures": tc.breaker_failures,
        "breaker_cooldown_s": tc.breaker_cooldown_s, "connect_to": tc.connect_to,
    }
    retry_kw: dict[str, Any] = {
        "max_retries": tc.max_retries, "backoff_base_s": tc.backoff_base_s, "backoff_max_s": tc.backoff_max_s,
        "max_wait_s": tc.max_wait_s,
    }
    return client_kw, retry_kw


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
    hidden_layers: list[int] | None = None,
) -> Teacher:
    """The teacher `tc` describes, able to serve `tc.top_k`; checked against `student` when given.

    `in_process` (local kind only): load the engine in this process instead of a Ray actor (what
    the teacher service does). `on_state_change` hears a remote teacher's breaker open and close;
    `on_fault` hears a local teacher actor restarted after its process died.
    `threads`: CPU threads of a local teacher actor (0: the library default).
    `hidden_layers` (local `hf` kind only): the teacher layers whose hidden states come with each score
    (`loss.hidden`); a remote teacher cannot return them and is refused.
    """
    from onpolicy.config import LocalTeacherConfig, ResourcesConfig

    if tc.kind == "self":  # a frozen copy of the starting student: a local teacher over its folder
        if student is None:
            raise ValueError("a `self` teacher is the starting student: open it with student=its folder")
        tc = LocalTeacherConfig(name=tc.name, model=str(student), backend=tc.backend, dtype=tc.dtype, top_k=tc.top_k)
    if tc.kind == "managed":  # our service on the cluster's Ray Serve: a remote teacher at its proxy route
        from onpolicy.teacher.clients.managed import as_remote

        tc = as_remote(tc)
    if tc.kind == "local":
        model = str(require_model_dir(tc.model, "teacher"))
        if student is not None:
            check_compatible(student, model)  # compare the folders before an engine starts
        vocab = model_vocab_size(model)
        if tc.top_k and vocab:  # a local engine returns up to its whole vocabulary per position
            check_top_k(tc.top_k, vocab, f"teacher {model!r}")
        res = resources or ResourcesConfig()
        kwargs: dict[str, Any] = {"dtype": tc.dtype}
        if hidden_layers:
            kwargs["hidden_layers"] = list(hidden_layers)
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
        if hidden_layers:
            raise ValueError(f"loss.hidden needs the teacher's hidden states, and a remote teacher "
                             f"(teacher.kind={tc.kind}) answers log-probs only: use a local teacher")
        client_kw, retry_kw = endpoint_client_kwargs(tc)
        if tc.kind == "service":
            client_kw["wire_format"] = tc.wire_format
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

"""One way to assemble what a run uses, shared by `onpolicy train`, `eval`, `export --eval` and `bench`.

    checked = check(cfg)                      # no engine: folders, tokenizer, prompts, stop tokens, lengths
    stack = open_stack(cfg, checked, ...)     # the teacher, then the learner and rollout engines, in parallel
    ...
    stack.close()

`check` does everything that needs no engine, so bad input fails before anything starts and names what to
fix. `open_stack` checks the teacher against the student first (a remote one over HTTP, a local one from its
folder), then starts the local teacher's engine, the learner and the rollout engines together (start-up is
mostly imports and engine set-up in separate processes: on 2 cores, together beats one after the other), and
records how long each phase took (`startup`). Whatever fails half-way, what was started is closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from onpolicy.chat import compare_chat_templates, load_student_tokenizer, stop_token_ids
from onpolicy.engines.vllm import check_tensor_parallel
from onpolicy.model_dir import model_max_len, require_model_dir
from onpolicy.prompts import PromptSource

if TYPE_CHECKING:
    from onpolicy.config import RunConfig
    from onpolicy.protocols import Teacher


@dataclass
class Checked:
    """What a config resolves to before any engine starts."""

    student_path: str
    tokenizer: Any
    source: PromptSource
    stop: dict[str, list[int]]  # sampling arguments that end a completion (`stop_token_ids`)
    teacher_dir: str | None  # a local teacher's folder (None: remote)
    seconds: float = 0.0


def check(cfg: RunConfig, student: str | None = None) -> Checked:
    """The student folder (`student`, default `cfg.model.student`), its tokenizer (with `data.chat_template`),
    the prompt stream, a local teacher's chat template against the student's, the stop tokens, and every
    prompt against the student's and a local teacher's length limits. Raises with what to fix."""
    from onpolicy.teacher.factory import local_teacher_dir
    from onpolicy.teacher.fingerprint import TeacherIncompatible, load_tokenizer

    t0 = time.perf_counter()
    check_tensor_parallel(cfg.rollout.tensor_parallel_size)
    student_path = str(require_model_dir(student or cfg.model.student, "student"))
    teacher_dir = local_teacher_dir(cfg.teacher)
    tokenizer = load_student_tokenizer(student_path, cfg.data.chat_template)
    source = PromptSource(cfg.data, cfg.eval, cfg.seed)
    if source.chat and cfg.data.check_chat_template and teacher_dir is not None:
        # a remote teacher publishes no template: not checked
        problem = compare_chat_templates(tokenizer, load_tokenizer(teacher_dir))
        if problem:
            raise TeacherIncompatible(problem)
    stop = {"stop_token_ids": stop_token_ids(tokenizer, cfg.rollout.stop_tokens, source.chat)}
    checked = Checked(student_path, tokenizer, source, stop, None if teacher_dir is None else str(teacher_dir))
    check_prompt_lengths(cfg, checked, "student", model_max_len(student_path))
    if teacher_dir is not None:  # a remote teacher says its length once reached (open_stack)
        check_prompt_lengths(cfg, checked, "teacher", model_max_len(teacher_dir))
    checked.seconds = time.perf_counter() - t0
    return checked


def check_prompt_lengths(cfg: RunConfig, checked: Checked, whose: str, max_len: int | None) -> None:
    """Every prompt encodes to some tokens (always) and fits `max_len` (when known) with the completion."""
    n = cfg.rollout.max_new_tokens
    if max_len is not None and max_len <= n:
        raise ValueError(f"rollout.max_new_tokens={n} leaves no room for a prompt: the {whose} accepts "
                         f"{max_len} tokens in all; lower rollout.max_new_tokens")
    checked.source.check_lengths(checked.tokenizer, None if max_len is None else max_len - n,
                                 f"the {whose}'s max length {max_len} minus rollout.max_new_tokens={n}")


@dataclass
class Stack:
    """The started parts: the teacher, the learner (or None), the rollout workers; `close()` stops them."""

    checked: Checked
    teacher: Teacher | None = None
    learner: Any = None
    workers: list = field(default_factory=list)
    startup: dict[str, float] = field(default_factory=dict)  # seconds per start-up phase

    def close(self) -> None:
        """Stop every actor of the stack (safe to call twice)."""
        import ray

        from onpolicy.learner.group import kill_learner

        for actor in self.workers:
            ray.kill(actor)
        if self.learner is not None:
            kill_learner(self.learner)
        if self.teacher is not None:
            self.teacher.close()
        self.workers, self.learner, self.teacher = [], None, None


def open_stack(cfg: RunConfig, checked: Checked, *, workers: int, learner: bool,
               before_engines: Callable[[], None] = lambda: None,
               on_teacher_state: Callable[[str], None] | None = None,
               on_fault: Callable[[dict[str, Any]], None] | None = None) -> Stack:
    """Start the teacher, then (with `learner`) the learner and `workers` rollout engines on the checked student.

    The teacher is checked against the student before any engine starts; `before_engines()` runs then (the
    driver writes the run folder there). A local teacher's engine starts alongside the others, and the stack
    returns once every engine is up."""
    import ray

    from onpolicy.learner.group import LearnerGroup, make_learner
    from onpolicy.ray_utils import init_ray
    from onpolicy.rollout.worker import make_rollout_workers
    from onpolicy.teacher.factory import open_teacher

    stack = Stack(checked, startup={"preflight_seconds": checked.seconds})
    try:
        t = time.perf_counter()
        init_ray()
        stack.startup["ray_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        stack.teacher = open_teacher(cfg.teacher, student=checked.student_path, seed=cfg.seed,
                                     resources=cfg.resources, on_state_change=on_teacher_state, on_fault=on_fault,
                                     threads=cfg.threads()["teacher"], wait=False)
        if checked.teacher_dir is None:
            check_prompt_lengths(cfg, checked, "teacher", stack.teacher.info().max_model_len)
        before_engines()
        if learner:
            stack.learner = make_learner(cfg, checked.student_path)
        stack.workers = make_rollout_workers(workers, checked.student_path, cfg)
        stack.startup["rollout_engines_seconds"] = time.perf_counter() - t
        stack.teacher.info()  # a local teacher's engine is up (its errors surface here)
        if learner and not isinstance(stack.learner, LearnerGroup):  # (a group is up once made)
            ray.get(stack.learner.ready.remote())
        stack.startup["engines_seconds"] = time.perf_counter() - t
    except BaseException:
        stack.close()
        raise
    return stack

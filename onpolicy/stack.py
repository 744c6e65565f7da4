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
from onpolicy.mixture import MixtureSource, make_source
from onpolicy.model_dir import model_max_len, model_num_layers, require_model_dir
from onpolicy.prompts import PromptSource
from onpolicy.retention import Retention, open_retention

if TYPE_CHECKING:
    from onpolicy.config import RunConfig
    from onpolicy.teacher.modes import TeacherPlan
    from onpolicy.teacher.routing import TeacherSet


@dataclass
class Checked:
    """What a config resolves to before any engine starts."""

    student_path: str
    tokenizer: Any
    source: PromptSource | MixtureSource
    stop: dict[str, list[int]]  # sampling arguments that end a completion (`stop_token_ids`)
    teacher_dir: str | None  # a local teacher's folder (None: remote)
    seconds: float = 0.0
    plans: list[TeacherPlan] = field(default_factory=list)  # each teacher's mode and why (teacher/modes.py)
    retention: Retention | None = None  # eval.retention's probe sets and the frozen starting student


def check(cfg: RunConfig, student: str | None = None) -> Checked:
    """The student folder (`student`, default `cfg.model.student`), its tokenizer (with `data.chat_template`),
    the prompt stream, a local teacher's chat template against the student's, the stop tokens, and every
    prompt against the student's and a local teacher's length limits. Raises with what to fix."""
    from onpolicy.teacher.factory import plan_teachers
    from onpolicy.teacher.fingerprint import TeacherIncompatible, load_tokenizer

    t0 = time.perf_counter()
    check_tensor_parallel(cfg.rollout.tensor_parallel_size)
    student_path = str(require_model_dir(student or cfg.model.student, "student"))
    tokenizer = load_student_tokenizer(student_path, cfg.data.chat_template)
    source = make_source(cfg.data, cfg.eval, cfg.seed)
    # each teacher's mode (same tokenizer, another one, text only), checked against the loss and the data
    plans = plan_teachers(cfg.teacher_list(), student_path, cfg.loss, source.chat)
    teacher_dir = plans[0].model if plans[0].local else None
    for plan in plans:  # a remote teacher publishes no template: not checked; another tokenizer renders its own
        if source.chat and cfg.data.check_chat_template and plan.local and plan.mode == "token":
            problem = compare_chat_templates(tokenizer, load_tokenizer(plan.model))
            if problem:
                raise TeacherIncompatible(problem)
    stop = {"stop_token_ids": stop_token_ids(tokenizer, cfg.rollout.stop_tokens, source.chat)}
    checked = Checked(student_path, tokenizer, source, stop, teacher_dir, plans=plans)
    check_prompt_lengths(cfg, checked, "student", model_max_len(student_path))
    if cfg.eval.retention:  # scored by a frozen copy of the run's starting student (not `student`: eval's folder)
        start, n = str(require_model_dir(cfg.model.student, "student")), cfg.rollout.max_new_tokens
        max_len = model_max_len(start)
        checked.retention = open_retention(cfg, start, tokenizer, None if max_len is None else max_len - n,
                                           f"the student's max length {max_len} minus rollout.max_new_tokens={n}")
    hidden = getattr(cfg.loss, "hidden", None)
    if hidden is not None and teacher_dir is not None:
        check_hidden_layers(hidden.layers, student_path, str(teacher_dir))
    for plan in plans:  # a remote teacher says its length once reached (open_stack)
        if plan.local:
            check_prompt_lengths(cfg, checked, f"teacher {plan.name}" if cfg.teachers else "teacher",
                                 model_max_len(plan.model), load_tokenizer(plan.model) if plan.mode == "span" else None)
    checked.seconds = time.perf_counter() - t0
    return checked


def check_hidden_layers(layers: dict[int, int], student_path: str, teacher_dir: str) -> None:
    """Every layer `loss.hidden.layers` maps exists in its model (the config's num_hidden_layers)."""
    for whose, path, wanted in (("student", student_path, layers.keys()), ("teacher", teacher_dir, layers.values())):
        n = model_num_layers(path)
        bad = sorted(i for i in wanted if n is not None and i >= n)
        if bad:
            raise ValueError(f"loss.hidden.layers names {whose} layer(s) {bad}, but the {whose} {path} has {n} "
                             f"decoder layers (0..{n - 1}): map only layers it has")


def check_prompt_lengths(cfg: RunConfig, checked: Checked, whose: str, max_len: int | None,
                         tokenizer: Any = None) -> None:
    """Every prompt encodes to some tokens (always) and fits `max_len` (when known) with the completion; in
    `tokenizer`'s tokens (default the student's: a teacher with another tokenizer counts its own)."""
    n = cfg.rollout.max_new_tokens
    if max_len is not None and max_len <= n:
        raise ValueError(f"rollout.max_new_tokens={n} leaves no room for a prompt: the {whose} accepts "
                         f"{max_len} tokens in all; lower rollout.max_new_tokens")
    checked.source.check_lengths(tokenizer or checked.tokenizer, None if max_len is None else max_len - n,
                                 f"the {whose}'s max length {max_len} minus rollout.max_new_tokens={n}")


@dataclass
class Stack:
    """The started parts: the teacher, the learner (or None), the rollout workers; `close()` stops them."""

    checked: Checked
    teacher: TeacherSet | None = None  # every teacher of the run by name; a `Teacher` answering as the first
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
        if self.checked.retention is not None:
            self.checked.retention.close()
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
    from onpolicy.teacher.routing import open_teachers

    stack = Stack(checked, startup={"preflight_seconds": checked.seconds})
    hidden = getattr(cfg.loss, "hidden", None)
    try:
        t = time.perf_counter()
        init_ray()
        stack.startup["ray_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        stack.teacher = open_teachers(cfg.teacher_list(), checked.plans, student_path=checked.student_path,
                                      student_tokenizer=checked.tokenizer, stop_ids=checked.stop["stop_token_ids"],
                                      chat=checked.source.chat, seed=cfg.seed, resources=cfg.resources,
                                      on_state_change=on_teacher_state, on_fault=on_fault,
                                      threads=cfg.threads()["teacher"], wait=False,
                                      hidden_layers=hidden.teacher_layers() if hidden is not None else None)
        for plan in checked.plans:  # a remote teacher says its length once reached
            if plan.model is None and plan.mode != "sequence":
                check_prompt_lengths(cfg, checked, f"teacher {plan.name}" if cfg.teachers else "teacher",
                                     stack.teacher.member(plan.name).info().max_model_len,
                                     stack.teacher.member(plan.name).t_tok if plan.mode == "span" else None)
        before_engines()
        if learner:
            stack.learner = make_learner(cfg, checked.student_path)
        stack.workers = make_rollout_workers(workers, checked.student_path, cfg)
        stack.startup["rollout_engines_seconds"] = time.perf_counter() - t
        for member in stack.teacher.members.values():  # a local teacher's engine is up (its errors surface here)
            member.info()
        if learner and not isinstance(stack.learner, LearnerGroup):  # (a group is up once made)
            ray.get(stack.learner.ready.remote())
        stack.startup["engines_seconds"] = time.perf_counter() - t
    except BaseException:
        stack.close()
        raise
    return stack

"""The batches a run trains on: drawn, sampled (by the student's engines, or by the teacher for the off-policy
losses) and scored by the teacher, ahead of the step that trains on them.

Each batch gets a thread that waits for it: with `schedule.max_staleness = k` the next k steps' batches are
in flight while one step learns, and each worker's rollouts go to the teacher as soon as that worker is done.
Pushes are queued on the workers behind the sampling in flight, so a batch is sampled with whatever weights
its worker serves when it gets to it (the learner's importance ratio corrects the lag).

Every prompt goes to its own teacher: the run's one teacher, or with a data mixture the teacher its source names
(`mixture.draw`; the run's `TeacherSet` asks each teacher for its own sequences), and a mixture's batches carry
per-source metrics (`mixture.source_metrics`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from onpolicy.learner.objectives import get_objective, student_samples
from onpolicy.mixture import Drawn, draw, source_metrics
from onpolicy.prompts import encode_prompts
from onpolicy.rollout.pool import Launched, gather, launch_generate


@dataclass
class Sampled:
    """A step's rollouts and their teacher scores, and how long the engines and the teacher worked on them."""

    rollouts: list
    scores: list
    engine_seconds: float
    score_seconds: float
    sampled_at: float  # perf_counter() when the last worker's rollouts arrived
    by_source: dict[str, float] = field(default_factory=dict)  # a mixture's per-source metrics


@dataclass
class Pending:
    """A step's prompts, drawn and being sampled (then scored) ahead of the step that trains on them."""

    prompts: int
    sampled: Future[Sampled]


class Sampler:
    """Draws and samples the batches of a run (`launch`), scoring them as they land; counts teacher tokens."""

    def __init__(self, run: Any) -> None:  # the driver's Run (this module sits below it)
        self.run = run
        self.objective = get_objective(run.cfg.loss.kind)
        # One thread per batch in flight: each waits for its rollouts and scores them as they land.
        self._threads = ThreadPoolExecutor(run.cfg.schedule.max_staleness + 1, thread_name_prefix="sample-score")
        self._lock = threading.Lock()
        self.teacher_tokens = 0  # prompt + completion tokens the teacher scored or generated for training
        self.top_k = {tc.name: tc.top_k for tc in run.cfg.teacher_list()}  # what each teacher is asked for

    def launch(self, index: int) -> Pending:
        """Draw step `index`'s prompts and start sampling them. The objective decides who samples: the student
        (on-policy), the teacher (sft, soft targets), or, for GKD, the student with probability `loss.lmbda`."""
        run, r = self.run, self.run.cfg.rollout
        drawn = draw(run.source, r.prompts_per_step, run.teacher.default)
        prompts = encode_prompts(run.tokenizer, drawn.examples)
        sample = {"n": r.samples_per_prompt, "max_new_tokens": r.max_new_tokens, "temperature": r.temperature,
                  "top_p": r.top_p, "seed": run.cfg.seed * 1_000_003 + index * 7919}
        if student_samples(self.objective, getattr(run.cfg.loss, "lmbda", 1.0), run.cfg.seed, index):
            job = self._threads.submit(self._student, launch_generate(run.workers, prompts, **sample, **run.stop),
                                       drawn)
        else:
            job = self._threads.submit(self._teacher, prompts, sample, drawn)
        return Pending(len(drawn.examples), job)

    def _score(self, rollouts: list, drawn: Drawn) -> tuple[list, float]:
        """Each rollout scored by its own teacher (its prompt's source's)."""
        t = time.perf_counter()
        scores = self.run.teacher.score_rollouts(rollouts, [drawn.examples[r.prompt_index] for r in rollouts],
                                                 top_k=self.top_k,
                                                 names=[drawn.teachers[r.prompt_index] for r in rollouts])
        self._count(rollouts)
        return scores, time.perf_counter() - t

    def _count(self, rollouts: list) -> None:
        """Teacher tokens processed: prompt + completion of every sequence it scored or generated."""
        with self._lock:
            self.teacher_tokens += sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)

    def _teacher(self, prompts: list[list[int]], sample: dict[str, Any], drawn: Drawn) -> Sampled:
        """(In a batch's thread.) The teacher samples the batch; scored for its top-k when the loss needs it (sft
        needs only the tokens: the teacher's own log-probs of them come with the generation)."""
        from onpolicy.types import Rollout, TeacherScores

        t = time.perf_counter()
        completions = self.run.teacher.generate_routed(prompts, drawn.examples, drawn.teachers, **sample)
        rollouts = [Rollout(prompt_ids=prompts[c.prompt_index], completion_ids=c.completion_ids,
                            sampler_logprobs=c.logprobs, policy_version=self.run.step, finish_reason=c.finish_reason,
                            prompt_index=c.prompt_index, source="teacher") for c in completions]
        self._count(rollouts)
        sampled_at = time.perf_counter()
        if self.objective.needs_topk:
            scores, score_seconds = self._score(rollouts, drawn)
        else:
            scores, score_seconds = [TeacherScores(logprobs=c.logprobs) for c in completions], 0.0
        return Sampled(rollouts=rollouts, scores=scores, engine_seconds=0.0,
                       score_seconds=sampled_at - t + score_seconds, sampled_at=sampled_at,
                       by_source=source_metrics(drawn, rollouts, scores))

    def _student(self, launched: Launched, drawn: Drawn) -> Sampled:
        """(In a batch's thread.) Wait for the rollouts, scoring each worker's part as it arrives; a worker that
        died is brought back and asked again for its part."""
        parts = gather(launched, on_part=lambda rollouts: self._score(rollouts, drawn),
                       recover=self.run.restarts.worker)
        rollouts, scores = [r for p in parts for r in p.rollouts], [s for p in parts for s in p.result[0]]
        return Sampled(rollouts=rollouts, scores=scores, engine_seconds=sum(p.engine_seconds for p in parts),
                       score_seconds=sum(p.result[1] for p in parts), sampled_at=max(p.arrived_at for p in parts),
                       by_source=source_metrics(drawn, rollouts, scores))

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

"""The run driver: on-policy distillation, one update per step.

    rollout (vLLM workers, policy v) -> score (teacher) -> learn (learner, v -> v+1) -> push (v+1 to every worker)

With `schedule.max_staleness = 0` each step waits for the last (strictly on-policy). With k >= 1 the
next k steps' prompts are sampled while this step is scored and learnt (a pipeline), each worker's
rollouts are scored as soon as that worker is done, and pushes are queued on the workers behind the
sampling in flight; the learner's importance ratio corrects for the lag (at most k versions).

The driver owns the actors of one run and nothing else; every piece of maths lives in the
learner, every engine detail in the rollout/teacher packages, and the teacher, whatever its kind,
comes from `open_teacher`. Metrics go to `<output_dir>/metrics.jsonl` (kind=train every step,
kind=eval on the schedule, kind=fault when an actor died and was brought back).

Failures (`onpolicy.recovery`): every actor is created with Ray `max_restarts`. A rollout worker that
dies is waited for (or re-created), given the current weights, and asked again for its part of the
step; a local teacher is waited for and the call sent again (`ActorTeacher`); a learner is restarted
from the last whole checkpoint, the prompt stream and the metrics rewound to it
(`schedule.max_learner_restarts` times). A non-finite step changes nothing and is not checkpointed.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onpolicy.chat import compare_chat_templates, load_student_tokenizer, stop_token_ids
from onpolicy.config import RunConfig, dump_config
from onpolicy.data import PromptSource, encode_prompts
from onpolicy.engines.vllm import check_tensor_parallel
from onpolicy.heldout import eval_seed, evaluate, score_rollouts
from onpolicy.learner.checkpoint import rotate
from onpolicy.learner.group import LearnerGroup, kill_learner, make_learner
from onpolicy.learner.objectives import get_objective, student_samples
from onpolicy.metrics import MetricsLog, read_metrics
from onpolicy.model_dir import model_max_len, require_model_dir
from onpolicy.ray_utils import died, is_actor_death, wait_until_back
from onpolicy.recovery import (
    DRIVER_STATE,
    FaultCounts,
    TooManyRestarts,
    check_resumable,
    require_restored,
    restore_checkpoint,
)
from onpolicy.rollout.pool import (
    Launched,
    check_push,
    gather,
    launch_generate,
    open_collective,
    push_collective_async,
    push_weights,
    push_weights_async,
)
from onpolicy.status import RunStatus, write_status
from onpolicy.step_stats import NonFinite, stage_metrics, staleness_filter
from onpolicy.trackers import check_trackers, open_trackers


@dataclass
class Sampled:
    """A step's rollouts and their teacher scores, and how long the engines and the teacher worked on them."""

    rollouts: list
    scores: list
    engine_seconds: float
    score_seconds: float
    sampled_at: float  # perf_counter() when the last worker's rollouts arrived


@dataclass
class Pending:
    """A step's prompts, drawn and being sampled (then scored) ahead of the step that trains on them."""

    prompts: int
    sampled: Future[Sampled]


class Run:
    """One distillation run: its actors, prompt stream, metrics log and checkpoints.

    Built in one go: the student folder and the teacher are checked first (before any engine
    starts), then the actors start; if anything fails half-way, what was started is closed."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, show_progress: bool = True):
        import ray

        from onpolicy.ray_utils import init_ray
        from onpolicy.rollout.worker import make_rollout_workers
        from onpolicy.teacher.factory import open_teacher

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.step = 0
        self.resumed = resume
        self.status = RunStatus.STARTING
        self.teacher, self.learner, self.workers, self.log = None, None, [], None
        self.pending: deque[Pending] = deque()  # steps sampled ahead (schedule.max_staleness of them)
        self.push_refs: list = []  # the last weight push, queued on every worker
        self.collective = False  # weights go to the engines by broadcast (rollout.weight_sync), else object store
        self.push_by = "object_store"  # how the pushes in push_refs were sent
        self.nonfinite = NonFinite()  # steps skipped for a non-finite loss or gradient
        self.faults = FaultCounts()  # actors that died and were brought back
        self._recover_lock = threading.Lock()
        self._worker_pids: list[int] = []  # a pid that changed is a worker Ray restarted
        self._closing = False  # close() is killing the actors: nothing is brought back
        # One thread per batch in flight: each waits for its rollouts and scores them as they land.
        self._scorer = ThreadPoolExecutor(cfg.schedule.max_staleness + 1, thread_name_prefix="sample-score")
        self._lock = threading.Lock()
        self.teacher_tokens = 0  # prompt + completion tokens the teacher scored or generated for training
        self.objective = get_objective(cfg.loss.kind)
        if resume:
            check_resumable(self.out)
        check_tensor_parallel(cfg.rollout.tensor_parallel_size)
        self.student_path = str(require_model_dir(cfg.model.student, "student"))
        check_trackers(cfg.logging.report_to)  # a missing optional package fails here, before any engine
        # The data is read and checked against the student (and its chat template against a local
        # teacher's) before anything starts.
        self.tokenizer = load_student_tokenizer(self.student_path, cfg.data.chat_template)
        self.source = PromptSource(cfg.data, cfg.eval, cfg.seed)
        if self.source.chat and cfg.data.check_chat_template:
            self._check_chat_template()
        self.stop = {"stop_token_ids": stop_token_ids(self.tokenizer, cfg.rollout.stop_tokens, self.source.chat)}
        self._check_prompt_lengths("student", model_max_len(self.student_path))
        try:
            init_ray()
            # Checked against the student (reachable, tokenizer, EOS, top-k) before any other engine starts.
            self.teacher = open_teacher(cfg.teacher, student=self.student_path, seed=cfg.seed,
                                        resources=cfg.resources, on_state_change=self._on_teacher_state,
                                        on_fault=self._on_fault, threads=cfg.threads()["teacher"])
            self._check_prompt_lengths("teacher", self.teacher.info().max_model_len)
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
            self.set_status(RunStatus.STARTING)
            self.learner = make_learner(cfg, self.student_path)
            self.workers = make_rollout_workers(cfg.rollout.num_workers, self.student_path, cfg)
            self._worker_pids = ray.get([w.pid.remote() for w in self.workers])
            self.collective = self._open_weight_sync()
            restored = None
            if resume:
                restored = require_restored(restore_checkpoint(
                    self.out / "checkpoints", lambda p: ray.get(self.learner.load_checkpoint.remote(p))), self.out)
                self.step = restored.state["step"]
                self.source.advance(restored.state["prompts_drawn"])
                check_push(ray.get(self._push_async()), self.step)
            trackers = open_trackers(cfg.logging.report_to, self.out, project=cfg.logging.project,
                                     run_name=cfg.name, config=cfg.model_dump(mode="json"))
            self.log = MetricsLog(self.out / "metrics.jsonl", cfg.schedule.steps, show_progress=show_progress,
                                  start_step=self.step, trackers=trackers)
            if restored is not None:
                self.log.rewind(self.step)  # the steps after the checkpoint are trained again: logged once
                for path, why in restored.skipped:
                    self.log.message(f"skipped checkpoint {path}: {why}")
                self.log.message(f"resumed from {restored.path} at step {self.step}")
            if self.source.skipped_long:
                self.log.message(f"skipped {self.source.skipped_long} prompts longer than the student or teacher "
                                 "accepts (data.skip_long_prompts=true)")
        except BaseException:
            self.close()
            raise

    def _check_chat_template(self) -> None:
        """Refuse a local teacher whose own chat template renders a probe conversation to other token ids than
        the student's (a remote teacher publishes no template: not checked)."""
        from onpolicy.teacher.factory import local_teacher_dir
        from onpolicy.teacher.fingerprint import TeacherIncompatible, load_tokenizer

        teacher_dir = local_teacher_dir(self.cfg.teacher)
        if teacher_dir is None:
            return
        problem = compare_chat_templates(self.tokenizer, load_tokenizer(teacher_dir))
        if problem:
            raise TeacherIncompatible(problem)

    def _check_prompt_lengths(self, whose: str, max_len: int | None) -> None:
        if max_len is None:
            return
        n = self.cfg.rollout.max_new_tokens
        if max_len <= n:
            raise ValueError(f"rollout.max_new_tokens={n} leaves no room for a prompt: the {whose} accepts "
                             f"{max_len} tokens in all; lower rollout.max_new_tokens")
        self.source.check_lengths(self.tokenizer, max_len - n,
                                  f"the {whose}'s max length {max_len} minus rollout.max_new_tokens={n}")

    def _on_teacher_state(self, state: str) -> None:
        """The teacher client's circuit breaker opened (scoring paused) or closed again."""
        if self.status in (RunStatus.RUNNING, RunStatus.DEGRADED):
            if state == "closed":
                self.set_status(RunStatus.RUNNING)
            else:
                self.set_status(RunStatus.DEGRADED,
                                reason=f"teacher {', '.join(self.cfg.teacher.endpoints())} unreachable; "
                                "scoring paused")

    def _on_fault(self, event: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.fault(self.step, event)

    def _recover_worker(self, i: int, err: BaseException):
        """Rollout worker i died: wait for Ray's restart (or make a new one), give it the current weights;
        returns the live handle. Called by whoever saw the death (a sampler thread, the push check); the
        pid tells a fresh restart from one another thread already handled."""
        import ray

        from onpolicy.rollout.worker import make_rollout_workers

        if self._closing:
            raise err
        with self._recover_lock:
            t0 = time.perf_counter()
            action = "restarted"
            if not wait_until_back(self.workers[i], self.cfg.resources.restart_timeout_s,
                                   give_up=lambda: self._closing):
                if self._closing:
                    raise err
                ray.kill(self.workers[i], no_restart=True)
                self.workers[i] = make_rollout_workers(1, self.student_path, self.cfg, seed_offset=i)[0]
                action = "re-created"
            worker = self.workers[i]
            pid = ray.get(worker.pid.remote())
            if pid == self._worker_pids[i]:
                return worker  # already brought back by another thread
            self._worker_pids[i] = pid
            self._leave_collective("a rollout worker was restarted")
            version = push_weights(self.learner.weight_update.remote(), [worker])[0]
            self.faults.rollout += 1
        self._on_fault({"actor": f"rollout_worker_{i}", "action": action, "weights_version": version,
                        "recover_seconds": time.perf_counter() - t0, "error": type(err).__name__})
        return worker

    def _drain(self) -> None:
        """Let the batches sampled ahead finish (their results are dropped) and forget queued pushes."""
        import ray

        for p in self.pending:
            try:
                p.sampled.result()
            except Exception:  # noqa: BLE001, S110 -- dropped anyway
                pass
        self.pending.clear()
        for ref in self.push_refs:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001, S110 -- the push is redone after the rewind
                pass
        self.push_refs = []

    def _recover_learner(self, err: BaseException) -> None:
        """The learner died: restart it (Ray's restart, or a new actor), load the last whole checkpoint (none:
        the base student, step 0), rewind the prompt stream and the metrics to it, push its weights."""
        import ray


        self.faults.learner += 1
        limit = self.cfg.schedule.max_learner_restarts
        if self.faults.learner > limit:
            raise TooManyRestarts(f"the learner died {self.faults.learner} times (schedule.max_learner_restarts="
                                  f"{limit}); last: {err}") from err
        t0 = time.perf_counter()
        self._drain()
        action = "restarted"
        if isinstance(self.learner, LearnerGroup) or not wait_until_back(self.learner,
                                                                         self.cfg.resources.restart_timeout_s):
            kill_learner(self.learner)  # a group is made again whole (a rank cannot rejoin its collectives)
            self.learner, action = make_learner(self.cfg, self.student_path), "re-created"
        restored = restore_checkpoint(self.out / "checkpoints",
                                      lambda p: ray.get(self.learner.load_checkpoint.remote(p)))
        step, drawn = (restored.state["step"], restored.state["prompts_drawn"]) if restored else (0, 0)
        lost = self.step - step
        self.step = step
        self.source.rewind(drawn)
        self.nonfinite = NonFinite()
        self.log.rewind(step)
        self._leave_collective("the learner was restarted")
        push_weights(self.learner.weight_update.remote(), self.workers)
        self._on_fault({"actor": "learner", "action": action, "checkpoint": str(restored.path) if restored else None,
                        "steps_redone": lost, "recover_seconds": time.perf_counter() - t0,
                        "error": type(err).__name__})

    def _check_pushes(self) -> None:
        """The previous push landed on every worker (a worker that died meanwhile is brought back and given
        the current weights instead)."""
        import ray

        versions = []
        for i, ref in enumerate(self.push_refs):
            try:
                versions.append(ray.get(ref))
            except Exception as err:
                if is_actor_death(err):
                    self._recover_worker(i, err)
                elif self.push_by == "collective":  # a broadcast cut short by a fault: send it the other way
                    self._leave_collective(f"a broadcast failed ({type(err).__name__})")
                    versions = push_weights(self.learner.weight_update.remote(), self.workers)
                    break
                else:
                    raise
        check_push(versions, self.step)

    # ---- weight sync -------------------------------------------------------------------------
    def _open_weight_sync(self) -> bool:
        """Form the broadcast group (learner rank 0 + every engine) when `rollout.weight_sync` allows it;
        `auto` falls back to the object store when it cannot be formed (a LoRA student always uses it)."""
        mode = self.cfg.rollout.weight_sync
        if mode == "object_store" or self.cfg.model.lora is not None:
            return False
        try:
            open_collective(self.learner, self.workers)
            return True
        except Exception:
            if mode == "collective":
                raise
            return False

    def _leave_collective(self, why: str) -> None:
        if self.collective:
            self.collective = False
            if self.log is not None:
                self.log.message(f"weight sync: object store from now on ({why})")

    def _push_async(self) -> list:
        """Queue the learner's current weights on every worker; the refs of the versions they will serve."""
        self.push_by = "collective" if self.collective else "object_store"
        if self.collective:
            return push_collective_async(self.learner, self.workers)
        return push_weights_async(self.learner.weight_update.remote(), self.workers)

    def set_status(self, status: RunStatus, reason: str | None = None) -> None:
        self.status = status
        write_status(self.out, status, step=self.step, reason=reason)

    # ---- one step -----------------------------------------------------------------------
    def _launch(self) -> None:
        """Draw the next step's prompts and start sampling them (on whatever weights the workers serve when
        they get to it: every push queued before this call); a scorer thread scores each worker's part as
        soon as it lands, so scoring too runs ahead of the learner when steps are sampled ahead. The
        objective decides who samples: the student (on-policy), the teacher (sft, soft targets), or, for
        GKD, the student with probability `loss.lmbda`."""
        r = self.cfg.rollout
        index = self.step + len(self.pending)
        examples = self.source.batch(r.prompts_per_step)
        prompts = encode_prompts(self.tokenizer, examples)
        sample = {"n": r.samples_per_prompt, "max_new_tokens": r.max_new_tokens, "temperature": r.temperature,
                      "top_p": r.top_p, "seed": self.cfg.seed * 1_000_003 + index * 7919}
        if student_samples(self.objective, self.cfg.loss.lmbda, self.cfg.seed, index):
            job = self._scorer.submit(self._sample_and_score,
                                      launch_generate(self.workers, prompts, **sample, **self.stop))
        else:
            job = self._scorer.submit(self._teacher_sample_and_score, prompts, sample)
        self.pending.append(Pending(len(examples), job))

    def _score(self, rollouts: list) -> tuple[list, float]:
        t = time.perf_counter()
        scores = score_rollouts(self.teacher, rollouts, top_k=self.cfg.teacher.top_k)
        self._count_teacher_tokens(rollouts)
        return scores, time.perf_counter() - t

    def _count_teacher_tokens(self, rollouts: list) -> None:
        """Teacher tokens processed: prompt + completion of every sequence it scored or generated."""
        with self._lock:
            self.teacher_tokens += sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)

    def _teacher_sample_and_score(self, prompts: list[list[int]], sample: dict[str, Any]) -> Sampled:
        """(In a scorer thread.) The teacher samples the batch; scored for its top-k when the loss needs it
        (sft needs only the tokens: the teacher's own log-probs of them come with the generation)."""
        from onpolicy.types import Rollout, TeacherScores

        t = time.perf_counter()
        completions = self.teacher.generate(prompts, **sample)
        rollouts = [Rollout(prompt_ids=prompts[c.prompt_index], completion_ids=c.completion_ids,
                            sampler_logprobs=c.logprobs, policy_version=self.step, finish_reason=c.finish_reason,
                            prompt_index=c.prompt_index, source="teacher") for c in completions]
        self._count_teacher_tokens(rollouts)
        sampled_at = time.perf_counter()
        if self.objective.needs_topk:
            scores, score_seconds = self._score(rollouts)
        else:
            scores, score_seconds = [TeacherScores(logprobs=c.logprobs) for c in completions], 0.0
        return Sampled(rollouts=rollouts, scores=scores, engine_seconds=0.0,
                       score_seconds=sampled_at - t + score_seconds, sampled_at=sampled_at)

    def _sample_and_score(self, launched: Launched) -> Sampled:
        """(In a scorer thread.) Wait for the rollouts, scoring each worker's part as it arrives."""
        parts = gather(launched, on_part=self._score, recover=self._recover_worker)
        sampled_at = max(p.arrived_at for p in parts)
        return Sampled(rollouts=[r for p in parts for r in p.rollouts],
                       scores=[s for p in parts for s in p.result[0]],
                       engine_seconds=sum(p.engine_seconds for p in parts),
                       score_seconds=sum(p.result[1] for p in parts), sampled_at=sampled_at)

    def train_step(self) -> dict[str, Any] | None:
        """One update. With `schedule.max_staleness = k`, the batches of the next k steps are already being
        sampled (and scored) while this one learns, so the rollouts trained on are at most k versions
        behind the learner (checked: a rollout that is not is dropped and counted).

        None when the learner died during the step: it was restarted from the last checkpoint and
        `self.step` is now that checkpoint's."""
        import ray

        k = self.cfg.schedule.max_staleness
        t_step = time.perf_counter()
        while len(self.pending) < k + 1:
            self._launch()
        batch = self.pending.popleft()
        t = time.perf_counter()
        done = batch.sampled.result()
        waited = time.perf_counter() - t
        # Of the wait, what went to sampling and what to scoring that had not finished when sampling did.
        waits = {"rollout": min(max(done.sampled_at - t, 0.0), waited)}
        waits["score"] = waited - waits["rollout"]
        if self.push_refs:  # the previous push: done by now (the workers served it before sampling this batch)
            self._check_pushes()
        rollouts, scores = done.rollouts, done.scores
        keep, lags = staleness_filter([r.policy_version for r in rollouts], self.step, k)
        if len(keep) < len(rollouts):
            rollouts, scores = [rollouts[i] for i in keep], [scores[i] for i in keep]
        t = time.perf_counter()
        try:
            metrics = ray.get(self.learner.train_step.remote(rollouts, scores))
        except Exception as err:
            if not died(err, self.learner):
                raise
            self._recover_learner(err)
            return None
        waits["learn"] = time.perf_counter() - t
        t = time.perf_counter()
        self.push_refs = self._push_async()
        waits["push"] = time.perf_counter() - t
        self.step += 1
        tokens = sum(len(x.completion_ids) for x in rollouts)
        wall = time.perf_counter() - t_step
        busy = {"rollout": done.engine_seconds, "score": done.score_seconds,
                "learn": metrics.get("learn_seconds", waits["learn"]), "push": waits["push"]}
        metrics.update(stage_metrics(waits, tokens, wall=wall, busy=busy))
        metrics.update(policy_version=self.step, sampled_tokens=tokens, sequences=len(rollouts),
                       teacher_sampled=int(bool(rollouts) and rollouts[0].source == "teacher"),
                       teacher_tokens_processed=self.teacher_tokens,
                       policy_lag_mean=sum(lags) / max(len(lags), 1), policy_lag_max=max(lags, default=0),
                       stale_dropped=len(lags) - len(keep),
                       skipped_long_prompts=self.source.skipped_long)
        metrics.update({f"teacher_{key}": v for key, v in self.teacher.usage().items()})
        self.nonfinite = self.nonfinite.after(bool(metrics.get("skipped_nonfinite")))
        metrics.update(skipped_nonfinite_total=self.nonfinite.total, **self.faults.metrics())
        self.log.train(self.step, metrics)
        self.nonfinite.check(self.cfg.schedule.max_nonfinite_steps, metrics)
        return metrics

    @property
    def prompts_trained(self) -> int:
        """Prompts drawn for steps already trained (the ones sampled ahead are drawn again after a resume)."""
        return self.source.drawn - sum(p.prompts for p in self.pending)

    def evaluate(self) -> dict[str, float]:
        res = evaluate(self.workers, self.teacher, self.tokenizer, self.source.heldout, self.source.ood,
                       max_new_tokens=self.cfg.rollout.max_new_tokens, seed=eval_seed(self.cfg.seed), stop=self.stop,
                       recover=self._recover_worker)
        self.log.eval(self.step, res)
        return res

    def checkpoint(self) -> Path | None:
        """Save the learner and the driver's state as one sealed folder, then drop the oldest beyond
        `checkpoint.keep`. None if the learner died meanwhile (restarted from the previous checkpoint)."""
        import ray

        path = self.out / "checkpoints" / f"step_{self.step:07d}"
        state = {DRIVER_STATE: {"step": self.step, "prompts_drawn": self.prompts_trained}}
        try:
            ray.get(self.learner.save_checkpoint.remote(str(path), state))
        except Exception as err:
            if not died(err, self.learner):
                raise
            self._recover_learner(err)
            return None
        rotate(self.out / "checkpoints", self.cfg.checkpoint.keep)
        return path

    # ---- the loop -----------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] = lambda: False,
            stopped_status: Callable[[], RunStatus] = lambda: RunStatus.STOPPED) -> dict[str, Any]:
        """Train to `schedule.steps` (or the wall-time cap / a stop request); returns a summary.

        A run that was asked to stop ends as `stopped_status()` (the run actor says `paused` when a
        pause was asked)."""
        import ray

        cfg = self.cfg
        self.set_status(RunStatus.RUNNING)
        # A resumed run keeps its first evaluation (its "before"); a fresh one makes it.
        first_eval = (self._first_eval() if self.resumed else None) or self.evaluate()
        distill_seconds, eval_seconds = 0.0, 0.0
        last_eval, stopped = first_eval, False
        while self.step < cfg.schedule.steps:
            if should_stop():
                stopped = True
                break
            t = time.perf_counter()
            done = self.train_step()
            distill_seconds += time.perf_counter() - t
            if done is None:
                continue  # the learner went back to its last checkpoint
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.schedule.steps:
                t = time.perf_counter()
                last_eval = self.evaluate()
                eval_seconds += time.perf_counter() - t
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not self.nonfinite.streak:
                self.checkpoint()
            cap = cfg.schedule.max_wall_seconds
            if cap is not None and distill_seconds >= cap:
                self.log.message(f"stopping at step {self.step}: schedule.max_wall_seconds={cap} reached")
                break
        # Checkpoint first: an evaluation that fails must not lose the last steps.
        ckpt = self.checkpoint()
        ray.get(self.learner.save_model.remote(str(self.out / "student")))
        final_eval = self.evaluate() if self.step > 0 or stopped else last_eval
        summary = {
            "steps": self.step,
            "stopped": stopped,
            "distill_wall_seconds": distill_seconds,
            "eval_wall_seconds": eval_seconds,
            "before": first_eval,
            "after": final_eval,
            "checkpoint": str(ckpt),
            "student": str(self.out / "student"),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.set_status(stopped_status() if stopped else RunStatus.FINISHED)
        return summary

    def _first_eval(self) -> dict[str, Any] | None:
        """The run's first evaluation, if metrics.jsonl has one (a resumed run)."""
        evals = read_metrics(self.out / "metrics.jsonl", kind="eval")
        if not evals:
            return None
        return {k: v for k, v in evals[0].items() if k not in ("kind", "step", "time")}

    def close(self) -> None:
        """Stop this run's actors and close the log (safe to call twice)."""
        import ray

        self._closing = True
        if self.log is not None:
            self.log.close()
        for actor in self.workers:
            ray.kill(actor)
        if self.learner is not None:
            kill_learner(self.learner)
        if self.teacher is not None:
            self.teacher.close()
        self._scorer.shutdown(wait=False, cancel_futures=True)
        self.workers, self.learner, self.teacher, self.log = [], None, None, None
        self.pending.clear()


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    show_progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    stopped_status: Callable[[], RunStatus] = lambda: RunStatus.STOPPED,
    on_start: Callable[[Run], None] | None = None,
) -> dict[str, Any]:
    """Run a whole distillation from a config: the function behind `onpolicy train` and the run actor.

    The one failure path: whatever goes wrong, `status.json` says `failed` with the reason (when
    the run directory exists) and every actor is closed. `on_start(run)` sees the run once built."""
    run = None
    try:
        run = Run(cfg, resume=resume, show_progress=show_progress)
        if on_start is not None:
            on_start(run)
        return run.run(should_stop, stopped_status)
    except BaseException as err:
        if Path(cfg.output_dir).is_dir():
            write_status(cfg.output_dir, RunStatus.FAILED, step=run.step if run else 0,
                         reason=f"{type(err).__name__}: {err}")
        raise
    finally:
        if run is not None:
            run.close()

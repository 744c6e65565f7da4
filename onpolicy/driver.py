"""The run driver: on-policy distillation, one update per step.

    rollout (vLLM workers, policy v) -> score (teacher) -> learn (learner, v -> v+1) -> push (v+1 to every worker)

With `schedule.max_staleness = 0` each step waits for the last (strictly on-policy). With k >= 1 the next k
steps' batches are sampled and scored while this one learns (`sampling.Sampler`), and pushes are queued on
the workers behind the sampling in flight; the learner's importance ratio corrects the lag (at most k).

The driver owns the actors of one run and the loop; what it uses is assembled by `stack.open_stack` (checked
before any engine starts), pushes go by `rollout.weight_sync.WeightSync`, and a dead actor is brought back by
`restarts.Restarts`. Every piece of maths lives in the learner. Metrics go to `<output_dir>/metrics.jsonl`
(kind=train every step, kind=eval on the schedule, kind=fault when an actor died and was brought back,
kind=startup once). A non-finite step changes nothing and is not checkpointed.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onpolicy.config import RunConfig, dump_config
from onpolicy.heldout import eval_seed
from onpolicy.learner.checkpoint import rotate
from onpolicy.metrics import MetricsLog, first_record
from onpolicy.mixture import evaluate_sources
from onpolicy.recovery import DRIVER_STATE, FaultCounts, check_resumable, require_restored, restore_checkpoint
from onpolicy.restarts import Restarts
from onpolicy.retention import retention_summary
from onpolicy.rollout.pool import check_push
from onpolicy.rollout.weight_sync import Push, WeightSync
from onpolicy.sampling import Pending, Sampler
from onpolicy.stack import Stack, check, open_stack
from onpolicy.status import RunStatus, write_status
from onpolicy.step_stats import NonFinite, staleness_filter, step_record
from onpolicy.trackers import check_trackers, open_trackers


class Run:
    """One distillation run: its actors, prompt stream, metrics log and checkpoints.

    Built in one go: everything that needs no engine is checked first, then the teacher, then the engines; if
    anything fails half-way, what was started is closed."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, show_progress: bool = True):
        import ray

        self.cfg, self.out, self.resumed = cfg, Path(cfg.output_dir), resume
        self.step, self.status = 0, RunStatus.STARTING
        self.log: MetricsLog | None = None
        self.pending: deque[Pending] = deque()  # steps sampled ahead (schedule.max_staleness of them)
        self.pushed = Push()  # the last weight push, queued on every worker
        self.sync = WeightSync(cfg.rollout.weight_sync, cfg.model.lora is not None, self._message)
        self.nonfinite, self.faults = NonFinite(), FaultCounts()
        self.closing = False  # close() is killing the actors: nothing is brought back
        self.restarts = Restarts(self)
        if resume:
            check_resumable(self.out)
        check_trackers(cfg.logging.report_to)  # a missing optional package fails here, before any engine
        checked = check(cfg)
        self.stack = Stack(checked)  # nothing started yet: `open_stack` below starts the parts
        self.student_path, self.tokenizer, self.source, self.stop = (checked.student_path, checked.tokenizer,
                                                                     checked.source, checked.stop)
        self.sampler = Sampler(self)
        try:
            self.stack = open_stack(cfg, checked, workers=cfg.rollout.num_workers, learner=True,
                                    before_engines=self._prepare_folder, on_teacher_state=self._on_teacher_state,
                                    on_fault=self.on_fault)
            self.startup = self.stack.startup
            self.restarts.watch(self.workers)
            self.sync.open(self.learner, self.workers)
            restored = None
            if resume:
                restored = require_restored(restore_checkpoint(
                    self.out / "checkpoints", lambda p: ray.get(self.learner.load_checkpoint.remote(p))), self.out)
                self.step = restored.state["step"]
                self.source.advance(restored.state["prompts_drawn"])
                check_push(ray.get(self._push().worker_refs), self.step)
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
            for plan in checked.plans:  # which mode each teacher gets, and why (teacher/modes.py)
                self.log.message(plan.line())
        except BaseException:
            self.close()
            raise

    # ---- the parts, and what the stages tell the driver -----------------------------------------
    @property
    def teacher(self):
        return self.stack.teacher

    @property
    def learner(self):
        return self.stack.learner

    @property
    def workers(self) -> list:
        return self.stack.workers

    @property
    def prompts_trained(self) -> int:
        """Prompts drawn for steps already trained (the ones sampled ahead are drawn again after a resume)."""
        return self.source.drawn - sum(p.prompts for p in self.pending)

    def _prepare_folder(self) -> None:
        """(Once the teacher passed its checks, before the engines start.) The run folder and its config."""
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.out / "config.yaml")
        with (self.out / "config.yaml").open("a") as f:  # comments: the file still loads as a config
            f.write("# teacher modes (decided before any engine started):\n")
            f.writelines(f"#   {plan.line()}\n" for plan in self.stack.checked.plans)
        self.set_status(RunStatus.STARTING)

    def set_status(self, status: RunStatus, reason: str | None = None) -> None:
        self.status = status
        write_status(self.out, status, step=self.step, reason=reason)

    def _on_teacher_state(self, state: str) -> None:
        """The teacher client's circuit breaker opened (scoring paused) or closed again."""
        if self.status in (RunStatus.RUNNING, RunStatus.DEGRADED):
            if state == "closed":
                self.set_status(RunStatus.RUNNING)
            else:
                urls = [u for tc in self.cfg.teacher_list() for u in tc.endpoints()]
                self.set_status(RunStatus.DEGRADED, reason=f"teacher {', '.join(urls)} unreachable; scoring paused")

    def on_fault(self, event: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.fault(self.step, event)

    def _message(self, text: str) -> None:
        if self.log is not None:
            self.log.message(text)

    def _push(self) -> Push:
        """Queue the learner's current weights on every worker (by broadcast or the object store: `WeightSync`)."""
        self.pushed = self.sync.push(self.learner, self.workers)
        return self.pushed

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any] | None:
        """One update on a batch sampled at most `schedule.max_staleness` versions ago (a rollout that is older is
        dropped and counted). None when the learner died during the step: it is back at its last checkpoint and
        `self.step` is that checkpoint's."""
        import ray

        k = self.cfg.schedule.max_staleness
        t_step = time.perf_counter()
        while len(self.pending) < k + 1:
            self.pending.append(self.sampler.launch(self.step + len(self.pending)))
        t = time.perf_counter()
        done = self.pending.popleft().sampled.result()
        waited = time.perf_counter() - t
        # Of the wait, what went to sampling and what to scoring that had not finished when sampling did.
        waits = {"rollout": min(max(done.sampled_at - t, 0.0), waited)}
        waits["score"] = waited - waits["rollout"]
        # the previous push: done by now (the workers served it before sampling this batch)
        if self.pushed.worker_refs and not self.restarts.check_pushes():
            return None
        keep, lags = staleness_filter([r.policy_version for r in done.rollouts], self.step, k)
        rollouts, scores = [done.rollouts[i] for i in keep], [done.scores[i] for i in keep]
        t = time.perf_counter()
        try:
            metrics = ray.get(self.learner.train_step.remote(rollouts, scores))
        except Exception as err:
            if not self.restarts.learner_back(err):
                raise
            return None
        waits["learn"] = time.perf_counter() - t
        t = time.perf_counter()
        self._push()
        waits["push"] = time.perf_counter() - t
        self.step += 1
        self.nonfinite = self.nonfinite.after(bool(metrics.get("skipped_nonfinite")))
        busy = {"rollout": done.engine_seconds, "score": done.score_seconds,
                "learn": metrics.get("learn_seconds", waits["learn"]), "push": waits["push"]}
        metrics = step_record(metrics, rollouts, lags, waits=waits, busy=busy, wall=time.perf_counter() - t_step,
                              policy_version=self.step, weight_push=self.pushed.by,
                              teacher_tokens_processed=self.sampler.teacher_tokens,
                              skipped_long_prompts=self.source.skipped_long,
                              **{f"teacher_{key}": v for key, v in self.teacher.usage().items()},
                              skipped_nonfinite_total=self.nonfinite.total, **self.faults.metrics(), **done.by_source)
        self.log.train(self.step, metrics)
        self.nonfinite.check(self.cfg.schedule.max_nonfinite_steps, metrics)
        return metrics

    def evaluate(self) -> dict[str, float]:
        # each source of a mixture is evaluated with its own teacher (one source: its teacher, as ever)
        res = evaluate_sources(self.source, self.teacher.member, self.teacher.default, workers=self.workers,
                               tokenizer=self.tokenizer, max_new_tokens=self.cfg.rollout.max_new_tokens,
                               seed=eval_seed(self.cfg.seed), stop=self.stop, recover=self.restarts.worker,
                               unseen=self.source.unseen, retention=self.stack.checked.retention)
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
            if not self.restarts.learner_back(err):
                raise
            return None
        rotate(self.out / "checkpoints", self.cfg.checkpoint.keep)
        return path

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] = lambda: False,
            stopped_status: Callable[[], RunStatus] = lambda: RunStatus.STOPPED) -> dict[str, Any]:
        """Train to `schedule.steps` (or the wall-time cap / a stop request); returns a summary. A run that was
        asked to stop ends as `stopped_status()` (the run actor says `paused` when a pause was asked)."""
        import ray

        cfg = self.cfg
        self.set_status(RunStatus.RUNNING)
        t = time.perf_counter()  # a resumed run keeps its first evaluation (its "before"); a fresh one makes it
        first_eval = (first_record(self.out / "metrics.jsonl", "eval") if self.resumed else None) or self.evaluate()
        self.startup["first_eval_seconds"] = time.perf_counter() - t
        self.log.write("startup", self.step, self.startup)
        distill_seconds, eval_seconds, last_eval, stopped = 0.0, 0.0, first_eval, False
        while self.step < cfg.schedule.steps:
            if should_stop():
                stopped = True
                break
            t = time.perf_counter()
            done = self.train_step()
            distill_seconds += time.perf_counter() - t
            if done is None:
                continue  # the learner went back to its last checkpoint
            if cfg.eval.due(self.step) and self.step < cfg.schedule.steps:
                t = time.perf_counter()
                last_eval = self.evaluate()
                eval_seconds += time.perf_counter() - t
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not self.nonfinite.streak:
                self.checkpoint()
            cap = cfg.schedule.max_wall_seconds
            if cap is not None and distill_seconds >= cap:
                self.log.message(f"stopping at step {self.step}: schedule.max_wall_seconds={cap} reached")
                break
        ckpt = self.checkpoint()  # first: an evaluation that fails must not lose the last steps
        ray.get(self.learner.save_model.remote(str(self.out / "student")))
        final_eval = self.evaluate() if self.step > 0 or stopped else last_eval
        summary = {"steps": self.step, "stopped": stopped, "distill_wall_seconds": distill_seconds,
                   "eval_wall_seconds": eval_seconds, "before": first_eval, "after": final_eval,
                   "checkpoint": str(ckpt), "student": str(self.out / "student"), "startup": self.startup,
                   "teachers": [plan.as_dict() for plan in self.stack.checked.plans]}
        retention = self.stack.checked.retention
        if retention is not None:  # each probe set's exact match before and after, flagged on a drop
            summary["retention"] = retention_summary(first_eval, final_eval, retention.probes)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.set_status(stopped_status() if stopped else RunStatus.FINISHED)
        return summary

    def close(self) -> None:
        """Stop this run's actors and close the log (safe to call twice)."""
        self.closing = True
        if self.log is not None:
            self.log.close()
        self.stack.close()
        self.sampler.close()
        self.log = None
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

    The one failure path: whatever goes wrong, `status.json` says `failed` with the reason (when the run
    directory exists) and every actor is closed. `on_start(run)` sees the run once built."""
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

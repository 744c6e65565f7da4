"""The run driver: strictly on-policy distillation, one step at a time.

    rollout (vLLM workers, policy v) -> score (teacher) -> learn (learner, v -> v+1) -> push (v+1 to every worker)

The driver owns the actors of one run and nothing else; every piece of maths lives in the
learner, every engine detail in the rollout/teacher packages, and the teacher, whatever its kind,
comes from `open_teacher`. Metrics go to `<output_dir>/metrics.jsonl` (kind=train every step,
kind=eval on the schedule).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onpolicy.config import RunConfig, dump_config
from onpolicy.data import PromptSource, encode_prompts
from onpolicy.heldout import eval_seed, evaluate, score_rollouts
from onpolicy.metrics import MetricsLog
from onpolicy.model_dir import model_max_len, require_model_dir
from onpolicy.rollout.pool import generate_on, push_weights
from onpolicy.status import RunStatus, write_status

STAGES = ("rollout", "score", "learn", "push")


def stage_metrics(seconds: dict[str, float], tokens: int) -> dict[str, float]:
    """Seconds, tokens/s and share of the step for each stage (tokens = sampled completion tokens)."""
    total = sum(seconds.values()) or 1e-9
    out: dict[str, float] = {"step_seconds": total, "tokens_per_second": tokens / total}
    for name in STAGES:
        s = seconds.get(name, 0.0)
        out[f"{name}_seconds"] = s
        out[f"{name}_tokens_per_second"] = tokens / s if s > 0 else 0.0
        out[f"{name}_share"] = s / total
    return out


class Run:
    """One distillation run: its actors, prompt stream, metrics log and checkpoints.

    Built in one go: the student folder and the teacher are checked first (before any engine
    starts), then the actors start; if anything fails half-way, what was started is closed."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, show_progress: bool = True):
        import ray
        from transformers import AutoTokenizer

        from onpolicy.learner.actor import make_learner_actor
        from onpolicy.ray_utils import init_ray
        from onpolicy.rollout.worker import make_rollout_workers
        from onpolicy.teacher.factory import open_teacher

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.step = 0
        self.status = RunStatus.STARTING
        self.teacher, self.learner, self.workers, self.log = None, None, [], None
        self.student_path = str(require_model_dir(cfg.model.student, "student"))
        # The data is read and checked against the student before anything starts.
        self.source = PromptSource(cfg.data, cfg.eval, cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.student_path)
        self._check_prompt_lengths("student", model_max_len(self.student_path))
        try:
            init_ray()
            # Checked against the student (reachable, tokenizer, EOS, top-k) before any other engine starts.
            self.teacher = open_teacher(cfg.teacher, student=self.student_path, seed=cfg.seed,
                                        resources=cfg.resources, on_state_change=self._on_teacher_state)
            self._check_prompt_lengths("teacher", self.teacher.info().max_model_len)
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
            self.set_status(RunStatus.STARTING)
            self.learner = make_learner_actor(cfg, self.student_path)
            self.workers = make_rollout_workers(cfg.rollout.num_workers, self.student_path, cfg)
            ckpt = latest_checkpoint(self.out) if resume else None
            if ckpt is not None:
                ray.get(self.learner.load_checkpoint.remote(str(ckpt)))
                state = json.loads((ckpt / "driver_state.json").read_text())
                self.step = state["step"]
                self.source.advance(state["prompts_drawn"])
                push_weights(self.learner.weight_update.remote(), self.workers)
            self.log = MetricsLog(self.out / "metrics.jsonl", cfg.schedule.steps, show_progress=show_progress,
                                  start_step=self.step)
            if ckpt is not None:
                self.log.message(f"resumed from {ckpt} at step {self.step}")
            if self.source.skipped_long:
                self.log.message(f"skipped {self.source.skipped_long} prompts longer than the student or teacher "
                                 "accepts (data.skip_long_prompts=true)")
        except BaseException:
            self.close()
            raise

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
                                reason=f"teacher {self.cfg.teacher.url} unreachable; scoring paused")

    def set_status(self, status: RunStatus, reason: str | None = None) -> None:
        self.status = status
        write_status(self.out, status, step=self.step, reason=reason)

    # ---- one step -----------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        import ray

        cfg, r = self.cfg, self.cfg.rollout
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        examples = self.source.batch(r.prompts_per_step)
        rollouts = generate_on(self.workers, encode_prompts(self.tokenizer, examples), n=r.samples_per_prompt,
                               max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                               seed=cfg.seed * 1_000_003 + self.step * 7919)
        seconds["rollout"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = score_rollouts(self.teacher, rollouts, top_k=cfg.teacher.top_k)
        seconds["score"] = time.perf_counter() - t
        t = time.perf_counter()
        metrics = ray.get(self.learner.train_step.remote(rollouts, scores))
        seconds["learn"] = time.perf_counter() - t
        t = time.perf_counter()
        versions = push_weights(self.learner.weight_update.remote(), self.workers)
        seconds["push"] = time.perf_counter() - t
        self.step += 1
        tokens = sum(len(x.completion_ids) for x in rollouts)
        metrics.update(stage_metrics(seconds, tokens))
        metrics.update(policy_version=versions[0], sampled_tokens=tokens, sequences=len(rollouts))
        metrics.update({f"teacher_{k}": v for k, v in self.teacher.usage().items()})
        self.log.train(self.step, metrics)
        return metrics

    def evaluate(self) -> dict[str, float]:
        res = evaluate(self.workers, self.teacher, self.tokenizer, self.source.heldout, self.source.ood,
                       max_new_tokens=self.cfg.rollout.max_new_tokens, seed=eval_seed(self.cfg.seed))
        self.log.eval(self.step, res)
        return res

    def checkpoint(self) -> Path:
        import ray

        path = self.out / "checkpoints" / f"step_{self.step:07d}"
        ray.get(self.learner.save_checkpoint.remote(str(path)))
        (path / "driver_state.json").write_text(
            json.dumps({"step": self.step, "prompts_drawn": self.source.drawn})
        )
        ckpts = sorted((self.out / "checkpoints").glob("step_*"))
        for old in ckpts[: -self.cfg.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
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
        first_eval = self.evaluate()
        distill_seconds, eval_seconds = 0.0, 0.0
        last_eval, stopped = first_eval, False
        while self.step < cfg.schedule.steps:
            if should_stop():
                stopped = True
                break
            t = time.perf_counter()
            self.train_step()
            distill_seconds += time.perf_counter() - t
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.schedule.steps:
                t = time.perf_counter()
                last_eval = self.evaluate()
                eval_seconds += time.perf_counter() - t
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.checkpoint()
            cap = cfg.schedule.max_wall_seconds
            if cap is not None and distill_seconds >= cap:
                self.log.message(f"stopping at step {self.step}: schedule.max_wall_seconds={cap} reached")
                break
        final_eval = self.evaluate() if self.step > 0 or stopped else last_eval
        ckpt = self.checkpoint()
        ray.get(self.learner.save_model.remote(str(self.out / "student")))
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

    def close(self) -> None:
        """Stop this run's actors and close the log (safe to call twice)."""
        import ray

        if self.log is not None:
            self.log.close()
        for actor in [*self.workers, self.learner]:
            if actor is not None:
                ray.kill(actor)
        if self.teacher is not None:
            self.teacher.close()
        self.workers, self.learner, self.teacher, self.log = [], None, None, None


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (out_dir / "checkpoints").glob("step_*") if (p / "driver_state.json").exists())
    return ckpts[-1] if ckpts else None


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

"""The run driver: strictly on-policy distillation, one step at a time.

    rollout (vLLM workers, policy v) -> score (teacher) -> learn (learner, v -> v+1) -> push (v+1 to every worker)

The driver owns the actors of one run and nothing else; every piece of maths lives in the
learner, every engine detail in the rollout/teacher packages. Metrics go to
`<output_dir>/metrics.jsonl` (kind=train every step, kind=eval on the schedule).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onpolicy.config import RunConfig, dump_config
from onpolicy.data import PromptSource, encode_prompts
from onpolicy.evaluation import evaluate, generate_on, score_rollouts
from onpolicy.metrics import MetricsLog
from onpolicy.status import Status, write_status

STAGES = ("rollout", "score", "learn", "push")


def require_model_dir(path: str, role: str) -> str:
    """Fail early, naming the path, before any engine starts."""
    p = Path(path)
    if not (p / "config.json").is_file():
        hint = " (run `onpolicy toy build --out toy` to build the toy models)" if "toy" in str(p) else ""
        raise FileNotFoundError(f"{role} model folder not found or has no config.json: {p}{hint}")
    return str(p.resolve())


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS if set, else start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        include_dashboard=False,
        log_to_driver=os.environ.get("ONPOLICY_RAY_LOGS", "0") == "1",
        runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}},
    )


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
    """One distillation run: its actors, prompt stream, metrics log and checkpoints."""

    def __init__(self, cfg: RunConfig, *, show_progress: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.student_path = require_model_dir(cfg.model.student, "student")
        self.teacher = None
        if cfg.teacher.kind == "local":
            from onpolicy.teacher.fingerprint import check_compatible

            check_compatible(self.student_path, require_model_dir(cfg.teacher.model, "teacher"))
        else:
            # An external teacher is checked (reachable, log-probs, tokenizer, EOS) before any engine starts.
            from onpolicy.teacher.check import assert_compatible
            from onpolicy.teacher.remote import make_teacher_client

            self.teacher = make_teacher_client(cfg.teacher, on_state_change=self._on_teacher_state)
            assert_compatible(self.teacher, self.student_path)
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.out / "config.yaml")
        self.show_progress = show_progress
        self.step = 0
        self.set_status("starting")

    def _on_teacher_state(self, state: str) -> None:
        """The teacher client's circuit breaker opened (scoring paused) or closed again."""
        if getattr(self, "status", None) in ("running", "degraded"):
            if state == "closed":
                self.set_status("running")
            else:
                self.set_status("degraded", reason=f"teacher {self.cfg.teacher.url} unreachable; scoring paused")

    def set_status(self, status: Status, reason: str | None = None) -> None:
        self.status = status
        write_status(self.out, status, step=self.step, reason=reason)

    # ---- set-up -------------------------------------------------------------------------
    def start(self, resume: bool = False) -> None:
        import ray
        from transformers import AutoTokenizer

        from onpolicy.learner.actor import make_learner_actor
        from onpolicy.rollout.worker import make_rollout_workers
        from onpolicy.teacher.actor import make_local_teacher
        from onpolicy.weights import push_weights

        init_ray()
        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(self.student_path)
        self.learner = make_learner_actor(cfg, self.student_path)
        self.workers = make_rollout_workers(cfg.rollout.num_workers, self.student_path, cfg)
        if self.teacher is None:
            self.teacher = make_local_teacher(cfg)
        self.step, drawn = 0, 0
        ckpt = latest_checkpoint(self.out) if resume else None
        if ckpt is not None:
            ray.get(self.learner.load_checkpoint.remote(str(ckpt)))
            state = json.loads((ckpt / "driver_state.json").read_text())
            self.step, drawn = state["step"], state["prompts_drawn"]
            push_weights(self.learner.weight_update.remote(), self.workers)
        self.source = PromptSource(cfg.data, cfg.eval, cfg.seed, skip=drawn)
        self.log = MetricsLog(self.out / "metrics.jsonl", cfg.schedule.steps, show_progress=self.show_progress,
                              start_step=self.step)
        if ckpt is not None:
            self.log.message(f"resumed from {ckpt} at step {self.step}")

    # ---- one step -----------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        import ray

        from onpolicy.weights import push_weights

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
        usage = getattr(self.teacher, "usage", None)
        if usage is not None:
            metrics.update({f"teacher_{k}": v for k, v in usage().items()})
        self.log.train(self.step, metrics)
        return metrics

    def evaluate(self) -> dict[str, float]:
        res = evaluate(self.workers, self.teacher, self.tokenizer, self.source.heldout, self.source.ood,
                       max_new_tokens=self.cfg.rollout.max_new_tokens, seed=self.cfg.seed + 12345)
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
    def run(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Train to `schedule.steps` (or the wall-time cap / a stop request); returns a summary."""
        import ray

        cfg = self.cfg
        self.set_status("running")
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
        self.set_status("stopped" if stopped else "finished")
        return summary

    def close(self) -> None:
        """Stop this run's actors and close the log (safe to call twice)."""
        import ray

        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None
        teacher = getattr(self, "teacher", None)
        actors = [*getattr(self, "workers", []), getattr(self, "learner", None), getattr(teacher, "handle", None)]
        for actor in actors:
            if actor is not None:
                ray.kill(actor)
        if teacher is not None and hasattr(teacher, "close"):
            teacher.close()
        self.workers, self.learner, self.teacher = [], None, None


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (out_dir / "checkpoints").glob("step_*") if (p / "driver_state.json").exists())
    return ckpts[-1] if ckpts else None


def train(cfg: RunConfig, *, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run a whole distillation from a config: the function behind `onpolicy train`."""
    run = Run(cfg, show_progress=show_progress)
    try:
        run.start(resume=resume)
        return run.run()
    except BaseException as err:
        run.set_status("failed", reason=f"{type(err).__name__}: {err}")
        raise
    finally:
        run.close()

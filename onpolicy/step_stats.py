"""Per-step bookkeeping of a run, pure (no Ray, no torch): the stage timing metrics of a step, the
streak of steps skipped for a non-finite loss, and the staleness filter of a pipelined step. The
driver (`onpolicy.driver`) calls these once per step; `onpolicy bench` reads STAGES."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STAGES = ("rollout", "score", "learn", "push")


def stage_metrics(waits: dict[str, float], tokens: int, *, wall: float | None = None,
                  busy: dict[str, float] | None = None) -> dict[str, float]:
    """Per stage: the seconds the driver waited on it (`<stage>_seconds`, summing to the step with the
    driver's own overhead folded in as shares of the waits), tokens/s and share of the step, and, when
    given, the seconds the stage was busy (`<stage>_busy_seconds`: engine time, teacher calls, learner
    compute). `overlap` = busy seconds of all stages / step wall time: about 1 or below when the stages
    run one after the other, above 1 when they run at the same time (tokens = sampled completion tokens)."""
    total = sum(waits.values()) or 1e-9
    wall = wall if wall is not None else total
    out: dict[str, float] = {"step_seconds": wall, "tokens_per_second": tokens / max(wall, 1e-9)}
    for name in STAGES:
        s = waits.get(name, 0.0)
        out[f"{name}_seconds"] = s
        out[f"{name}_tokens_per_second"] = tokens / s if s > 0 else 0.0
        out[f"{name}_share"] = s / total
        if busy is not None:
            out[f"{name}_busy_seconds"] = busy.get(name, 0.0)
    if busy is not None:
        out["overlap"] = sum(busy.values()) / max(wall, 1e-9)
    return out


class NonFiniteSteps(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass(frozen=True)
class NonFinite:
    """Steps skipped for a non-finite loss or gradient norm: in a row, and in all."""

    streak: int = 0
    total: int = 0

    def after(self, skipped: bool) -> NonFinite:
        return NonFinite(self.streak + 1, self.total + 1) if skipped else NonFinite(0, self.total)

    def check(self, limit: int, metrics: dict[str, Any]) -> None:
        """Raise NonFiniteSteps, naming the fix, once `limit` steps in a row were skipped."""
        if self.streak >= limit:
            raise NonFiniteSteps(
                f"{self.streak} steps in a row had a non-finite loss or gradient norm (last: "
                f"loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}); nothing was applied, "
                f"checkpoints are intact. Lower optim.lr, check the teacher's scores and the data, then resume "
                f"(schedule.max_nonfinite_steps={limit})."
            )


def staleness_filter(versions: list[int], learner_version: int, max_staleness: int) -> tuple[list[int], list[int]]:
    """(indices of the rollouts to train on, the policy lag of every rollout): a rollout sampled from version
    v is `learner_version - v` updates behind; more than `max_staleness` and it is dropped."""
    lags = [learner_version - v for v in versions]
    return [i for i, lag in enumerate(lags) if lag <= max_staleness], lags


def step_record(learner_metrics: dict[str, Any], rollouts: list, lags: list[int], *, waits: dict[str, float],
                busy: dict[str, float], wall: float, **facts: Any) -> dict[str, Any]:
    """A step's `metrics.jsonl` record: what the learner reported, the stage timings (`stage_metrics`), what was
    sampled (tokens, sequences, who sampled, policy lag, rollouts dropped as stale) and `facts` as given
    (policy_version, weight_push, teacher usage...)."""
    tokens = sum(len(r.completion_ids) for r in rollouts)
    out = dict(learner_metrics)
    out.update(stage_metrics(waits, tokens, wall=wall, busy=busy))
    out.update(sampled_tokens=tokens, sequences=len(rollouts),
               teacher_sampled=int(bool(rollouts) and rollouts[0].source == "teacher"),
               policy_lag_mean=sum(lags) / max(len(lags), 1), policy_lag_max=max(lags, default=0),
               stale_dropped=len(lags) - len(rollouts), **facts)
    return out

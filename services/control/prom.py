"""Prometheus exposition of the run table (a fresh registry per scrape: values come from the DB)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from onpolicy.status import ACTIVE, RunStatus
from services.control.db import Store


def render_metrics(store: Store) -> tuple[bytes, str]:
    reg = CollectorRegistry()
    by_status = Gauge("onpolicy_runs", "Runs by status", ["status"], registry=reg)
    counts = store.count_by_status()
    for s in RunStatus:
        by_status.labels(s.value).set(counts.get(s, 0))
    step = Gauge("onpolicy_run_step", "Training step of each active run", ["run_id"], registry=reg)
    tps = Gauge("onpolicy_run_tokens_per_second", "Sampled tokens/s of the last step", ["run_id"], registry=reg)
    latency = Gauge("onpolicy_run_teacher_score_seconds", "Teacher scoring time of the last step", ["run_id"],
                    registry=reg)
    for rec in store.runs_in(ACTIVE):
        step.labels(rec.id).set(rec.step)
        m = rec.latest_metrics or {}
        if isinstance(m.get("tokens_per_second"), (int, float)):
            tps.labels(rec.id).set(m["tokens_per_second"])
        if isinstance(m.get("score_seconds"), (int, float)):
            latency.labels(rec.id).set(m["score_seconds"])
    return generate_latest(reg), CONTENT_TYPE_LATEST

"""The loop with the teacher behind HTTP: our service and a real external vLLM server (both the session's,
conftest.py), and a teacher that answers garbage. Real servers on loopback; tiny random models. A teacher
that dies mid-run: tests/test_teacher_pool.py (one replica, then both)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from fakes.scripted import Script, make_scripted_teacher_app
from fakes.server import ServerThread

from onpolicy.config import load_config
from onpolicy.driver import train
from onpolicy.metrics import read_metrics
from onpolicy.status import read_status
from onpolicy.teacher.fingerprint import describe_model

pytestmark = pytest.mark.slow

PROMPTS = 32


def _cfg(student, out, kind, url, *extra):
    return load_config(None, [
        f"model.student={student}", f"teacher.kind={kind}", f"teacher.url={url}", f"output_dir={out}",
        "rollout.num_workers=1", f"rollout.prompts_per_step={PROMPTS}", "rollout.max_new_tokens=6",
        "optim.lr=0.003", "optim.warmup_steps=0", "optim.schedule=constant", "schedule.steps=25",
        "eval.every=0", "eval.num_prompts=64", "eval.ood_num_prompts=0", "checkpoint.every=0",
        "teacher.max_retries=1", "teacher.backoff_base_s=0.05", "teacher.backoff_max_s=0.2",
        "teacher.breaker_failures=2", "teacher.breaker_cooldown_s=0.5", "teacher.max_wait_s=120", *extra,
    ])


def _assert_kl_falls(summary):
    before, after = summary["before"]["heldout_reverse_kl"], summary["after"]["heldout_reverse_kl"]
    assert after < 0.7 * before, f"held-out reverse KL {before:.4f} -> {after:.4f}"


def test_run_with_our_teacher_service(ray_session, tiny_model_dir, teacher_service, tmp_path):
    from conftest import TEACHER_SERVICE_KEY_ENV

    cfg = _cfg(tiny_model_dir, tmp_path, "service", teacher_service.url, f"teacher.api_key_env={TEACHER_SERVICE_KEY_ENV}")
    summary = train(cfg, show_progress=False)
    _assert_kl_falls(summary)
    train_recs = read_metrics(tmp_path / "metrics.jsonl", kind="train")
    assert train_recs[-1]["teacher_tokens_scored"] >= sum(r["sampled_tokens"] for r in train_recs)


def test_gkd_run_with_external_vllm_server(ray_session, tiny_model_dir, vllm_server, tmp_path):
    """GKD against a real vLLM server: each batch is sampled by the student with probability lmbda, else by the
    teacher (the server's /v1/completions), and scored for its top-8 (the server's --max-logprobs)."""
    summary = train(_cfg(tiny_model_dir, tmp_path, "vllm", vllm_server.url, "loss.kind=gkd", "teacher.top_k=8"),
                    show_progress=False)
    _assert_kl_falls(summary)
    train_recs = read_metrics(tmp_path / "metrics.jsonl", kind="train")
    sampled_by = [r["teacher_sampled"] for r in train_recs]
    assert 0 < sum(sampled_by) < len(sampled_by), sampled_by  # both kinds of batch (lmbda 0.5, seeded)
    # a teacher batch is generated (and scored) by the teacher: its tokens count as teacher tokens
    assert all(r["sequences"] == PROMPTS for r in train_recs)


class CountingTeacher:
    """A real local teacher that records every sequence it scores (to count double scoring)."""

    def __init__(self, inner):
        self.inner, self.scored = inner, Counter()

    def info(self):
        return self.inner.info()

    def score(self, items, top_k=0):
        out = self.inner.score(items, top_k)
        self.scored["sequences"] += len(items)
        return out


def test_malformed_teacher_stops_the_run_with_the_reason(ray_session, tiny_model_dir, tmp_path):
    script = Script(default="short")  # one log-prob too few in every answer
    info = describe_model(str(tiny_model_dir), max_top_k=16)
    with ServerThread(make_scripted_teacher_app(script, info=info)) as server:
        cfg = _cfg(tiny_model_dir, tmp_path, "service", server.url, "checkpoint.every=1")
        cfg.teacher.breaker_failures = 100
        with pytest.raises(Exception, match="expected .* log-probs"):
            train(cfg, show_progress=False)
    status = read_status(tmp_path)
    assert status["status"] == "failed" and "log-probs" in status["reason"]
    assert script.requests["score"] == 1  # a malformed answer is not retried blindly
    # refused before the loss: no step applied, logged or checkpointed (checkpoint.every=1)
    assert read_metrics(tmp_path / "metrics.jsonl", kind="train") == []
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")

"""The loop with the teacher behind HTTP: our service, a real external vLLM server, and a teacher
that dies mid-run or answers garbage. Real servers on loopback; tiny random models."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from fakes.scripted import Script, make_scripted_teacher_app
from fakes.server import ServerThread
from fakes.vllm import start_vllm_server
from servers import free_port, start_teacher_server, stop_server, wait_healthy

from onpolicy.config import load_config
from onpolicy.driver import Run, train
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


def test_run_with_our_teacher_service(ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path):
    port = free_port()
    proc = start_teacher_server(tiny_teacher_dir, port, backend="vllm")
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", timeout=180, proc=proc)
        summary = train(_cfg(tiny_model_dir, tmp_path, "service", f"http://127.0.0.1:{port}"), show_progress=False)
    finally:
        stop_server(proc)
    _assert_kl_falls(summary)
    train_recs = read_metrics(tmp_path / "metrics.jsonl", kind="train")
    assert train_recs[-1]["teacher_tokens_scored"] >= sum(r["sampled_tokens"] for r in train_recs)


def test_run_with_external_vllm_server(ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path):
    with start_vllm_server(tiny_teacher_dir) as srv:
        summary = train(_cfg(tiny_model_dir, tmp_path, "vllm", srv.url), show_progress=False)
    _assert_kl_falls(summary)


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


def test_teacher_killed_mid_run_then_restarted(ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path):
    from onpolicy.teacher.local import HFTeacher
    from services.teacher.app import create_app

    counting = CountingTeacher(HFTeacher(str(tiny_teacher_dir)))
    server = ServerThread(create_app(counting, model_name="tiny-teacher")).start()
    # max_retries=1 < breaker_failures=5: spending the retries must degrade the run too, not fail it
    cfg = _cfg(tiny_model_dir, tmp_path, "service", server.url, "schedule.steps=8", "teacher.breaker_failures=5")
    run = Run(cfg, show_progress=False)
    result: dict = {}

    def go():
        try:
            result["summary"] = run.run()
        except BaseException as err:  # surfaced by the assertions below
            result["error"] = err

    thread = threading.Thread(target=go)
    thread.start()
    seen = []
    try:
        _wait(lambda: len(read_metrics(tmp_path / "metrics.jsonl", kind="train")) >= 3, 300, "3 steps")
        server.stop()  # the teacher dies mid-run
        _wait(lambda: (read_status(tmp_path) or {}).get("status") == "degraded", 60, "status degraded")
        seen.append(read_status(tmp_path))
        time.sleep(2.0)  # the run waits instead of failing
        assert thread.is_alive() and "error" not in result
        server.start()  # ...and comes back on the same port
        thread.join(timeout=300)
    finally:
        server.stop()
        run.close()
    assert "error" not in result, result.get("error")
    assert seen[0]["reason"] and "unreachable" in seen[0]["reason"]
    assert read_status(tmp_path)["status"] == "finished"
    recs = read_metrics(tmp_path / "metrics.jsonl", kind="train")
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert all(r["sequences"] == PROMPTS for r in recs)  # no rollout lost
    # every training and eval sequence was scored exactly once: 8 steps + 2 evals of 64 prompts
    assert counting.scored["sequences"] == 8 * PROMPTS + 2 * 64


def test_malformed_teacher_stops_the_run_with_the_reason(ray_session, tiny_model_dir, tmp_path):
    script = Script(default="short")  # one log-prob too few in every answer
    info = describe_model(str(tiny_model_dir), max_top_k=16)
    with ServerThread(make_scripted_teacher_app(script, info=info)) as server:
        cfg = _cfg(tiny_model_dir, tmp_path, "service", server.url)
        cfg.teacher.breaker_failures = 100
        with pytest.raises(Exception, match="expected .* log-probs"):
            train(cfg, show_progress=False)
    status = read_status(tmp_path)
    assert status["status"] == "failed" and "log-probs" in status["reason"]
    assert script.requests["score"] == 1  # a malformed answer is not retried blindly


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_eval_honours_teacher_kind_service(ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path):
    """`onpolicy eval` scores through the configured teacher (here our service), not a local engine."""
    from onpolicy.eval_student import eval_student
    from onpolicy.teacher.local import HFTeacher
    from services.teacher.app import create_app

    counting = CountingTeacher(HFTeacher(str(tiny_teacher_dir)))
    with ServerThread(create_app(counting, model_name="tiny-teacher")) as server:
        cfg = _cfg(tiny_model_dir, tmp_path, "service", server.url, "eval.num_prompts=24", "eval.ood_num_prompts=8")
        metrics = eval_student(cfg, str(tiny_model_dir))
    assert metrics["heldout_reverse_kl"] > 0 and 0 <= metrics["heldout_accuracy"] <= 1
    assert "ood_reverse_kl" in metrics
    assert counting.scored["sequences"] == 24 + 8  # every held-out and OOD sample, scored by the service

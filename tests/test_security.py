"""Security findings, one test each (on loopback): secrets only by allow-listed name, no requests to
private hosts for API clients and no upstream bodies reflected to them, files confined to roots,
bounded request bodies, safe checkpoint loading, bad input refused before anything starts, auth
required to listen beyond loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.testclient import TestClient

from onpolicy.config import load_config
from onpolicy.prompts import PromptSource, read_prompts_file
from onpolicy.teacher.clients.service import ServiceTeacher
from onpolicy.teacher.errors import TeacherResponseError
from onpolicy.toy.tokenizer import build_tokenizer
from onpolicy.types import ScoreRequestItem
from services.control.app import create_app
from services.control.launcher import InMemoryLauncher
from services.control.policy import Policy, PolicyError
from services.control.settings import Settings
from tests.fakes.scripted import Script, make_scripted_teacher_app
from tests.fakes.server import ServerThread, free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sec-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "SECRET-6f1c2e"  # what an internal service would answer with


def secret_app() -> FastAPI:
    """An "internal" service that answers everything with a body carrying a secret."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def anything(path: str):
        if path.startswith("v1/info"):
            return PlainTextResponse(f"token={SECRET}", status_code=200)
        return JSONResponse({"detail": f"internal error with {SECRET}"}, status_code=400)

    return app


@pytest.fixture
def control(tmp_path):
    models = tmp_path / "models"
    (models / "student").mkdir(parents=True)
    (models / "student" / "config.json").write_text("{}")
    settings = Settings(data_dir=str(tmp_path / "control"), launcher=InMemoryLauncher(), scheduler_interval_s=0,
                        api_tokens=[TOKEN], models_roots=[str(models)], data_roots=[str(tmp_path / "data")],
                        max_body_bytes=64 << 10)
    with TestClient(create_app(settings), headers=AUTH) as c:
        c.models = models
        yield c


def _paths(r) -> set[str]:
    return {e["path"] for e in r.json()["detail"]}


def test_api_key_env_only_from_the_allow_list(control):
    r = control.post("/v1/runs", json={"config": {"teacher": {"kind": "service", "url": "http://93.184.216.34:8100",
                                                              "api_key_env": "ONPOLICY_API_TOKENS"}}})
    assert r.status_code == 422 and _paths(r) == {"teacher.api_key_env"}
    assert "ONPOLICY_TEACHER_KEY_" in r.text
    r = control.post("/v1/teachers", json={"url": "http://93.184.216.34:8100", "api_key_env": "RAY_AUTH_TOKEN"})
    assert r.status_code == 422 and "ONPOLICY_TEACHER_KEY_" in r.text
    assert control.get("/v1/runs").json()["runs"] == []


def test_private_teacher_urls_are_refused_and_bodies_never_reflected(control, tmp_path):
    with ServerThread(secret_app()) as srv:
        for body in ({"url": srv.url}, {"url": srv.url, "student": "student"}):
            r = control.post("/v1/teachers", json=body)
            assert r.status_code == 422 and "ONPOLICY_TEACHER_ALLOW_HOSTS" in r.text and SECRET not in r.text
        r = control.post("/v1/runs", json={"config": {"teacher": {"kind": "service", "url": srv.url}}})
        assert r.status_code == 422 and _paths(r) == {"teacher.url"}
        # every replica of a teacher pool is held to the same rule
        r = control.post("/v1/runs", json={"config": {"teacher": {"kind": "service",
                                                                  "urls": ["http://93.184.216.34:8100", srv.url]}}})
        assert r.status_code == 422 and _paths(r) == {"teacher.urls.1"}
        for url in (f"{srv.url}/?x=", f"{srv.url}#frag", srv.url.replace("http://", "http://user:pw@")):
            r = control.post("/v1/teachers", json={"url": url})
            assert r.status_code == 422 and "query" in r.text
        # Allowed by the operator: fetched, but only status codes come back, never the body.
        control.app.state.control.policy.allow_hosts.append("127.0.0.1")
        for body in ({"url": srv.url}, {"url": srv.url, "kind": "vllm"}, {"url": srv.url, "student": "student"}):
            r = control.post("/v1/teachers", json=body)
            assert r.status_code == 201 and SECRET not in r.text, r.text
        # A run's reason never carries it either: the client error says only the status.
        with ServiceTeacher(srv.url, max_retries=0) as t, pytest.raises(Exception) as err:
            t.score([ScoreRequestItem(prompt_ids=[1], completion_ids=[2])])
        assert "400" in str(err.value) and SECRET not in str(err.value)


def test_policy_resolution_and_cidrs():
    p = Policy(allow_hosts=["10.1.0.0/16", "teacher"], resolver=lambda h: {"teacher": ["172.18.0.5"],
                                                                           "evil": ["169.254.169.254"],
                                                                           "pub": ["93.184.216.34"]}[h])
    assert p.check_teacher_url("http://teacher:8100/", "u") == "http://teacher:8100"
    assert p.check_teacher_url("http://10.1.2.3:8000", "u") == "http://10.1.2.3:8000"
    assert p.check_teacher_url("https://pub/v1", "u") == "https://pub/v1"
    with pytest.raises(PolicyError, match="does not resolve"):  # found by the fuzz: IDNA refuses an empty label
        Policy().check_teacher_url("http://.base_layer.", "u")  # the real resolver
    for bad in ("http://evil", "http://127.0.0.1:1", "http://[::1]:1", "ftp://pub", "http://pub?x=1"):
        with pytest.raises(PolicyError):
            p.check_teacher_url(bad, "u")


def test_rest_paths_are_confined_to_the_roots(control, tmp_path):
    outside = tmp_path / "private_model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (control.models / "link").symlink_to(outside)  # a symlink out of the root does not count as inside
    for student in (str(outside), "link", "../private_model"):
        r = control.post("/v1/runs", json={"config": {"model": {"student": student}}})
        assert r.status_code == 422 and _paths(r) == {"model.student"} and str(control.models) in r.text
    r = control.post("/v1/runs", json={"config": {"data": {"task": "jsonl", "prompts_path": "/etc/passwd"}}})
    assert r.status_code == 422 and _paths(r) == {"data.prompts_path"}
    ok = control.post("/v1/runs", json={"config": {"model": {"student": "student"}}})
    assert ok.status_code == 201
    cfg_student = control.app.state.control.store.get_run(ok.json()["id"]).config.model.student
    assert cfg_student == str((control.models / "student").resolve())  # relative: under the first root


def test_control_api_bounds_request_bodies(control):
    big = {"config": {"name": "x" * (70 << 10)}}
    assert control.post("/v1/runs", json=big).status_code == 413

    def chunks():
        for _ in range(80):
            yield b"x" * 1024

    r = control.post("/v1/runs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_student_download_with_a_non_latin1_run_name(control):
    rid = control.post("/v1/runs", json={"config": {"model": {"student": "student"}}, "name": "東京-run"}).json()["id"]
    out = Path(control.app.state.control.store.get_run(rid).output_dir)
    (out / "student").mkdir(parents=True)
    (out / "student" / "config.json").write_text("{}")
    r = control.get(f"/v1/runs/{rid}/artifacts/student.tar.gz")
    assert r.status_code == 200 and r.content[:2] == b"\x1f\x8b"
    assert "filename*=UTF-8''%E6%9D%B1%E4%BA%AC-run-student.tar.gz" in r.headers["content-disposition"]


def test_a_crafted_pickle_checkpoint_is_refused(tmp_path, tiny_model_dir):
    from onpolicy.learner.checkpoint import MARKER
    from onpolicy.learner.core import TRAINER_STATE, Learner

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cfg = load_config(None, [f"model.student={tiny_model_dir}"])
    learner = Learner(str(tiny_model_dir), cfg)
    ckpt = tmp_path / "ckpt"
    learner.save_checkpoint(ckpt)
    torch.save({"step": 1, "optimizer": Exploit()}, ckpt / TRAINER_STATE)
    # a crafted checkpoint comes with a marker that agrees (COMPLETE.json guards against torn writes, not attacks)
    files = {str(f.relative_to(ckpt)): f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name != MARKER}
    (ckpt / MARKER).write_text(json.dumps({"files": files}))
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        learner.load_checkpoint(ckpt)
    assert not marker.exists()


def test_prompts_file_errors_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    cases = [('["a list"]', "expected a JSON object, got a list"), ('{"prompt": ""}', "non-empty string"),
             ('{"prompt": "x", "split": "dev"}', "unknown split 'dev'"), ("{not json", "not valid JSON"),
             ('{"answer": "1"}', "`prompt` must be")]
    for line, msg in cases:
        f.write_text('{"prompt": "1+1="}\n\n' + line + "\n")
        with pytest.raises(ValueError, match=msg) as err:
            read_prompts_file(f)
        assert f"{f}:3" in str(err.value)


def test_a_prompts_line_without_answer_has_none_and_an_empty_one_is_kept(tmp_path):
    """No `answer`: nothing to check (the split reports no accuracy and its evaluation samples once, not
    greedily as well); `"answer": ""` is an answer (the empty completion)."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1="}\n{"prompt": "2+2=", "answer": "", "split": "heldout"}\n'
                 '{"prompt": "3+3=", "answer": 6, "split": "heldout"}\n{"prompt": "4+4=", "answer": null, "split": "ood"}\n')
    train, heldout, ood = read_prompts_file(f)
    assert [e.answer for e in train + heldout + ood] == [None, "", "6", None]
    f.write_text('{"prompt": "1+1=", "answer": ["2"]}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: `answer` must be text \(got a list\)"):
        read_prompts_file(f)


def test_malformed_prompts_fail_before_any_engine_starts(tmp_path, tiny_model_dir, tiny_teacher_dir):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1="}\n[1, 2]\n')
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "onpolicy.cli", "train", str(ROOT / "configs/toy.yaml"), "data.task=jsonl",
         f"data.prompts_path={f}", f"model.student={tiny_model_dir}", f"teacher.model={tiny_teacher_dir}",
         f"output_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and f"{f}:2: expected a JSON object" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()
    assert time.monotonic() - t0 < 60  # no Ray, no engine


def test_long_prompts_are_refused_or_skipped_with_a_count(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1="}\n{"prompt": "' + "1" * 40 + '="}\n{"prompt": "2+2=", "split": "heldout"}\n')
    tok = build_tokenizer()
    cfg = load_config(None, ["data.task=jsonl", f"data.prompts_path={f}"])
    src = PromptSource(cfg.data, cfg.eval, 0)
    with pytest.raises(ValueError, match="1 training prompt.* longer than 20 tokens.*skip_long_prompts"):
        src.check_lengths(tok, 20, "the student's max length")
    cfg = load_config(None, ["data.task=jsonl", f"data.prompts_path={f}", "data.skip_long_prompts=true"])
    src = PromptSource(cfg.data, cfg.eval, 0)
    src.check_lengths(tok, 20, "the student's max length")
    assert src.skipped_long == 1 and {src.next().prompt for _ in range(4)} == {"1+1="}
    cfg = load_config(None, ["data.max_digits=9"])  # the addition task's longest prompt: 1 + 9 + 1 + 9 + 1
    with pytest.raises(ValueError, match="longer than 12 tokens"):
        PromptSource(cfg.data, cfg.eval, 0).check_lengths(tok, 12, "the teacher's max length")


def test_remote_top_k_ids_outside_the_vocabulary_are_refused():
    script = Script(["topk_out_of_vocab"])
    with ServerThread(make_scripted_teacher_app(script)) as srv, ServiceTeacher(srv.url, max_retries=0) as t:
        t.info()  # the vocabulary size (16) is known from here on
        with pytest.raises(TeacherResponseError, match=r"top-k token id 99999 is outside the vocabulary \[0, 16\)") \
                as err:
            t.score([ScoreRequestItem(prompt_ids=[1], completion_ids=[4, 5])], top_k=2)
    assert srv.url in str(err.value)


def test_control_api_refuses_to_listen_beyond_loopback_without_auth(tmp_path):
    """(The teacher service's own refusal is tested in test_teacher_service.py.)"""
    clean = {k: v for k, v in os.environ.items() if k not in ("ONPOLICY_API_TOKENS", "ONPOLICY_API_TOKENS_FILE")}
    res = subprocess.run([sys.executable, "-m", "services.control", "--host", "0.0.0.0", "--port", str(free_port()),
                          "--data-dir", str(tmp_path)], cwd=ROOT, env=clean, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode != 0 and "--insecure-no-auth" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "ONPOLICY_API_TOKENS" in res.stderr

"""Issue 25, Medium 8 and Low 16: the teacher service bounds top-k (per position and per request) and its
/readyz says whether the engine still scores.

The tiny teacher on the transformers backend; for a dead engine, the service over a remote teacher (our
scripted fake, a real server on loopback) that goes away.
"""

from __future__ import annotations

import argparse

from fastapi.testclient import TestClient

from onpolicy.teacher.clients.service import ServiceTeacher
from services.teacher.__main__ import add_serve_arguments
from services.teacher.app import create_app
from services.teacher.serve import build_teacher_app
from tests.fakes.scripted import Script, make_scripted_teacher_app
from tests.fakes.server import ServerThread


def _body(n: int, completion: int, top_k: int) -> dict:
    return {"sequences": [{"prompt_ids": [1, 5], "completion_ids": [4] * completion}] * n, "top_k": top_k}


def test_top_k_is_bounded_per_position_and_per_request(tiny_teacher_dir):
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(tiny_teacher_dir), "--max-top-k", "4", "--max-topk-entries", "50"])
    app = build_teacher_app(str(tiny_teacher_dir), backend="hf", model_name="t", max_top_k=args.max_top_k,
                            max_topk_entries=args.max_topk_entries)
    with TestClient(app) as c:
        assert c.get("/v1/info").json()["max_top_k"] == 4  # what clients plan with
        r = c.post("/v1/score", json=_body(1, 3, 5))
        assert r.status_code == 422 and "--max-top-k 4" in r.json()["detail"] and "top_k=5" in r.json()["detail"]
        r = c.post("/v1/score", json=_body(5, 12, 4))  # 5 x 12 x 4 = 240 entries
        assert r.status_code == 413, r.text
        assert "240 top-k entries" in r.json()["detail"] and "--max-topk-entries" in r.json()["detail"]
        ok = c.post("/v1/score", json=_body(4, 3, 4))  # 48 entries
        assert ok.status_code == 200 and len(ok.json()["scores"][0]["top_k"][0]) == 4
    with TestClient(build_teacher_app(str(tiny_teacher_dir), backend="hf", model_name="t")) as c:
        assert c.get("/v1/info").json()["max_top_k"] == 16  # the default (256) is above this vocabulary


def test_readyz_says_503_when_the_engine_no_longer_scores():
    with ServerThread(make_scripted_teacher_app(Script())) as srv:
        alive = ServiceTeacher(srv.url, max_retries=0, wait_when_down=False, timeout_s=10)
        dead = ServiceTeacher(srv.url, max_retries=0, wait_when_down=False, timeout_s=10)
        apps = [create_app(t, model_name="relay") for t in (alive, dead)]  # both load while it is up
        with TestClient(apps[0]) as c:
            assert c.get("/readyz").json() == {"ready": True, "model": "relay"}
    with TestClient(apps[1]) as c:  # its engine (the remote model) is gone
        r = c.get("/readyz")
        assert r.status_code == 503 and "failed a one-token probe" in r.json()["reason"], r.text
        assert c.get("/healthz").status_code == 200  # alive, not ready
    alive.close()
    dead.close()

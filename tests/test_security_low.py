"""Issue 25, the Low items (9-13, 15; 14 is in test_security_checkpoints.py, 16 in test_security_teacher.py,
17 in test_security_reconciler.py): torn metrics lines, pagination, streamed and capped downloads, capped
event streams, a CLI run into another run's folder, docs behind the token."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from onpolicy.config import RunConfig
from onpolicy.metrics import MetricsLog, read_metrics
from onpolicy.status import RunStatus
from services.control.app import create_app
from services.control.db import RunRecord
from services.control.launcher import InMemoryLauncher
from services.control.settings import Settings
from tests.fakes.server import ServerThread
from tests.test_control_races import wait_until

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "low-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make(tmp_path, **kw):
    kw = {"scheduler_interval_s": 0, "reconcile_interval_s": 0, "readiness_interval_s": 0, **kw}
    return create_app(Settings(data_dir=str(tmp_path / "control"), launcher=InMemoryLauncher(), api_tokens=[TOKEN],
                               models_roots=[str(tmp_path)], **kw))


# ---- 9: a torn last line ------------------------------------------------------------------------------------
def test_a_torn_last_metrics_line_is_skipped_and_the_log_goes_on(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "step": s, "loss": 1.0, "time": 0.0} for s in (1, 2)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "train", "st')  # crash mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    log = MetricsLog(path, 10, show_progress=False)  # a resume opens it again
    assert log.rewind(1) == 1
    log.train(2, {"loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(path, "train")] == [1, 2]
    assert all(json.loads(line) for line in path.read_text().splitlines())  # no glued or torn line left


def test_the_api_serves_a_run_whose_metrics_end_in_a_torn_line(tmp_path):
    with TestClient(make(tmp_path), headers=AUTH) as api:
        rid = api.post("/v1/runs", json={"config": {}}).json()["id"]
        out = Path(api.app.state.control.store.get_run(rid).output_dir)
        (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + '\n{"kind": "tr')
        r = api.get(f"/v1/runs/{rid}/metrics")
        assert r.status_code == 200 and [x["step"] for x in r.json()["records"]] == [1]
        api.post(f"/v1/runs/{rid}/stop")
        api.app.state.control.reconciler.tick()
        body = api.get(f"/v1/runs/{rid}/events", params={"poll_s": 0.5}).text
        assert body.count("event: metrics") == 1 and '"stopped"' in body


# ---- 10: pagination -----------------------------------------------------------------------------------------
def test_the_run_list_is_paginated_newest_first(tmp_path):
    with TestClient(make(tmp_path), headers=AUTH) as api:
        c = api.app.state.control
        cfg = json.dumps(RunConfig().model_dump(mode="json"))
        with c.store.session() as s:
            s.add_all(RunRecord(id=f"r{i:04d}", name="r", status=RunStatus.FINISHED, step=0, config_json=cfg,
                                output_dir=str(tmp_path), resume=0, created=1000.0 + i, updated=1000.0 + i)
                      for i in range(1006))
        newest = api.post("/v1/runs", json={"config": {}}).json()["id"]
        first = api.get("/v1/runs").json()
        assert first["runs"][0]["id"] == newest and len(first["runs"]) == 100
        seen, page = [], first
        while True:
            seen += [r["id"] for r in page["runs"]]
            if page["next"] is None:
                break
            page = api.get("/v1/runs", params={"before": page["next"], "limit": 1000}).json()
        assert len(seen) == len(set(seen)) == 1007 and seen[-1] == "r0000"
        assert api.get("/v1/runs", params={"limit": 1001}).status_code == 422


# ---- 11: streamed, capped downloads -------------------------------------------------------------------------
def test_student_downloads_are_streamed_and_capped(tmp_path):
    app = make(tmp_path, max_downloads=1)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
        rid = http.post("/v1/runs", json={"config": {}}).json()["id"]
        student = Path(app.state.control.store.get_run(rid).output_dir) / "student"
        student.mkdir(parents=True)
        (student / "config.json").write_text("{}")
        (student / "model.safetensors").write_bytes(os.urandom(48 << 20))  # more than every buffer on the way
        url = f"/v1/runs/{rid}/artifacts/student.tar.gz"
        with http.stream("GET", url) as first:
            chunks = first.iter_bytes()  # held: a dropped iterator closes the stream
            assert first.status_code == 200 and next(chunks)[:2] == b"\x1f\x8b"  # on its way, still being packed
            second = http.get(url)
            assert second.status_code == 429 and second.headers["retry-after"] and "downloads" in second.text
        # the slot is free again once the server has seen the first client go (a moment after it closed)
        whole = wait_until(lambda: (r := http.get(url)).status_code != 429 and r, what="the slot to be released")
        assert whole.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(whole.content), mode="r:gz") as tar:
        sizes = {m.name: m.size for m in tar.getmembers() if m.isfile()}
    assert sizes == {"student/config.json": 2, "student/model.safetensors": 48 << 20}


# ---- 12: event streams --------------------------------------------------------------------------------------
def test_event_streams_are_capped_and_do_not_poll_fast(tmp_path):
    app = make(tmp_path, max_event_streams=1)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
        rid = http.post("/v1/runs", json={"config": {}}).json()["id"]  # running: its stream stays open
        assert http.get(f"/v1/runs/{rid}/events", params={"poll_s": 0.05}).status_code == 422
        with http.stream("GET", f"/v1/runs/{rid}/events") as first:
            lines = first.iter_lines()  # held: a dropped iterator closes the stream
            assert first.status_code == 200 and next(lines).startswith("event: status")
            second = http.get(f"/v1/runs/{rid}/events")
            assert second.status_code == 429 and "event streams" in second.text


# ---- 13: a CLI run into another run's folder ----------------------------------------------------------------
def test_a_cli_run_refuses_a_folder_holding_another_run(tmp_path):
    other = tmp_path / "run"
    (other / "checkpoints" / "step_0000010").mkdir(parents=True)
    (other / "metrics.jsonl").write_text("")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "onpolicy.cli", "train", "configs/toy.yaml", f"output_dir={other}",
                          "model.student=/nonexistent/student"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 2 and "--resume" in res.stderr and "checkpoints" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and (other / "checkpoints" / "step_0000010").is_dir()
    assert time.monotonic() - t0 < 60  # refused before Ray or a model
    from onpolicy.cli import refuse_occupied_output

    (tmp_path / "empty").mkdir()
    refuse_occupied_output(str(tmp_path / "empty"), resume=False)  # an empty or new folder is fine
    refuse_occupied_output(str(tmp_path / "new"), resume=False)
    refuse_occupied_output(str(other), resume=True)  # and --resume is what that folder is for


# ---- 15: docs and readiness details need the token ------------------------------------------------------------
@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
def test_docs_need_the_token(tmp_path, path):
    with TestClient(make(tmp_path)) as anon:
        r = anon.get(path)
        assert r.status_code == 401 and "bearer token" in r.json()["detail"]
        assert anon.get(path, headers=AUTH).status_code == 200
        ready = anon.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"ready": True}  # no reasons, no addresses

"""Control-plane races and reads (issue 13, part 4), with the in-memory launcher and SQLite in a temp dir.

- reads come from the database alone; the reconciler (a background pass) keeps records fresh;
- the loops query runs by status, so 1,500 finished records do not hide an active run or starve a queued one;
- a stop or pause that comes while a run is launching is recorded and handed to the driver once it is up;
- delete is a compare-and-set on the status it read;
- a launch that fails after its driver exists removes the driver.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from onpolicy.config import RunConfig
from onpolicy.status import RunStatus, write_status
from services.control.core import Control
from services.control.db import RunRecord, Store
from services.control.launcher import InMemoryLauncher
from services.control.schemas import RunList, RunView
from services.control.views import with_history
from tests.test_control_api import AUTH, make


def wait_until(fn, timeout: float = 10.0, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := fn():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def record(run_id: str, status: RunStatus, created: float, out: str) -> RunRecord:
    cfg = json.dumps(RunConfig(output_dir=out).model_dump(mode="json"))
    return RunRecord(id=run_id, name=run_id, status=status, reason=None, step=0, config_json=cfg, output_dir=out,
                     teacher_id=None, resume=0, created=created, updated=created)


def test_reads_come_from_the_record_and_the_reconciler_refreshes_it(tmp_path):
    app, launcher = make(tmp_path)
    with TestClient(app, headers=AUTH) as api:
        c = app.state.control
        rid = api.post("/v1/runs", json={"config": {"schedule": {"steps": 9}}, "name": "r"}).json()["id"]
        out = c.store.get_run(rid).output_dir
        write_status(out, "running", step=4)
        (tmp_path / "runs" / rid / "metrics.jsonl").write_text(json.dumps(
            {"kind": "train", "step": 4, "policy_version": 4, "teacher_kl": 0.5}) + "\n")
        assert api.get(f"/v1/runs/{rid}").json()["step"] == 0  # a GET reads no run directory
        c.reconciler.tick()
        view = api.get(f"/v1/runs/{rid}").json()
        assert view["step"] == 4 and view["policy_version"] == 4 and view["latest_metrics"]["teacher_kl"] == 0.5
        # the hand-rendered JSON is the documented schema, and says what the record says
        RunView.model_validate(view)
        assert view["steps"] == 9 and view["teacher"]["kind"] == "local" and view["history"][0]["status"] == "queued"
        listed = RunList.model_validate(api.get("/v1/runs").json())
        assert [r.id for r in listed.runs] == [rid] and listed.runs[0].history is None
        assert listed.runs[0].latest_metrics == view["latest_metrics"]
        # a driver that died without a final status: the record says so after the next pass, with the reason
        launcher.lose(rid)
        assert api.get(f"/v1/runs/{rid}").json()["status"] == "running"
        c.reconciler.tick()
        view = api.get(f"/v1/runs/{rid}").json()
        assert view["status"] == "failed" and view["reason"].startswith("driver lost") and view["ended"]


def test_the_reconciler_thread_keeps_records_fresh(tmp_path):
    app, _ = make(tmp_path, reconcile_interval_s=0.05)
    with TestClient(app, headers=AUTH) as api:
        rid = api.post("/v1/runs", json={"config": {}}).json()["id"]
        write_status(app.state.control.store.get_run(rid).output_dir, "finished", step=2)
        view = wait_until(lambda: (v := api.get(f"/v1/runs/{rid}").json())["status"] == "finished" and v,
                          what="the reconciler thread to see the final status")
        assert view["step"] == 2


def test_a_queued_run_starts_behind_1500_records(tmp_path):
    """1,500 finished runs, then one whose driver finished while the DB still says running, then a queued
    run: the active one is refreshed and the queued one starts (a capped listing saw neither)."""
    app, launcher = make(tmp_path, max_concurrent_runs=1)
    with TestClient(app, headers=AUTH) as api:
        c = app.state.control
        t0 = time.time() - 10_000
        with c.store.session() as s:
            s.add_all(record(f"done{i:04d}", RunStatus.FINISHED, t0 + i, str(tmp_path / "old")) for i in range(1500))
        active = api.post("/v1/runs", json={"config": {}}).json()
        queued = api.post("/v1/runs", json={"config": {}}).json()
        assert active["status"] == "running" and queued["status"] == "queued"
        write_status(active["output_dir"], "finished", step=5)
        launcher.lose(active["id"])  # the driver closed after writing its final status
        c.reconciler.tick()
        c.scheduler.tick()
        assert api.get(f"/v1/runs/{active['id']}").json()["status"] == "finished"
        assert api.get(f"/v1/runs/{queued['id']}").json()["status"] == "running"
        assert launcher.submits[-1] == (queued["id"], False)
        assert len(c.store.runs_in([RunStatus.FINISHED])) == 1501  # no cap on a query by status


@pytest.mark.parametrize("action, final", [("stop", "stopped"), ("pause", "paused")])
def test_a_stop_while_launching_is_recorded_and_honoured(tmp_path, action, final):
    gate = threading.Event()
    app, launcher = make(tmp_path, launcher=InMemoryLauncher(gate=gate))
    with TestClient(app, headers=AUTH) as api:
        c = app.state.control
        created: dict = {}
        launch = threading.Thread(target=lambda: created.update(api.post("/v1/runs", json={"config": {}}).json()))
        launch.start()
        try:
            rec = wait_until(lambda: next(iter(c.store.runs_in([RunStatus.STARTING])), None), what="the launch")
            assert rec.launch_began is not None
            r = api.post(f"/v1/runs/{rec.id}/{action}")
            assert r.status_code == 200 and r.json()["status"] == ("pausing" if action == "pause" else "stopping")
            assert "while launching" in r.json()["reason"]
            c.reconciler.tick()  # no driver yet, but the launch is recent: not "driver lost"
            assert c.store.get_run(rec.id).status == r.json()["status"]
        finally:
            gate.set()
            launch.join(timeout=30)
        assert launcher.submits == [(rec.id, False)] and rec.id not in launcher.live  # launched, then told to stop
        view = api.get(f"/v1/runs/{rec.id}").json()
        assert created["status"] == view["status"] == final
        assert [h["status"] for h in view["history"]][-2:] == [r.json()["status"], final]
        assert c.store.get_run(rec.id).launch_began is None


def test_delete_is_a_compare_and_set(tmp_path, monkeypatch):
    app, launcher = make(tmp_path)
    with TestClient(app, headers=AUTH) as api:
        c = app.state.control
        rid = api.post("/v1/runs", json={"config": {}}).json()["id"]
        assert api.post(f"/v1/runs/{rid}/stop").json()["status"] == "stopped"
        assert not c.store.delete_run(rid, expect=RunStatus.FINISHED)  # the status differs: nothing deleted
        assert c.store.get_run(rid) is not None and c.store.history(rid)
        stale = iter([c.store.get_run(rid)])  # what a DELETE read, just before a resume committed
        assert api.post(f"/v1/runs/{rid}/resume").json()["status"] == "running"
        (tmp_path / "runs" / rid / "keep").write_text("x")
        monkeypatch.setattr(c, "get", lambda run_id: next(stale, None) or Control.get(c, run_id))
        r = api.delete(f"/v1/runs/{rid}")
        assert r.status_code == 409 and "now running" in r.json()["detail"], r.json()
        assert api.get(f"/v1/runs/{rid}").json()["status"] == "running" and rid in launcher.live
        assert (tmp_path / "runs" / rid / "keep").exists()  # the resumed run's files were left alone
        api.post(f"/v1/runs/{rid}/stop")
        assert api.delete(f"/v1/runs/{rid}").status_code == 204
        assert c.store.get_run(rid) is None and c.store.history(rid) == []
        assert not (tmp_path / "runs" / rid).exists()


def test_a_launch_that_fails_after_the_driver_exists_removes_it(tmp_path):
    launcher = InMemoryLauncher(fail_with="driver did not answer within 60 s", fail_after_create=True)
    app, _ = make(tmp_path, launcher=launcher)
    with TestClient(app, headers=AUTH) as api:
        r = api.post("/v1/runs", json={"config": {}}).json()
        assert launcher.submits == [(r["id"], False)]  # the driver was created ...
        assert launcher.live == {}  # ... and removed
        assert r["status"] == "failed" and "did not answer" in r["reason"]
        assert app.state.control.store.get_run(r["id"]).launch_began is None


def test_an_older_database_gains_the_new_columns(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url)
    store.add_run(record("r1", RunStatus.STOPPED, 1.0, str(tmp_path / "r")))
    with store.engine.begin() as conn:  # the table as the previous version made it
        for col in ("launch_began", "view_json"):
            conn.execute(text(f"ALTER TABLE runs DROP COLUMN {col}"))
    store.engine.dispose()
    store = Store(url)
    rec = store.get_run("r1")
    assert rec.launch_began is None
    view = RunView.model_validate_json(with_history(*store.view("r1")))
    assert view.status == "stopped" and view.steps == RunConfig().schedule.steps and len(view.history) == 1

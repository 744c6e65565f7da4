"""Issue 25, Medium 7 and Low 17; issue 24, items 3 (faults in the run history) and 4 (freshness after a restart).

The reconciler clears launches a dead API left, delivers the stops recorded meanwhile, asks a driver what it
says of itself, times launches on the monotonic clock and keeps the queue in the order runs came; fault
records join the history and the event stream; readiness waits for its first pass; every record says when
it was last observed. In-memory launcher, SQLite in a temp dir.
"""

from __future__ import annotations

import json
import threading
import time

from fastapi.testclient import TestClient

from onpolicy.config import RunConfig
from onpolicy.metrics import MetricsLog
from onpolicy.status import RunStatus, write_status
from services.control.app import create_app
from services.control.db import RunRecord
from services.control.launcher import InMemoryLauncher
from services.control.settings import Settings
from tests.test_control_races import wait_until

TOKEN = "rec-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make(tmp_path, launcher: InMemoryLauncher | None = None, **kw):
    kw = {"scheduler_interval_s": 0, "reconcile_interval_s": 0, "readiness_interval_s": 0, **kw}
    s = Settings(data_dir=str(tmp_path / "control"), launcher=launcher or InMemoryLauncher(), api_tokens=[TOKEN],
                 models_roots=[str(tmp_path)], **kw)
    return create_app(s)


def test_a_launch_a_dead_api_left_is_cleared_and_the_stop_recorded_meanwhile_is_delivered(tmp_path):
    launcher = InMemoryLauncher()
    with TestClient(make(tmp_path, launcher, launch_grace_s=0), headers=AUTH) as api:
        c = api.app.state.control
        rid = api.post("/v1/runs", json={"config": {}}).json()["id"]
        c.store.update_run(rid, launch_began=time.time())  # the API died between the claim and the launch's end
        r = api.post(f"/v1/runs/{rid}/stop").json()
        assert r["status"] == "stopping" and "while launching" in r["reason"]  # no launch will hand it over ...
        c.reconciler.tick()  # ... so past the grace (0 here), with the driver up, the reconciler does
        assert rid not in launcher.live and c.store.get_run(rid).launch_began is None
        c.reconciler.tick()
        assert api.get(f"/v1/runs/{rid}").json()["status"] == "stopped"


def test_a_stuck_starting_record_fails_and_frees_its_slot_whatever_the_wall_clock_says(tmp_path):
    """A claim whose launch never happened (the API died), stamped by a wall clock that has since stepped back an
    hour: the grace runs on this process's monotonic clock, so the record fails, can be deleted, and its slot
    goes to the next run."""
    with TestClient(make(tmp_path, launch_grace_s=0, max_concurrent_runs=1), headers=AUTH) as api:
        c = api.app.state.control
        out = str(tmp_path / "control" / "runs" / "stuck")
        now = time.time()
        c.store.add_run(RunRecord(id="stuck", name="stuck", status=RunStatus.STARTING, reason="launching",
                                  step=0, config_json=json.dumps(RunConfig(output_dir=out).model_dump(mode="json")),
                                  output_dir=out, resume=0, created=now, updated=now, launch_began=now + 3600))
        waiting = api.post("/v1/runs", json={"config": {}}).json()
        assert waiting["status"] == "queued"
        c.reconciler.tick()
        view = api.get("/v1/runs/stuck").json()
        assert view["status"] == "failed" and view["reason"].startswith("driver lost")
        assert c.store.get_run("stuck").launch_began is None
        c.scheduler.tick()
        assert api.get(f"/v1/runs/{waiting['id']}").json()["status"] == "running"
        assert api.delete("/v1/runs/stuck").status_code == 204


def test_a_driver_that_failed_without_recording_it_fails_the_record(tmp_path):
    launcher = InMemoryLauncher()
    with TestClient(make(tmp_path, launcher), headers=AUTH) as api:
        rid = api.post("/v1/runs", json={"config": {}}).json()["id"]
        launcher.fail_unrecorded(rid, "ValueError: row 3: field 'messages' must be a list (got 'tok-5ecret')")
        api.app.state.control.reconciler.tick()
        view = api.get(f"/v1/runs/{rid}").json()
        assert view["status"] == "failed" and view["reason"].startswith("ValueError: row 3") and view["ended"]
        assert "tok-5ecret" not in json.dumps(view)


def test_the_queue_keeps_the_order_runs_came_in_not_the_wall_clocks(tmp_path):
    with TestClient(make(tmp_path, max_concurrent_runs=1), headers=AUTH) as api:
        c = api.app.state.control
        first = api.post("/v1/runs", json={"config": {}}).json()
        older, newer = (api.post("/v1/runs", json={"config": {}}).json()["id"] for _ in range(2))
        with c.store.session() as s:  # the clock stepped back an hour between the two
            s.get(RunRecord, newer).created -= 3600
        api.post(f"/v1/runs/{first['id']}/stop")
        c.scheduler.tick()
        assert api.get(f"/v1/runs/{older}").json()["status"] == "running"
        assert api.get(f"/v1/runs/{newer}").json()["status"] == "queued"


def test_fault_events_join_the_run_history_and_the_event_stream(tmp_path):
    """Issue 24, item 3: what the driver logs when an actor dies and comes back (`MetricsLog.fault`) shows in
    GET /v1/runs/{id} (history, kind `fault`) and as `event: fault` on the stream; once each, also after a
    rewind to a checkpoint."""
    with TestClient(make(tmp_path), headers=AUTH) as api:
        c = api.app.state.control
        rid = api.post("/v1/runs", json={"config": {}}).json()["id"]
        out = c.store.get_run(rid).output_dir
        log = MetricsLog(f"{out}/metrics.jsonl", 10, show_progress=False)
        for step in (1, 2, 3):
            log.train(step, {"loss": 1.0 / step})
        log.fault(3, {"actor": "learner", "action": "restarted from step_0000002", "recover_seconds": 12.5})
        c.reconciler.tick()
        log.rewind(2)
        log.train(3, {"loss": 0.3})
        c.reconciler.tick()
        c.reconciler.tick()
        history = api.get(f"/v1/runs/{rid}").json()["history"]
        faults = [h for h in history if h["kind"] == "fault"]
        assert len(faults) == 1 and faults[0]["step"] == 3 and "actor=learner" in faults[0]["reason"]
        assert {h["kind"] for h in history} == {"status", "fault"} and faults[0]["status"] == "running"
        log.close()
        write_status(out, "finished", step=3)
        c.reconciler.tick()
        body = api.get(f"/v1/runs/{rid}/events", params={"poll_s": 0.5}).text
        assert body.count("event: fault") == 1 and '"actor": "learner"' in body and "event: metrics" in body


def test_readiness_waits_for_the_first_pass_and_records_say_when_they_were_observed(tmp_path):
    """Issue 24, item 4: an API restarted while a run trained. Until the reconciler's first pass the record holds
    the step it had (7, the run is at 30): /readyz says 503 and why, `observed` is null; after it, ready, the
    step is 30 and `observed` says when."""
    launcher = InMemoryLauncher()
    with TestClient(make(tmp_path, launcher), headers=AUTH) as api:
        rid = api.post("/v1/runs", json={"config": {}}).json()["id"]
        out = api.app.state.control.store.get_run(rid).output_dir
        write_status(out, "running", step=7)
        api.app.state.control.reconciler.tick()
        assert api.get(f"/v1/runs/{rid}").json()["step"] == 7
    write_status(out, "running", step=30)  # the run trains on while no API is up
    launcher.list_gate = threading.Event()  # the cluster is slow to answer the new API's first pass
    app = make(tmp_path, launcher, reconcile_interval_s=0.05)
    with TestClient(app, headers=AUTH) as api:
        try:
            r = api.get("/readyz")
            assert r.status_code == 503 and "first pass" in r.json()["reasons"][0]
            assert TestClient(app).get("/readyz").json() == {"ready": False}
            stale = api.get(f"/v1/runs/{rid}").json()
            before = time.time()
            assert stale["step"] == 7 and stale["observed"] is not None and stale["observed"] < before
        finally:
            launcher.list_gate.set()
        wait_until(lambda: api.get("/readyz").status_code == 200, what="the first pass")
        view = api.get(f"/v1/runs/{rid}").json()
        assert view["step"] == 30 and view["observed"] >= before
        assert api.get("/v1/runs").json()["runs"][0]["observed"] >= before

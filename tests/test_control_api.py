"""The control API's HTTP layer without Ray: an in-memory launcher, SQLite in a temp dir.

Also the pure pieces: status reconciliation, admission, token checks, runner helpers, the client.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from onpolicy.config import RunConfig, config_from_dict
from onpolicy.run_actor import RunActor, actor_name, final_status, required_cpus, run_id_of
from onpolicy.status import write_status
from services.control.app import create_app
from services.control.auth import token_ok
from services.control.launcher import InMemoryLauncher
from services.control.reconciler import reconcile_status
from services.control.settings import Settings, load_tokens

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make(tmp_path, **kw):
    launcher = kw.pop("launcher", None) or InMemoryLauncher()
    # Teachers on loopback (the scripted fakes) are allowed; model folders anywhere under /tmp (the fixtures').
    # No background loops: a test runs `reconciler.tick()` / `scheduler.tick()` where it needs a pass.
    kw = {"scheduler_interval_s": 0, "reconcile_interval_s": 0, "readiness_interval_s": 0, **kw}
    settings = Settings(data_dir=str(tmp_path), launcher=launcher, api_tokens=kw.pop("tokens", [TOKEN]),
                        teacher_allow_hosts=["127.0.0.1"], models_roots=[tempfile.gettempdir()], **kw)
    app = create_app(settings)
    return app, launcher


@pytest.fixture
def api(tmp_path):
    app, launcher = make(tmp_path, max_concurrent_runs=1)
    with TestClient(app, headers=AUTH) as client:
        client.launcher = launcher
        client.control = app.state.control
        yield client


def test_healthz_needs_no_token_and_everything_else_does(api):
    assert TestClient(api.app).get("/healthz").json() == {"ok": True}
    for path in ("/v1/runs", "/v1/teachers", "/metrics", "/v1/runs/x"):
        r = TestClient(api.app).get(path)
        assert r.status_code == 401 and "bearer token" in r.json()["detail"]
        bad = TestClient(api.app).get(path, headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and "wrong" not in bad.text
    assert api.get("/v1/runs").status_code == 200


def test_readyz_reports_the_cluster_and_the_database(api):
    """Liveness stays 200 whatever happens; readiness follows the launcher (Ray) and the database without a
    token, and names the reason to a caller with one (the real Ray case: tests/test_control_ray.py)."""
    anon = TestClient(api.app)
    assert anon.get("/readyz").json() == {"ready": True}
    assert api.get("/readyz").json() == {"ready": True, "reasons": []}
    api.launcher.unready = "the cluster at 10.0.0.1:6379 does not answer (ConnectionError)"
    r = anon.get("/readyz")
    assert r.status_code == 503 and r.json() == {"ready": False}  # the address is not for anonymous probes
    assert api.get("/readyz").json()["reasons"] == [f"ray: {api.launcher.unready}"]
    assert anon.get("/healthz").status_code == 200
    db = Path(api.control.store.engine.url.database)  # the database file goes away: a directory stands there
    api.control.store.engine.dispose()
    db.rename(db.with_suffix(".moved"))
    db.mkdir()
    api.launcher.unready = None
    r = api.get("/readyz")
    assert r.status_code == 503 and r.json()["reasons"][0].startswith("database: ")


def test_invalid_config_lists_each_bad_field(api):
    r = api.post("/v1/runs", json={"config": {"rollout": {"max_new_tokens": 0}, "optim": {"lrr": 1},
                                              "teacher": {"kind": "vllm"}}})
    assert r.status_code == 422
    paths = {e["path"] for e in r.json()["detail"]}
    assert {"rollout.max_new_tokens", "optim.lrr", "teacher"} <= paths, paths
    assert api.get("/v1/runs").json()["runs"] == []  # nothing recorded, nothing started
    assert api.launcher.submits == []
    r = api.post("/v1/runs", json={"config": {}, "bogus": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["path"] == "bogus"


def test_unknown_ids_are_404(api):
    for method, path in (("GET", "/v1/runs/nope"), ("POST", "/v1/runs/nope/stop"), ("POST", "/v1/runs/nope/resume"),
                         ("DELETE", "/v1/runs/nope"), ("GET", "/v1/runs/nope/metrics"),
                         ("GET", "/v1/runs/nope/events"), ("GET", "/v1/runs/nope/artifacts"),
                         ("GET", "/v1/teachers/nope"), ("DELETE", "/v1/teachers/nope")):
        r = api.request(method, path)
        assert r.status_code == 404 and "nope" in r.json()["detail"], (method, path)


def test_run_lifecycle_stop_twice_delete_running_resume(api, tmp_path):
    r = api.post("/v1/runs", json={"config": {"output_dir": "/etc/evil", "schedule": {"steps": 50}}, "name": "a"})
    assert r.status_code == 201
    run = r.json()
    rid = run["id"]
    assert run["output_dir"] == str((tmp_path / "runs" / rid).resolve())  # the client's output_dir is ignored
    assert api.get(f"/v1/runs/{rid}").json()["status"] == "running"
    d = api.delete(f"/v1/runs/{rid}")
    assert d.status_code == 409 and "running" in d.json()["detail"] and "stop" in d.json()["detail"]
    first, second = api.post(f"/v1/runs/{rid}/stop"), api.post(f"/v1/runs/{rid}/stop")
    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == second.json()["status"] == "stopped"
    assert api.get("/v1/runs", params={"status": "stopped"}).json()["runs"][0]["id"] == rid
    r = api.post(f"/v1/runs/{rid}/resume", json={"steps": 7})
    assert r.status_code == 200 and r.json()["steps"] == 7
    assert api.launcher.submits == [(rid, False), (rid, True)]
    assert api.post(f"/v1/runs/{rid}/resume").status_code == 409  # already running
    assert api.post(f"/v1/runs/{rid}/pause").json()["status"] == "paused"
    history = [h["status"] for h in api.get(f"/v1/runs/{rid}").json()["history"]]
    assert history[0] == "queued" and "stopped" in history and history[-1] == "paused"
    assert api.delete(f"/v1/runs/{rid}").status_code == 204
    assert api.get(f"/v1/runs/{rid}").status_code == 404


def test_queue_starts_runs_when_a_slot_frees(api):
    a = api.post("/v1/runs", json={"config": {}}).json()
    b = api.post("/v1/runs", json={"config": {}}).json()
    assert b["status"] == "queued" and "max_concurrent_runs=1" in b["reason"]
    api.control.scheduler.tick()
    assert api.get(f"/v1/runs/{b['id']}").json()["status"] == "queued"
    api.post(f"/v1/runs/{a['id']}/stop")
    api.control.scheduler.tick()
    assert api.get(f"/v1/runs/{b['id']}").json()["status"] == "running"


def test_queue_waits_for_cpus(tmp_path):
    app, launcher = make(tmp_path, launcher=InMemoryLauncher(cpus=1.0), max_concurrent_runs=5)
    with TestClient(app, headers=AUTH) as api:
        cfg = {"resources": {"worker_num_cpus": 1, "learner_num_cpus": 1}}
        r = api.post("/v1/runs", json={"config": cfg}).json()
        assert r["status"] == "queued" and "needs 2 CPUs" in r["reason"] and "1 free" in r["reason"]
        launcher.cpus = 4.0
        app.state.control.scheduler.tick()
        assert api.get(f"/v1/runs/{r['id']}").json()["status"] == "running"


def test_lost_driver_is_marked_failed_at_startup(tmp_path):
    app, launcher = make(tmp_path)
    with TestClient(app, headers=AUTH) as api:
        rid = api.post("/v1/runs", json={"config": {}}).json()["id"]
        lost = api.post("/v1/runs", json={"config": {}}).json()["id"]
        launcher.lose(rid)  # driver gone, status.json still says running
    app2, _ = make(tmp_path, launcher=launcher)  # a new API process on the same DB
    with TestClient(app2, headers=AUTH) as api:
        view = api.get(f"/v1/runs/{rid}").json()
        assert view["status"] == "failed" and "driver lost" in view["reason"]
        assert api.get(f"/v1/runs/{lost}").json()["status"] == "running"


def test_failed_launch_shows_the_reason(tmp_path):
    app, _ = make(tmp_path, launcher=InMemoryLauncher(fail_with="cannot connect to the Ray cluster"))
    with TestClient(app, headers=AUTH) as api:
        r = api.post("/v1/runs", json={"config": {}}).json()
        assert r["status"] == "failed" and "Ray cluster" in r["reason"]


def test_metrics_artifacts_events_and_student_download(api):
    rid = api.post("/v1/runs", json={"config": {}}).json()["id"]
    out = api.control.store.get_run(rid).output_dir
    from pathlib import Path

    lines = [{"kind": "eval", "step": 0, "heldout_accuracy": 0.1}] + [
        {"kind": "train", "step": s, "teacher_kl": 1.0 / s, "policy_version": s} for s in (1, 2, 3)]
    Path(out, "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    api.control.reconciler.tick()  # reads come from the record; the reconciler's pass fills it in
    (Path(out) / "student").mkdir()
    (Path(out) / "student" / "config.json").write_text("{}")
    (Path(out) / "checkpoints" / "step_0000003").mkdir(parents=True)
    recs = api.get(f"/v1/runs/{rid}/metrics", params={"since_step": 1}).json()["records"]
    assert [r["step"] for r in recs] == [2, 3]
    view = api.get(f"/v1/runs/{rid}").json()
    assert view["step"] == 3 and view["policy_version"] == 3 and view["latest_metrics"]["teacher_kl"] == 1 / 3
    names = {a["name"] for a in api.get(f"/v1/runs/{rid}/artifacts").json()["artifacts"]}
    assert {"checkpoints/step_0000003", "student.tar.gz", "metrics.jsonl"} <= names
    tar = api.get(f"/v1/runs/{rid}/artifacts/student.tar.gz")
    assert tar.status_code == 200 and tar.content[:2] == b"\x1f\x8b"
    write_status(out, "finished", step=3)
    api.control.reconciler.tick()
    body = api.get(f"/v1/runs/{rid}/events", params={"poll_s": 0.5}).text  # ends: the run is terminal
    assert body.count("event: metrics") == 4 and "event: status" in body and '"finished"' in body
    assert 'onpolicy_runs{status="finished"} 1.0' in api.get("/metrics").text


def test_teachers_attach_check_and_use_in_a_run(api, tiny_model_dir):
    from tests.fakes.scripted import Script, make_scripted_teacher_app
    from tests.fakes.server import ServerThread

    with ServerThread(make_scripted_teacher_app(Script())) as srv:
        r = api.post("/v1/teachers", json={"url": srv.url, "kind": "service"})
        assert r.status_code == 201 and r.json()["ok"], r.json()
        checked = api.post("/v1/teachers", json={"url": srv.url, "kind": "service", "student": str(tiny_model_dir)})
        assert checked.status_code == 201
        assert {c["name"] for c in checked.json()["checks"]} >= {"reachable", "tokenizer"}
    tid = r.json()["id"]
    down = api.post("/v1/teachers", json={"url": "http://127.0.0.1:9", "kind": "vllm"}).json()
    assert not down["ok"] and "cannot reach" in down["report"]
    assert len(api.get("/v1/teachers").json()["teachers"]) == 3
    run = api.post("/v1/runs", json={"config": {}, "teacher_id": tid}).json()
    assert run["teacher"] == {"kind": "service", "url": srv.url, "teacher_id": tid}
    bad = api.post("/v1/runs", json={"config": {}, "teacher_id": "nope"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["path"] == "teacher_id"
    assert api.delete(f"/v1/teachers/{tid}").status_code == 204
    assert api.get(f"/v1/teachers/{tid}").status_code == 404


def test_client_cli_against_a_live_server(tmp_path, capsys):
    from onpolicy.client import ControlClient, add_client_commands
    from tests.fakes.server import ServerThread

    app, _ = make(tmp_path)
    with ServerThread(app) as srv:
        import argparse

        p = argparse.ArgumentParser()
        add_client_commands(p.add_subparsers(dest="command"))
        cfg = tmp_path / "c.yaml"
        cfg.write_text("schedule:\n  steps: 9\n")
        base = ["--server", srv.url, "--token", TOKEN]

        def run(*argv):
            args = p.parse_args(list(argv))
            return args.func(args)

        assert run("runs", "start", str(cfg), "rollout.max_new_tokens=4", *base) == 0
        rid = capsys.readouterr().out.split()[0]
        assert run("runs", "list", *base) == 0 and rid in capsys.readouterr().out
        assert run("runs", "stop", rid, *base) == 0 and "stopped" in capsys.readouterr().out
        assert run("runs", "logs", rid, "-f", *base) == 0 and "[status] stopped" in capsys.readouterr().out
        assert run("runs", "show", "nope", *base) == 2 and "404" in capsys.readouterr().err
        assert run("runs", "list", "--server", srv.url, "--token", "bad") == 2
        assert "401" in capsys.readouterr().err
        with ControlClient(srv.url, TOKEN) as c:
            assert c.get_run(rid)["steps"] == 9


def test_pure_helpers():
    assert run_id_of(actor_name("abc")) == "abc" and run_id_of("other") is None
    assert required_cpus(config_from_dict({"rollout": {"num_workers": 3},
                                           "resources": {"worker_num_cpus": 1.5, "learner_num_cpus": 2}})) == 6.5
    assert required_cpus(RunConfig()) == 0.0
    assert final_status(True, True) == "paused" and final_status(True, False) == "stopped"
    assert final_status(False, True) == "finished"
    # reconciliation: a terminal file wins; no driver and no final status -> failed "driver lost"
    assert reconcile_status("running", {"status": "stopped", "reason": None}, False) == ("stopped", None)
    assert reconcile_status("running", {"status": "running"}, False)[1].startswith("driver lost")
    assert reconcile_status("starting", {"status": "starting"}, False, launching_for_s=5) is None
    assert reconcile_status("starting", {"status": "starting"}, False, launching_for_s=500)[0] == "failed"
    assert reconcile_status("stopping", {"status": "running"}, True) is None
    assert reconcile_status("pausing", {"status": "stopped"}, True) is None  # `paused` is written next
    assert reconcile_status("pausing", {"status": "paused"}, True) == ("paused", None)
    assert reconcile_status("starting", {"status": "running"}, True) == ("running", None)
    assert reconcile_status("running", {"status": "running"}, None) is None
    assert reconcile_status("stopped", None, False) is None
    assert token_ok("Bearer a", ["b", "a"]) and not token_ok("Bearer c", ["a"]) and not token_ok(None, ["a"])
    assert not token_ok("Basic a", ["a"])
    # what crosses `.remote()` to the run actor: the resolved config
    assert pickle.loads(pickle.dumps(RunConfig())) == RunConfig()


def test_tokens_from_env_and_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\nfile-token\n\n")
    assert load_tokens({"ONPOLICY_API_TOKENS": "a, b,", "ONPOLICY_API_TOKENS_FILE": str(f)}) == ["a", "b",
                                                                                               "file-token"]
    assert load_tokens({}) == []


def test_runner_driver_records_stop_and_pause_flags():
    d = RunActor(RunConfig(output_dir="/tmp/x"))
    assert d.state()["phase"] == "created" and not d.state()["stop_requested"]
    assert d.pause()["pause_requested"] and d.state()["stop_requested"]


def test_client_commands_import_nothing_heavy():
    import subprocess
    import sys

    code = ("import argparse, sys; from onpolicy.client import add_client_commands; "
            "p = argparse.ArgumentParser(); add_client_commands(p.add_subparsers()); "
            "print([m for m in ('torch', 'vllm', 'ray', 'transformers', 'httpx', 'sqlalchemy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"

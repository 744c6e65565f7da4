"""Issue 25, Medium 5: what one REST run may ask for, the CPUs it reserves, and admission that holds under
concurrent requests (the in-memory launcher; SQLite in a temp dir; real HTTP where the race needs it)."""

from __future__ import annotations

import threading

import httpx
from fastapi.testclient import TestClient

from onpolicy.status import RunStatus
from services.control.app import create_app
from services.control.launcher import InMemoryLauncher
from services.control.settings import Settings
from tests.fakes.server import ServerThread

TOKEN = "admission-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings(tmp_path, **kw) -> Settings:
    kw = {"launcher": InMemoryLauncher(), "scheduler_interval_s": 0, "reconcile_interval_s": 0,
          "readiness_interval_s": 0, "api_tokens": [TOKEN], "models_roots": [str(tmp_path)], **kw}
    return Settings(data_dir=str(tmp_path / "control"), **kw)


def test_runs_over_the_servers_limits_are_refused(tmp_path):
    big = {
        "rollout.num_workers": ({"rollout": {"num_workers": 256}}, "ONPOLICY_MAX_ROLLOUT_WORKERS"),
        "learner.num_ranks": ({"learner": {"num_ranks": 1024}}, "ONPOLICY_MAX_LEARNER_RANKS"),
        "rollout.prompts_per_step": ({"rollout": {"prompts_per_step": 65536, "max_new_tokens": 32768}},
                                     "ONPOLICY_MAX_STEP_TOKENS"),
        "resources.vllm_kv_cache_gib": ({"resources": {"vllm_kv_cache_gib": 1024}}, "ONPOLICY_MAX_KV_CACHE_GIB"),
        "eval.num_prompts": ({"eval": {"num_prompts": 100_000}, "rollout": {"max_new_tokens": 4096}},
                             "ONPOLICY_MAX_STEP_TOKENS"),
    }
    with TestClient(create_app(settings(tmp_path)), headers=AUTH) as api:
        for path, (config, env) in big.items():
            r = api.post("/v1/runs", json={"config": config})
            assert r.status_code == 422, (path, r.text)
            assert [e["path"] for e in r.json()["detail"]] == [path] and env in r.text
        assert api.get("/v1/runs").json()["runs"] == []
    from services.control.settings import caps_from_env

    caps = caps_from_env({"ONPOLICY_MAX_ROLLOUT_WORKERS": "300", "ONPOLICY_MIN_ACTOR_CPUS": "2"})
    with TestClient(create_app(settings(tmp_path / "b", caps=caps)), headers=AUTH) as api:
        assert api.post("/v1/runs", json={"config": big["rollout.num_workers"][0]}).status_code == 201


def test_each_actor_reserves_at_least_the_servers_minimum(tmp_path):
    """A client cannot talk admission down to zero CPUs: 0 per actor becomes the server's minimum (0.5), so a
    run with 2 workers and 2 learner ranks needs 2 CPUs and waits on a cluster with 1.5 free."""
    launcher = InMemoryLauncher(cpus=1.5)
    with TestClient(create_app(settings(tmp_path, launcher=launcher)), headers=AUTH) as api:
        cfg = {"rollout": {"num_workers": 2}, "learner": {"num_ranks": 2},
               "resources": {"worker_num_cpus": 0, "learner_num_cpus": 0}}
        r = api.post("/v1/runs", json={"config": cfg}).json()
        assert r["status"] == "queued" and "needs 2 CPUs" in r["reason"], r
        res = api.app.state.control.store.get_run(r["id"]).config.resources
        assert res.worker_num_cpus == res.learner_num_cpus == 0.5
        launcher.cpus = 2.0
        api.app.state.control.scheduler.tick()
        assert api.get(f"/v1/runs/{r['id']}").json()["status"] == "running"


def test_a_claim_counts_active_runs_in_its_own_transaction(tmp_path):
    """Two replicas each decided a queued run fits (one slot left): only the first claim wins."""
    with TestClient(create_app(settings(tmp_path, max_concurrent_runs=1)), headers=AUTH) as api:
        store = api.app.state.control.store
        api.app.state.control.scheduler.max_concurrent_runs = 0  # both stay queued while we set the scene
        a, b = (api.post("/v1/runs", json={"config": {}}).json()["id"] for _ in range(2))
        assert store.claim_queued(a, max_active=1) and not store.claim_queued(b, max_active=1)
        assert store.get_run(b).status == RunStatus.QUEUED


def test_concurrent_posts_never_start_more_runs_than_the_limit(tmp_path):
    """12 POSTs at once (real HTTP, threads) against a limit of 1: exactly one run starts (main started 3, 2 and 7
    in three trials); the others are queued with the reason."""
    with ServerThread(create_app(settings(tmp_path, max_concurrent_runs=1))) as srv:
        barrier = threading.Barrier(12)
        results: list[dict] = []

        def post() -> None:
            with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
                barrier.wait()
                results.append(c.post("/v1/runs", json={"config": {}}).json())

        threads = [threading.Thread(target=post) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        runs = httpx.get(f"{srv.url}/v1/runs", headers=AUTH, timeout=60).json()["runs"]
    assert len(results) == len(runs) == 12
    statuses = sorted(r["status"] for r in runs)
    assert statuses == ["queued"] * 11 + ["running"], statuses
    assert all("max_concurrent_runs=1" in r["reason"] for r in runs if r["status"] == "queued")

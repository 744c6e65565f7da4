"""The dashboard (/ui) in a real browser: Debian's headless Chromium (installed by scripts/setup.sh) driven by
Playwright, against the control API on its own Ray head (as tests/test_control_ray.py starts them), with a real
toy run on the tiny models.

One API serves every browser test here: its database is seeded with 50 finished runs before it starts (each
with a held-out evaluation in its metrics.jsonl), so the runs page is drawn at a realistic size; the first
paint of that page is printed (not asserted: speed is not a test). The last test starts a run from the page,
watches its step and KL move, stops it and deletes it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.test_control_ray import AUTH, TOKEN, Api, kill_tree_matching, start_ray_head, toy_config

CHROMIUM = "/usr/bin/chromium"
# Playwright's own browser download cannot work here: it drives the system's Chromium.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SEEDED = 50
SERIES_CAP = 512  # static/js/chart.js


# ---- no browser, no Ray: what is served, and to whom ------------------------------------------------------
def test_static_files_are_public_and_the_dashboard_reads_need_the_token(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from services.control.app import create_app
    from services.control.settings import Settings

    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "mine.yaml").write_text("name: mine\n")
    monkeypatch.setenv("ONPOLICY_UI_CONFIGS", str(tmp_path / "cfgs"))
    settings = Settings.from_env(data_dir=str(tmp_path / "data"), api_tokens=["tok"], reconcile_interval_s=0,
                                 scheduler_interval_s=0, readiness_interval_s=0)
    # Outside a `with`, TestClient runs no lifespan: no reconciler pass, so no Ray client in this process.
    c = TestClient(create_app(settings))
    page = c.get("/ui/")
    assert page.status_code == 200 and 'src="js/app.js"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script can run
    assert "set-cookie" not in page.headers
    assert c.get("/ui/js/api.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/v1/ui/configs").status_code == 401
    assert c.get("/v1/ui/runs/x/config").status_code == 401
    bearer = {"Authorization": "Bearer tok"}
    assert c.get("/v1/ui/configs", headers=bearer).json() == {"configs": [{"name": "mine.yaml",
                                                                            "yaml": "name: mine\n"}]}
    assert c.get("/v1/ui/runs/nope/config", headers=bearer).status_code == 404
    assert c.post("/v1/ui/configs", headers=bearer).status_code == 405  # read-only


# ---- the browser ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def seed_runs(data_dir: Path, n: int) -> list[str]:
    """`n` finished runs in the API's database (written before it starts), each with one held-out evaluation."""
    from services.control.db import RunRecord, Store
    from services.control.settings import Settings

    store = Store(Settings(data_dir=str(data_dir)).db_url)
    now, names = time.time(), []
    for i in range(n):
        run_id = uuid.uuid4().hex[:12]
        out = data_dir / "runs" / run_id
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 10 + i, "time": now,
                                                       "heldout_reverse_kl": 0.5 + i / 100, "heldout_accuracy": 0.5}) + "\n")
        cfg = {"name": f"seeded-{i:02d}", "schedule": {"steps": 10 + i}, "teacher": {"kind": "local"}}
        last = {"kind": "train", "step": 10 + i, "sequences": 32, "step_seconds": 0.5, "teacher_kl": 0.1}
        store.add_run(RunRecord(id=run_id, name=cfg["name"], status="finished", step=10 + i, config_json=json.dumps(cfg),
                                output_dir=str(out), latest_metrics_json=json.dumps(last), created=now - 60 * i,
                                updated=now, ended=now))
        names.append(cfg["name"])
    store.engine.dispose()
    return names


@pytest.fixture(scope="module")
def dash_api(tmp_path_factory):
    address, temp_dir = start_ray_head()
    data_dir = tmp_path_factory.mktemp("dashboard")
    seed_runs(data_dir, SEEDED)
    api = Api(address, data_dir).start()
    try:
        yield api
    finally:
        try:
            for r in api.get("/v1/runs").json()["runs"]:
                if r["status"] not in ("finished", "failed", "stopped", "paused"):
                    api.post(f"/v1/runs/{r['id']}/stop")
        except Exception as err:  # noqa: BLE001 -- best effort clean-up
            print(f"clean-up: could not stop the runs: {err}")
        api.kill()
        kill_tree_matching(temp_dir)


# wait_for_function's predicates are written as functions: a bare expression would be eval'd in the page, which
# its content security policy refuses.
def signed_in_page(browser, api: Api, hash_: str = "#/runs"):
    """A page of a fresh context with the token already in sessionStorage (as after signing in)."""
    page = browser.new_context().new_page()
    page.add_init_script(f"sessionStorage.setItem('onpolicy.token', {json.dumps(TOKEN)})")
    page.goto(f"{api.url}/ui/{hash_}")
    return page


@pytest.mark.slow
def test_a_wrong_token_shows_an_error_and_no_data(browser, dash_api):
    page = browser.new_context().new_page()
    page.goto(f"{dash_api.url}/ui/")
    page.fill("#token", "not-the-token")
    page.click("#login button[type=submit]")
    page.wait_for_selector("#error:not([hidden])")
    assert "refused" in page.text_content("#error")
    page.wait_for_timeout(500)  # nothing arrives later either
    assert page.locator("#runs-table").count() == 0 and "seeded-" not in page.content()
    assert page.evaluate("sessionStorage.getItem('onpolicy.token')") is None  # the refused token is not kept
    page.context.close()


@pytest.mark.slow
def test_runs_page_of_50_runs_paints_sorts_and_fills_the_heldout_figures(browser, dash_api):
    page = signed_in_page(browser, dash_api)
    page.wait_for_function(f"() => document.querySelectorAll('#runs-table tbody tr').length === {SEEDED}")
    page.wait_for_function("() => document.body.dataset.runsPainted === '1'")
    painted_ms = page.evaluate("performance.getEntriesByName('runs-painted')[0].startTime")
    load = Path("/proc/loadavg").read_text().split()[:3]
    # where the time went: the document, the last module, and the API's answer with the runs
    spans = page.evaluate("""() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource');
        const end = (pred) => Math.max(0, ...res.filter(pred).map(r => r.responseEnd));
        return {html: nav.responseEnd, modules: end(r => r.name.includes('/js/')),
                runs_api: end(r => r.name.split('?')[0].endsWith('/v1/runs'))}; }""")
    print(f"dashboard: first paint of the runs page with {SEEDED} runs: {painted_ms:.0f} ms after navigation "
          f"(document {spans['html']:.0f} ms, modules {spans['modules']:.0f} ms, /v1/runs answered "
          f"{spans['runs_api']:.0f} ms; load average {' '.join(load)})")
    names = page.locator("#runs-table tbody tr td:first-child").all_text_contents()
    assert names == [f"seeded-{i:02d}" for i in range(SEEDED)]  # newest first
    page.click("th[data-sort=name]")
    page.click("th[data-sort=name]")  # descending
    assert page.locator("#runs-table tbody tr td:first-child").first.text_content() == f"seeded-{SEEDED - 1:02d}"
    # the held-out figures come from each run's evaluations, fetched after the first paint
    row = page.locator("#runs-table tbody tr", has_text="seeded-07")
    page.wait_for_function("() => [...document.querySelectorAll('#runs-table td[data-col=kl]')].every(td => td.textContent !== '—')")
    assert row.locator("td[data-col=kl]").text_content() == "0.570" and row.locator("td[data-col=em]").text_content() == "50.0%"
    assert row.locator("td[data-col=step]").text_content() == "17 / 17"
    page.context.close()


@pytest.mark.slow
def test_a_run_page_holds_bounded_buffers_however_many_steps_arrive(browser, dash_api):
    """Five and a half hours of a run at 5 steps/s (100,000 train records, an evaluation every 50) fed to a run
    page: each curve keeps fewer than SERIES_CAP points and the newest value is shown."""
    run_id = dash_api.get("/v1/runs", params={"limit": 1}).json()["runs"][0]["id"]
    page = signed_in_page(browser, dash_api, f"#/run/{run_id}")
    page.wait_for_function("() => window.onpolicyRunPage && document.querySelector('#run-status [data-status]')")
    cdp = page.context.new_cdp_session(page)

    def heap_mb() -> float:
        cdp.send("HeapProfiler.collectGarbage")
        return cdp.send("Runtime.getHeapUsage")["usedSize"] / 2**20

    before = heap_mb()
    n, ms = page.evaluate("""(steps) => {
        const p = window.onpolicyRunPage, t0 = performance.now();
        for (let s = 1; s <= steps; s++) {
          p.ingest({kind: 'train', step: s, teacher_kl: 1 / s, rollout_seconds: 0.1, score_seconds: 0.05,
                    learn_seconds: 0.04, push_seconds: 0.01, policy_lag_mean: 0.5, policy_lag_max: 1});
          if (s % 50 === 0) p.ingest({kind: 'eval', step: s, heldout_reverse_kl: 1 / s, heldout_accuracy: 0.9,
                                      retention_accuracy: 0.8});
        }
        return [steps, performance.now() - t0]; }""", 100_000)
    page.wait_for_timeout(300)  # a frame is drawn
    after = heap_mb()
    sizes = [k for chart in page.evaluate("window.onpolicyRunPage.sizes()") for k in chart]
    print(f"dashboard: run page after {n} steps: {max(sizes)} points per curve at most; JS heap "
          f"{before:.1f} -> {after:.1f} MiB; {1000 * ms / n:.1f} us per step taken in (a step comes every 200,000 us "
          "at 5 steps/s)")
    assert 0 < max(sizes) < SERIES_CAP
    assert page.locator("#run-teacher-kl").text_content() == "1.00e-5"  # 1 / 100000, the newest
    assert page.locator("figure[data-chart=Retention]").is_visible()  # shown once a retention figure exists
    page.context.close()


@pytest.mark.slow
def test_start_a_run_from_the_page_watch_it_learn_stop_it_and_delete_it(browser, dash_api, tiny_model_dir,
                                                                        tiny_teacher_dir):
    page = browser.new_context().new_page()
    page.on("dialog", lambda d: d.accept())  # the delete confirmation
    page.goto(f"{dash_api.url}/ui/")
    page.fill("#token", TOKEN)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#runs-table tbody tr")
    page.click("a[href='#/start']")
    cfg = toy_config(tiny_model_dir, tiny_teacher_dir)
    cfg["eval"] = {"every": 2, "num_prompts": 8, "ood_num_prompts": 4}
    page.fill("#config-yaml", yaml.safe_dump(cfg))
    page.fill("#run-name", "from-the-page")
    page.click("#start-run")
    # POST /v1/runs answers once the driver is launched; a refusal shows under the form
    page.wait_for_function("() => location.hash.startsWith('#/run/') || !document.getElementById('start-error').hidden",
                           timeout=300_000)
    assert page.is_hidden("#start-error"), page.text_content("#start-error")
    run_id = page.url.rsplit("/", 1)[-1]
    page.wait_for_function("() => document.getElementById('run-name').textContent === 'from-the-page'")

    seen_steps, seen_kl, seen_heldout = set(), set(), set()  # what the page showed ("—": nothing yet)

    def enough() -> bool:
        return len(seen_steps) >= 3 and len(seen_kl - {"—"}) >= 3 and len(seen_heldout - {"—"}) >= 2

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not enough():
        seen_steps.add(page.text_content("#run-step"))
        seen_kl.add(page.text_content("#run-teacher-kl"))
        seen_heldout.add(page.text_content("#run-heldout-kl"))
        page.wait_for_timeout(250)
    print(f"dashboard: steps seen {sorted(seen_steps)}; teacher KL {sorted(seen_kl)}; held-out {sorted(seen_heldout)}")
    assert enough()
    assert page.get_attribute("#run-status [data-status]", "data-status") == "running"
    assert page.locator("figure[data-chart='Teacher KL'] b[data-last]").count() == 1
    assert "tokens scored" in page.text_content("#teacher-health")
    assert str(tiny_model_dir) in page.text_content("#run-config")  # the config it was started with

    page.click("#run-stop")
    page.wait_for_selector("#run-status [data-status=stopped]", timeout=240_000)
    view = dash_api.get(f"/v1/runs/{run_id}").json()
    assert view["status"] == "stopped"
    assert "stopped" in [h["status"] for h in view["history"]]
    assert page.locator("#run-history tr", has_text="stopped").count() >= 1
    assert page.is_disabled("#run-stop") and page.is_enabled("#run-resume")

    page.click("#run-delete")
    page.wait_for_url("**/ui/#/runs")
    page.wait_for_function(f"() => document.querySelectorAll('#runs-table tbody tr').length === {SEEDED}")
    assert httpx.get(f"{dash_api.url}/v1/runs/{run_id}", headers=AUTH, timeout=30).status_code == 404
    page.context.close()

"""Issue 25, Medium 6: a locked or damaged database never stalls the API or answers 500.

Another connection takes SQLite's exclusive lock (`locking_mode=EXCLUSIVE`, as a stuck writer or a manual
`sqlite3` session would); the API runs as a real server on loopback (uvicorn in a thread).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import httpx
from sqlalchemy import event

from services.control.app import create_app
from services.control.launcher import InMemoryLauncher
from services.control.settings import Settings
from tests.fakes.server import ServerThread

TOKEN = "db-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make(tmp_path, **kw):
    s = Settings(data_dir=str(tmp_path / "control"), launcher=InMemoryLauncher(), scheduler_interval_s=0,
                 reconcile_interval_s=0, readiness_interval_s=0, api_tokens=[TOKEN], models_roots=[str(tmp_path)],
                 **kw)
    return create_app(s)


class ExclusiveLock:
    """Holds the database's exclusive lock from another connection until `release()`."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.conn.execute("BEGIN EXCLUSIVE")
        self.conn.execute("UPDATE runs SET name = name")

    def release(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()


def _db(app) -> Path:
    return Path(app.state.control.store.engine.url.database)


def test_a_locked_database_answers_503_within_the_busy_timeout(tmp_path):
    app = make(tmp_path, db_busy_timeout_s=0.2)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
        rid = http.post("/v1/runs", json={"config": {}}).json()["id"]
        app.state.control.store.engine.dispose()  # its pooled connections would hold a shared lock
        lock = ExclusiveLock(_db(app))
        try:
            for path in (f"/v1/runs/{rid}", "/v1/runs", f"/v1/runs/{rid}/stop"):
                r = http.post(path) if path.endswith("stop") else http.get(path)
                assert r.status_code == 503 and "busy" in r.json()["detail"], (path, r.text)
                assert r.headers["retry-after"] == "1"
            assert http.get("/healthz").json() == {"ok": True}
        finally:
            lock.release()
        assert http.get(f"/v1/runs/{rid}").json()["id"] == rid


def test_healthz_answers_while_a_read_waits_for_the_lock(tmp_path):
    """The reads run off the event loop: while one waits for the lock, liveness (and everything else) answers.
    The read is known to have reached the database because it opened a connection (the pool was emptied; no
    background loop runs here), not by a sleep."""
    app = make(tmp_path, db_busy_timeout_s=30)
    started = threading.Event()

    def trace(_conn, _record) -> None:
        started.set()

    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
        rid = http.post("/v1/runs", json={"config": {}}).json()["id"]
        engine = app.state.control.store.engine
        engine.dispose()
        event.listen(engine, "connect", trace, insert=True)
        lock = ExclusiveLock(_db(app))
        got: dict = {}
        reader = threading.Thread(target=lambda: got.update(r=http.get(f"/v1/runs/{rid}")))
        try:
            reader.start()
            assert started.wait(30), "the read never reached the database"
            assert http.get("/healthz").json() == {"ok": True}
            assert reader.is_alive()  # the read still waits for the lock: /healthz did not queue behind it
        finally:
            lock.release()
            reader.join(60)
        assert got["r"].status_code == 200 and got["r"].json()["id"] == rid


def test_readyz_reads_a_real_table(tmp_path):
    """With the runs table's pages overwritten, `SELECT 1` still passes but every list fails: /readyz says 503,
    and the list answers 503, not 500."""
    app = make(tmp_path)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
        for _ in range(30):
            http.post("/v1/runs", json={"config": {"name": "x" * 100}})
        app.state.control.reconciler.tick()  # (the server runs without its lifespan: this is its first pass)
        assert http.get("/readyz").status_code == 200
        db = _db(app)
        app.state.control.store.engine.dispose()
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
        with db.open("r+b") as f:  # the runs table's root page: garbage
            f.seek((root - 1) * page)
            f.write(b"\xde\xad" * (page // 2))
        app.state.control.store.engine.dispose()
        r = http.get("/readyz")
        assert r.status_code == 503 and r.json()["reasons"][0].startswith("database: "), r.text
        r = http.get("/v1/runs")
        assert r.status_code == 503 and "cannot be read" in r.json()["detail"]
        assert http.get("/healthz").status_code == 200

"""Run records, status history and teachers in SQL (SQLite by default; any SQLAlchemy URL).

The database is the control plane's only state: several API replicas can share it, and the
queue claim (`claim_queued`), status changes (`update_run(expect=...)`) and deletes are conditional
statements, so of two replicas racing only one wins. Each run row also holds its view as the API
shows it (`view_json`, rendered on every write), so the reads clients poll are one small query.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Enum,
    Float,
    ForeignKey,
    Integer,
    Select,
    String,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from onpolicy.config import RunConfig, config_from_dict, drop_inapplicable
from onpolicy.status import ACTIVE, RunStatus
from services.control.schemas import RunView, TeacherRef

# Stored as the plain value ("running"), read back as `RunStatus`; no database-side enum type.
STATUS = Enum(RunStatus, native_enum=False, create_constraint=False, length=16,
              values_callable=lambda e: [m.value for m in e])


class Base(DeclarativeBase):
    pass


class RunRecord(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[RunStatus] = mapped_column(STATUS, index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    policy_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    config_json: Mapped[str] = mapped_column(Text)
    output_dir: Mapped[str] = mapped_column(Text)
    teacher_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    resume: Mapped[int] = mapped_column(Integer, default=0)  # a queued resume starts from the checkpoint
    # Set while a replica is launching the driver (the claim's time); a stop that comes meanwhile is
    # recorded as the status (stopping/pausing) and handed to the driver once the launch returns.
    launch_began: Mapped[float | None] = mapped_column(Float, nullable=True)
    latest_metrics_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The run as GET /v1/runs shows it (`RunView` JSON, without history), rendered by every write here, so
    # the reads clients poll are one column of one query.
    view_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Queue and list order: a counter taken at insert (`_on_insert`), not the wall clock, which can step back.
    seq: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    # When the reconciler last compared the record with the run's files and driver (wall time, for clients);
    # kept out of view_json so a pass that changes nothing writes one small column.
    observed: Mapped[float | None] = mapped_column(Float, nullable=True)

    @property
    def config(self) -> RunConfig:
        # A record stored before the sections were unions holds every kind's fields: drop the unused ones.
        return config_from_dict(drop_inapplicable(json.loads(self.config_json)), source=f"run {self.id}")

    @property
    def latest_metrics(self) -> dict[str, Any] | None:
        return json.loads(self.latest_metrics_json) if self.latest_metrics_json else None


class StatusEvent(Base):
    __tablename__ = "run_status_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    status: Mapped[RunStatus] = mapped_column(STATUS)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    time: Mapped[float] = mapped_column(Float)
    # `status` (a status change) or `fault` (an actor died and was brought back: metrics.jsonl kind=fault)
    kind: Mapped[str | None] = mapped_column(String(16), nullable=True)


class Counter(Base):
    """Named counters: `run_seq` numbers runs in insert order; `admission` is bumped by every claim, so
    claims run one at a time (SQLite's write lock, a row lock elsewhere) and the count of active runs a
    claim reads is not stale."""

    __tablename__ = "control_counters"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class TeacherRecord(Base):
    __tablename__ = "teachers"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))
    api_key_env: Mapped[str | None] = mapped_column(String(128), nullable=True)
    student: Mapped[str | None] = mapped_column(Text, nullable=True)
    ok: Mapped[int] = mapped_column(Integer, default=0)
    report_json: Mapped[str] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)


def render_view(rec: RunRecord) -> str:
    """The record's `RunView` as JSON without `history` and `observed` (kept in `view_json`; the reads add
    them)."""
    cfg = json.loads(rec.config_json)  # the plain JSON: an old config this version would refuse still shows
    teacher = cfg.get("teacher") or {}
    view = RunView(
        id=rec.id, name=rec.name, status=rec.status, reason=rec.reason, step=rec.step or 0,
        steps=(cfg.get("schedule") or {}).get("steps", 0), policy_version=rec.policy_version,
        latest_metrics=rec.latest_metrics,
        teacher=TeacherRef(kind=teacher.get("kind", ""), url=teacher.get("url"), teacher_id=rec.teacher_id),
        output_dir=rec.output_dir, created=rec.created, updated=rec.updated, started=rec.started, ended=rec.ended,
    )
    return view.model_dump_json(exclude={"history", "observed"})


def _bump(conn: Any, name: str) -> int:
    """Increment counter `name` and return its new value (in the caller's transaction, which now holds it)."""
    table = Counter.__table__
    conn.execute(update(table).where(table.c.name == name).values(value=table.c.value + 1))
    return int(conn.execute(select(table.c.value).where(table.c.name == name)).scalar_one())


@event.listens_for(RunRecord, "before_insert")
def _on_insert(_mapper: Any, conn: Any, rec: RunRecord) -> None:
    rec.view_json = render_view(rec)  # updates (`Store.update_run`) render it themselves
    if rec.seq is None:
        rec.seq = _bump(conn, "run_seq")


class HotRead:
    """A read clients poll, compiled once for the engine's dialect and run on a pooled DB-API cursor, past
    SQLAlchemy's execution and result machinery (on SQLite a one-row read takes 0.02 ms, not 0.1 ms)."""

    def __init__(self, engine: Engine, stmt: Select):
        self.engine = engine
        self.compiled = stmt.compile(dialect=engine.dialect)
        self.sql = str(self.compiled)

    def rows(self, **params: Any) -> list[tuple[Any, ...]]:
        values = self.compiled.construct_params(params)
        args = tuple(values[k] for k in self.compiled.positiontup or ()) if self.compiled.positional else values
        conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            cur.execute(self.sql, args)
            return list(cur.fetchall())
        finally:
            conn.close()  # back to the pool


_RUNS, _HISTORY = RunRecord.__table__.c, StatusEvent.__table__.c
# Newest first, a page at a time: `before` is the `seq` the previous page ended at (a cursor).
_VIEWS = (select(_RUNS.view_json, _RUNS.observed, _RUNS.seq).where(_RUNS.seq < bindparam("before"))
          .order_by(_RUNS.seq.desc()).limit(bindparam("limit")))
_VIEWS_BY_STATUS = _VIEWS.where(_RUNS.status == bindparam("status"))
_VIEW = select(_RUNS.view_json, _RUNS.observed).where(_RUNS.id == bindparam("run_id"))
_HISTORY_ROWS = (select(_HISTORY.status, _HISTORY.reason, _HISTORY.step, _HISTORY.time, _HISTORY.kind)
                 .where(_HISTORY.run_id == bindparam("run_id")).order_by(_HISTORY.id))
NO_CURSOR = 1 << 62


def new_id() -> str:
    return uuid.uuid4().hex[:12]


class Store:
    """Thin data access over one engine; every method opens and commits its own session."""

    def __init__(self, url: str, busy_timeout_s: float = 2.0):
        """`busy_timeout_s`: how long a statement waits for a lock another connection holds before it raises
        (the API answers 503 then; a long wait would hold a request, and a thread, that long)."""
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split("sqlite:///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_s}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas(busy_timeout_s))
        Base.metadata.create_all(self.engine)
        _upgrade(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._views, self._views_by_status, self._view, self._history = (
            HotRead(self.engine, q) for q in (_VIEWS, _VIEWS_BY_STATUS, _VIEW, _HISTORY_ROWS))

    def ping(self) -> None:
        """Read what the API serves, the first page of `GET /v1/runs` and a run's history (raises if the database
        cannot be reached or those pages cannot be read): `SELECT 1` passes on a file whose table pages are
        corrupt while every list fails."""
        self.views(limit=100)
        with self.engine.connect() as conn:
            conn.execute(select(_HISTORY.status, _HISTORY.reason).order_by(_HISTORY.id.desc()).limit(1)).all()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session.begin() as s:
            yield s

    # ---- runs ------------------------------------------------------------------------------
    def add_run(self, rec: RunRecord) -> RunRecord:
        with self.session() as s:
            s.add(rec)
            s.add(StatusEvent(run_id=rec.id, status=rec.status, reason=rec.reason, step=rec.step, time=rec.created))
        return rec

    def get_run(self, run_id: str) -> RunRecord | None:
        with self.session() as s:
            return s.get(RunRecord, run_id)

    def runs_in(self, statuses: Collection[RunStatus] | None, limit: int | None = None) -> list[RunRecord]:
        """Runs whose status is one of `statuses` (None: any), in the order they were added; no cap unless
        `limit`."""
        q = select(RunRecord).order_by(RunRecord.seq, RunRecord.id)
        if statuses is not None:
            q = q.where(RunRecord.status.in_(list(statuses)))
        with self.session() as s:
            return list(s.scalars(q.limit(limit)))

    def views(self, status: RunStatus | None = None, limit: int = 100, before: int | None = None
              ) -> tuple[list[tuple[str, float | None]], int | None]:
        """A page of stored views (JSON, observed), newest first (GET /v1/runs), and the cursor of the next
        page (None: this is the last). `before`: the cursor a previous page returned."""
        args = {"limit": limit + 1, "before": NO_CURSOR if before is None else before}
        rows = self._views.rows(**args) if status is None else \
            self._views_by_status.rows(status=RunStatus(status).value, **args)
        page = rows[:limit]
        return [(v, observed) for v, observed, _ in page], (page[-1][2] if len(rows) > limit else None)

    def view(self, run_id: str) -> tuple[str, float | None, list[tuple[Any, ...]]] | None:
        """One run's stored view (JSON), when it was last observed, and its history as (status, reason, step,
        time, kind) rows (GET /v1/runs/{id}); None: no such run."""
        found = self._view.rows(run_id=run_id)
        return (found[0][0], found[0][1], self._history.rows(run_id=run_id)) if found else None

    def mark_observed(self, run_ids: Collection[str], now: float) -> None:
        """The reconciler compared these records with their runs at `now` (one statement, the views untouched)."""
        if run_ids:
            with self.session() as s:
                s.execute(update(RunRecord).where(RunRecord.id.in_(list(run_ids))).values(observed=now)
                          .execution_options(synchronize_session=False))

    def add_faults(self, run_id: str, faults: list[tuple[str, int, float]]) -> None:
        """History rows of kind `fault`: (text, step, time) each, with the run's status at the time."""
        with self.session() as s:
            rec = s.get(RunRecord, run_id)
            if rec is not None:
                s.add_all(StatusEvent(run_id=run_id, status=rec.status, reason=text, step=step, time=t, kind="fault")
                          for text, step, t in faults)

    def last_fault_time(self, run_id: str) -> float | None:
        with self.session() as s:
            return s.scalar(select(func.max(StatusEvent.time)).where(StatusEvent.run_id == run_id,
                                                                     StatusEvent.kind == "fault"))

    def count_by_status(self) -> dict[RunStatus, int]:
        with self.session() as s:
            rows = s.execute(select(RunRecord.status, func.count()).group_by(RunRecord.status))
            return {status: n for status, n in rows}

    def count_active(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).where(RunRecord.status.in_(ACTIVE))) or 0)

    def update_run(self, run_id: str, *, expect: tuple[RunStatus, ...] | None = None, **fields: Any) -> bool:
        """Set `fields` (a status change is added to the history); with `expect`, only if the status is one
        of those (a compare-and-set: the replica whose UPDATE matched owns the transition)."""
        with self.session() as s:
            return _update(s, run_id, expect, fields)

    def claim_queued(self, run_id: str, reason: str | None = None, max_active: int | None = None) -> bool:
        """queued -> starting, only if the run is still queued and, with `max_active`, fewer runs than that are
        active: one transaction that first takes the admission counter, so two claims never both see a free
        slot (12 concurrent POSTs with a limit of 1 start one run)."""
        now = time.time()
        with self.session() as s:
            _bump(s.connection(), "admission")
            if max_active is not None:
                active = s.scalar(select(func.count()).where(RunRecord.status.in_(ACTIVE))) or 0
                if active >= max_active:
                    return False
            fields = {"status": RunStatus.STARTING, "reason": reason, "started": now, "launch_began": now}
            return _update(s, run_id, (RunStatus.QUEUED,), fields)

    def delete_run(self, run_id: str, expect: RunStatus) -> bool:
        """Delete the run and its history only if its status is still `expect` (a compare-and-set: a resume
        that came in between wins); False if nothing was deleted."""
        with self.session() as s:
            q = delete(RunRecord).where(RunRecord.id == run_id, RunRecord.status == expect)
            if not s.execute(q.execution_options(synchronize_session=False)).rowcount:
                return False
            s.execute(delete(StatusEvent).where(StatusEvent.run_id == run_id))
            return True

    def history(self, run_id: str) -> list[StatusEvent]:
        with self.session() as s:
            q = select(StatusEvent).where(StatusEvent.run_id == run_id).order_by(StatusEvent.id)
            return list(s.scalars(q))

    # ---- teachers --------------------------------------------------------------------------
    def add_teacher(self, rec: TeacherRecord) -> TeacherRecord:
        with self.session() as s:
            s.add(rec)
        return rec

    def get_teacher(self, teacher_id: str) -> TeacherRecord | None:
        with self.session() as s:
            return s.get(TeacherRecord, teacher_id)

    def list_teachers(self) -> list[TeacherRecord]:
        with self.session() as s:
            return list(s.scalars(select(TeacherRecord).order_by(TeacherRecord.created)))

    def delete_teacher(self, teacher_id: str) -> bool:
        with self.session() as s:
            rec = s.get(TeacherRecord, teacher_id)
            if rec is None:
                return False
            s.delete(rec)
            return True


def _update(s: Session, run_id: str, expect: tuple[RunStatus, ...] | None, fields: dict[str, Any]) -> bool:
    """`Store.update_run` inside the session `s`."""
    fields["updated"] = time.time()
    q = update(RunRecord).where(RunRecord.id == run_id)
    if expect is not None:
        q = q.where(RunRecord.status.in_(expect))
    old = s.get(RunRecord, run_id)
    if old is None:
        return False
    changed_status = "status" in fields and fields["status"] != old.status
    n = s.execute(q.values(**fields).execution_options(synchronize_session=False)).rowcount
    if not n:
        return False
    if changed_status:
        s.add(StatusEvent(run_id=run_id, status=fields["status"], reason=fields.get("reason"),
                          step=fields.get("step", old.step), time=fields["updated"], kind="status"))
    s.refresh(old)  # the row as this transaction left it, for its view
    s.execute(update(RunRecord).where(RunRecord.id == run_id).values(view_json=render_view(old)))
    return True


def _upgrade(engine: Engine) -> None:
    """Bring a database an older version made up to the models: add the columns it lacks (all nullable), then
    render the views it has not stored (a version that changes `RunView` clears view_json to re-render)."""
    with engine.begin() as conn:
        for table in (RunRecord.__table__, StatusEvent.__table__):
            have = {c["name"] for c in inspect(engine).get_columns(table.name)}
            for col in table.columns:
                if col.name not in have:
                    conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {col.name} "
                                      f"{col.type.compile(engine.dialect)}"))
    counters = Counter.__table__
    for name in ("run_seq", "admission"):
        try:
            with engine.begin() as conn:
                if conn.execute(select(counters.c.name).where(counters.c.name == name)).first() is None:
                    conn.execute(counters.insert().values(name=name, value=0))
        except IntegrityError:  # another replica created it first
            pass
    with Session(engine) as s, s.begin():
        for rec in s.scalars(select(RunRecord).where(RunRecord.seq.is_(None)).order_by(RunRecord.created)):
            rec.seq = _bump(s.connection(), "run_seq")  # rows an older version wrote, in their created order
        for rec in s.scalars(select(RunRecord).where(RunRecord.view_json.is_(None))):
            rec.view_json = render_view(rec)


def _sqlite_pragmas(busy_timeout_s: float):
    def on_connect(conn: Any, _record: Any) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the scheduler's writes
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.close()

    return on_connect

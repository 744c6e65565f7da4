"""Run records, status history and teachers in SQL (SQLite by default; any SQLAlchemy URL).

The database is the control plane's only state: several API replicas can share it, and the
queue claim (`claim_queued`) is a conditional UPDATE so only one replica starts a queued run.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from onpolicy.config import RunConfig, config_from_dict
from onpolicy.status import ACTIVE, RunStatus

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
    latest_metrics_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)

    @property
    def config(self) -> RunConfig:
        return config_from_dict(json.loads(self.config_json), source=f"run {self.id}")

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


def new_id() -> str:
    return uuid.uuid4().hex[:12]


class Store:
    """Thin data access over one engine; every method opens and commits its own session."""

    def __init__(self, url: str):
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split("sqlite:///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

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

    def list_runs(self, status: RunStatus | None = None, limit: int = 1000) -> list[RunRecord]:
        q = select(RunRecord).order_by(RunRecord.created)
        if status:
            q = q.where(RunRecord.status == status)
        with self.session() as s:
            return list(s.scalars(q.limit(limit)))

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
        fields["updated"] = time.time()
        q = update(RunRecord).where(RunRecord.id == run_id)
        if expect is not None:
            q = q.where(RunRecord.status.in_(expect))
        with self.session() as s:
            old = s.get(RunRecord, run_id)
            if old is None:
                return False
            changed_status = "status" in fields and fields["status"] != old.status
            n = s.execute(q.values(**fields).execution_options(synchronize_session=False)).rowcount
            if n and changed_status:
                s.add(StatusEvent(run_id=run_id, status=fields["status"], reason=fields.get("reason"),
                                  step=fields.get("step", old.step), time=fields["updated"]))
            return bool(n)

    def claim_queued(self, run_id: str, reason: str | None = None) -> bool:
        return self.update_run(run_id, expect=(RunStatus.QUEUED,), status=RunStatus.STARTING, reason=reason,
                               started=time.time())

    def delete_run(self, run_id: str) -> None:
        with self.session() as s:
            s.query(StatusEvent).filter(StatusEvent.run_id == run_id).delete()
            rec = s.get(RunRecord, run_id)
            if rec is not None:
                s.delete(rec)

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


def _sqlite_pragmas(conn: Any, _record: Any) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the scheduler's writes
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()

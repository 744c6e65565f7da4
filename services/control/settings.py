"""Settings of the control API, from arguments or the environment (`Settings.from_env`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def load_tokens(env: dict[str, str] | None = None) -> list[str]:
    """Bearer tokens from ONPOLICY_API_TOKENS (comma-separated) and/or ONPOLICY_API_TOKENS_FILE (one a line)."""
    env = os.environ if env is None else env
    tokens = [t.strip() for t in env.get("ONPOLICY_API_TOKENS", "").split(",")]
    path = env.get("ONPOLICY_API_TOKENS_FILE")
    if path:
        tokens += [t.strip() for t in Path(path).read_text().splitlines()]
    return [t for t in tokens if t and not t.startswith("#")]


def _split(value: str, sep: str) -> list[str]:
    return [p.strip() for p in value.split(sep) if p.strip()]


@dataclass
class Settings:
    data_dir: str = "control-data"
    """Runs go to `<data_dir>/runs/<run_id>`; the SQLite database defaults to `<data_dir>/control.db`."""
    database_url: str | None = None
    """A SQLAlchemy URL (e.g. postgresql+psycopg://...); None: SQLite in data_dir."""
    api_tokens: list[str] = field(default_factory=list)
    """Accepted bearer tokens; empty: no auth."""
    max_concurrent_runs: int = 2
    ray_address: str | None = None
    """Ray cluster to join (RAY_ADDRESS); the API never starts its own, so runs survive it."""
    scheduler_interval_s: float = 1.0
    """How often the scheduler thread starts queued runs that fit (0: no thread; once at start-up)."""
    reconcile_interval_s: float = 1.0
    """How often the reconciler thread brings active runs' records up to date with their run directories and
    drivers; the API's reads come from the records alone (0: no thread; once at start-up)."""
    readiness_interval_s: float = 2.0
    """How often the readiness probe asks the database and the Ray cluster (0: inside each /readyz)."""
    launcher: Any = None
    """A `Launcher`; None: the Ray launcher. Tests inject `InMemoryLauncher`."""
    models_roots: list[str] = field(default_factory=list)
    """Model folders a REST client may name live under these (empty: the API's working directory)."""
    data_roots: list[str] = field(default_factory=list)
    """Data files (data.prompts_path) a REST client may name live under these (empty: the working directory)."""
    teacher_allow_hosts: list[str] = field(default_factory=list)
    """Teacher hosts (names or CIDRs) allowed although they resolve to loopback/private addresses."""
    allowed_key_envs: list[str] = field(default_factory=list)
    """Environment variables a run may name as teacher.api_key_env besides ONPOLICY_TEACHER_KEY_*."""
    max_body_bytes: int = 1 << 20
    """Largest request body the API reads (413 above)."""

    def policy(self):
        from services.control.policy import Policy

        cwd = [Path.cwd()]
        return Policy(
            models_roots=[Path(p) for p in self.models_roots] or cwd,
            data_roots=[Path(p) for p in self.data_roots] or cwd,
            allow_hosts=list(self.teacher_allow_hosts),
            allowed_key_envs=list(self.allowed_key_envs),
        )

    @property
    def runs_root(self) -> Path:
        return Path(self.data_dir).resolve() / "runs"

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir).resolve() / 'control.db'}"

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        env = os.environ
        s = cls(
            data_dir=env.get("ONPOLICY_CONTROL_DATA", "control-data"),
            database_url=env.get("ONPOLICY_DATABASE_URL") or None,
            api_tokens=load_tokens(),
            max_concurrent_runs=int(env.get("ONPOLICY_MAX_CONCURRENT_RUNS", "2")),
            ray_address=env.get("RAY_ADDRESS") or None,
            models_roots=_split(env.get("ONPOLICY_MODELS_ROOTS", ""), os.pathsep),
            data_roots=_split(env.get("ONPOLICY_DATA_ROOTS", ""), os.pathsep),
            teacher_allow_hosts=_split(env.get("ONPOLICY_TEACHER_ALLOW_HOSTS", ""), ","),
            allowed_key_envs=_split(env.get("ONPOLICY_ALLOWED_KEY_ENVS", ""), ","),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        return s

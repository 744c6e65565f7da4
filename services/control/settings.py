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
    """How often the background loop refreshes active runs and starts queued ones (0: no loop)."""
    launcher: Any = None
    """A `Launcher`; None: the Ray launcher. Tests inject `InMemoryLauncher`."""

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
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        return s

"""Settings of the control API, from arguments or the environment (`Settings.from_env`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
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


def parse_key_hosts(value: str) -> dict[str, list[str]]:
    """`VAR=host1,host2;VAR2=10.0.0.0/8` -> {VAR: [host1, host2], VAR2: [10.0.0.0/8]}."""
    out: dict[str, list[str]] = {}
    for item in _split(value, ";"):
        name, sep, hosts = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"ONPOLICY_KEY_HOSTS: {item!r} is not VAR=host1,host2 (items separated by ';')")
        out[name.strip()] = _split(hosts, ",")
    return out


def caps_from_env(env: Mapping[str, str]):
    """`RunCaps` with the limits the environment sets (ONPOLICY_MAX_ROLLOUT_WORKERS, ...)."""
    from services.control.caps import RunCaps

    caps = RunCaps()
    for name, var in (("max_rollout_workers", "ONPOLICY_MAX_ROLLOUT_WORKERS"),
                      ("max_learner_ranks", "ONPOLICY_MAX_LEARNER_RANKS"),
                      ("max_tensor_parallel", "ONPOLICY_MAX_TENSOR_PARALLEL"),
                      ("max_step_tokens", "ONPOLICY_MAX_STEP_TOKENS"),
                      ("max_kv_cache_gib", "ONPOLICY_MAX_KV_CACHE_GIB"),
                      ("min_actor_cpus", "ONPOLICY_MIN_ACTOR_CPUS")):
        if env.get(var):
            kind = type(getattr(caps, name))
            setattr(caps, name, kind(env[var]))
    return caps


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
    key_hosts: dict[str, list[str]] = field(default_factory=dict)
    """Teacher key variable -> the hosts (names, CIDRs) its key may go to; a key not listed goes only to
    `teacher_allow_hosts` (ONPOLICY_KEY_HOSTS="ONPOLICY_TEACHER_KEY_X=host1,host2;ONPOLICY_TEACHER_KEY_Y=...")."""
    allow_hub_datasets: bool = False
    """Whether data.source may name a hub dataset over REST (fetched with the node's HF_TOKEN and network)."""
    caps: Any = None
    """`RunCaps`: limits on one REST run and the CPUs each actor reserves at least; None: the defaults."""
    max_body_bytes: int = 1 << 20
    """Largest request body the API reads (413 above)."""
    db_busy_timeout_s: float = 2.0
    """How long a database call waits for a lock before the request answers 503 (SQLite)."""
    max_downloads: int = 2
    """Student archives streamed at once (429 beyond)."""
    max_event_streams: int = 32
    """Server-sent event streams open at once (429 beyond)."""
    launch_grace_s: float = 120.0
    """How long the reconciler lets a launch run (on this process's monotonic clock) before it calls it
    interrupted: the driver is then treated as lost, or, if it is up, the launch mark is cleared."""

    def policy(self):
        from services.control.policy import Policy

        cwd = [Path.cwd()]
        return Policy(
            models_roots=[Path(p) for p in self.models_roots] or cwd,
            data_roots=[Path(p) for p in self.data_roots] or cwd,
            allow_hosts=list(self.teacher_allow_hosts),
            allowed_key_envs=list(self.allowed_key_envs),
            key_hosts={k: list(v) for k, v in self.key_hosts.items()},
            allow_hub_datasets=self.allow_hub_datasets,
        )

    def run_caps(self):
        from services.control.caps import RunCaps

        return self.caps or RunCaps()

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
            key_hosts=parse_key_hosts(env.get("ONPOLICY_KEY_HOSTS", "")),
            allow_hub_datasets=env.get("ONPOLICY_ALLOW_HUB_DATASETS", "") in ("1", "true", "yes"),
            caps=caps_from_env(env),
            db_busy_timeout_s=float(env.get("ONPOLICY_DB_BUSY_TIMEOUT_S", "2")),
            max_downloads=int(env.get("ONPOLICY_MAX_DOWNLOADS", "2")),
            max_event_streams=int(env.get("ONPOLICY_MAX_EVENT_STREAMS", "32")),
            launch_grace_s=float(env.get("ONPOLICY_LAUNCH_GRACE_S", "120")),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        return s

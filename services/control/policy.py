"""What a REST client may ask the server to touch: secrets by name, teacher hosts, files.

The control API runs runs with the server's environment, network position and file system, so a
client must not be able to point any of them somewhere of its choosing:
- **secrets**: `teacher.api_key_env` names an environment variable whose value is sent as a bearer
  token to the teacher URL. Only names with the prefix `ONPOLICY_TEACHER_KEY_` (or listed in
  `ONPOLICY_ALLOWED_KEY_ENVS`) may be named; anything else (say `ONPOLICY_API_TOKENS` or
  `RAY_AUTH_TOKEN`) would be handed to the client's URL. Each key goes only to its own hosts: those the
  operator binds it to (`ONPOLICY_KEY_HOSTS="ONPOLICY_TEACHER_KEY_X=host,10.0.0.0/8;..."`), or by default
  the operator's own teachers (`ONPOLICY_TEACHER_ALLOW_HOSTS`), never a host the client picked.
- **hosts**: a teacher URL is fetched by the server; its host is resolved once and every address must
  pass (hosts.py: loopback, private, link-local, reserved and metadata addresses, also inside IPv6, are
  refused unless the operator allows the host or its network); the run connects to the address vetted
  here. URLs carry no user info, query or fragment, so an appended path cannot be neutralised (`?`) and
  nothing rides along.
- **files**: every config field marked as a path (`json_schema_extra=path_marker(kind)`, onpolicy/config/base.py)
  resolves (symlinks followed) under the configured roots; a relative path is taken relative to the first
  root. `data.source` may instead be a hub id, only where the operator allows them
  (`ONPOLICY_ALLOW_HUB_DATASETS=1`: the node's HF_TOKEN and network are then used for it).

Each check raises `PolicyError(field, message)`; the API turns it into a 422 naming the field.
The CLI applies none of this: a local user already has the machine.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import BaseModel

from services.control.hosts import HostRule, Resolver, literal, refused_addresses, resolve_host

KEY_ENV_PREFIX = "ONPOLICY_TEACHER_KEY_"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")


class PolicyError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def path_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted field, kind) for every field of the config tree marked as a path (onpolicy/config/base.py), in every
    member of a section that is a union by kind (`teacher.model` is a local teacher's)."""
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if "path" in extra:
            yield f"{prefix}{name}", str(extra["path"])
        for arg in _models_in(info.annotation):
            yield from path_fields(arg, f"{prefix}{name}.")


def _models_in(annotation: object) -> Iterator[type[BaseModel]]:
    """The config models an annotation holds, however deep: a union's members, a list's items (`teachers`: a
    list of a union by kind), an optional's."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


@dataclass
class Policy:
    models_roots: list[Path] = field(default_factory=list)
    data_roots: list[Path] = field(default_factory=list)
    allow_hosts: list[str] = field(default_factory=list)  # host names and CIDRs
    allowed_key_envs: list[str] = field(default_factory=list)
    key_hosts: dict[str, list[str]] = field(default_factory=dict)  # key variable -> host names and CIDRs
    allow_hub_datasets: bool = False
    resolver: Resolver = resolve_host

    # ---- secrets ---------------------------------------------------------------------------
    def check_key_env(self, name: str | None, where: str) -> None:
        if name is None or name.startswith(KEY_ENV_PREFIX) and len(name) > len(KEY_ENV_PREFIX) \
                or name in self.allowed_key_envs:
            return
        extra = f" or one of ONPOLICY_ALLOWED_KEY_ENVS ({', '.join(self.allowed_key_envs)})" \
            if self.allowed_key_envs else " (or list it in the server's ONPOLICY_ALLOWED_KEY_ENVS)"
        raise PolicyError(where, f"{where}={name!r} is not allowed: over the API a teacher key may only come "
                                 f"from an environment variable named {KEY_ENV_PREFIX}<NAME>{extra}, so no other "
                                 f"server secret can be sent to a teacher URL")

    def check_key_host(self, name: str | None, url: str, pins: dict[str, str], where: str) -> None:
        """The key in `name` may be sent to `url` (whose host `vet_teacher_url` pinned in `pins`): its host is one
        the key is bound to, by name or by a network holding the address the run will connect to."""
        if name is None:
            return
        host = httpx.URL(url).host
        bound = self.key_hosts.get(name)
        rule = HostRule(bound if bound is not None else self.allow_hosts)
        address = pins.get(host) or literal(host)
        if rule.allows(host, [address] if address else []):
            return
        said = f"is bound to {', '.join(bound)} (ONPOLICY_KEY_HOSTS)" if bound is not None else \
            "may only go to the operator's teachers (ONPOLICY_TEACHER_ALLOW_HOSTS)"
        raise PolicyError(where, f"{where}: the key in {name} {said}, not to {host!r}; the operator can bind it "
                                 f"with ONPOLICY_KEY_HOSTS='{name}={host}'")

    # ---- hosts -----------------------------------------------------------------------------
    def vet_teacher_url(self, url: str, where: str) -> tuple[str, dict[str, str]]:
        """The URL, normalised (no trailing slash), and {host: the vetted address to connect to} (empty for an
        IP literal); or PolicyError saying what is wrong with it. The host is resolved once, here."""
        try:
            u = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as err:
            raise PolicyError(where, f"{where} is not a valid URL: {err}") from None
        if u.scheme not in ("http", "https") or not u.host:
            raise PolicyError(where, f"{where} must be http(s)://host[:port][/path]")
        if u.userinfo or u.query or u.fragment:
            raise PolicyError(where, f"{where} must not carry user info, a query string or a fragment "
                                     "(the server appends the dialect's paths itself)")
        address = literal(u.host)
        try:
            addresses = [address] if address else sorted(set(self.resolver(u.host)))
        except (OSError, UnicodeError):  # UnicodeError: a label IDNA refuses (empty, over 63 characters)
            raise PolicyError(where, f"{where}: the host {u.host!r} does not resolve") from None
        if not addresses:
            raise PolicyError(where, f"{where}: the host {u.host!r} does not resolve")
        refused = refused_addresses(u.host, addresses, HostRule(self.allow_hosts))
        if refused:
            raise PolicyError(
                where, f"{where}: {u.host!r} resolves to {refused[0]}, a loopback, private, link-local or reserved "
                       f"address (or one carrying such an IPv4 address), which the server does not fetch for API "
                       f"clients; the operator can allow it with ONPOLICY_TEACHER_ALLOW_HOSTS={u.host} (or its "
                       "network as a CIDR)")
        # A name the operator allows is trusted wherever it resolves (a compose service's address changes when
        # its container is recreated); any other name is pinned to the address vetted here.
        trusted = address is not None or u.host.lower() in HostRule(self.allow_hosts).names()
        return str(u).rstrip("/"), {} if trusted else {u.host: addresses[0]}

    def check_teacher_url(self, url: str, where: str) -> str:
        """The URL, normalised (no trailing slash), or PolicyError saying what is wrong with it."""
        return self.vet_teacher_url(url, where)[0]

    # ---- files -----------------------------------------------------------------------------
    def confine(self, value: str, roots: list[Path], where: str, kind: str) -> str:
        """`value` resolved under one of `roots` (relative: under the first), or PolicyError."""
        if not roots:
            raise PolicyError(where, f"{where}: the server has no {kind} root configured, so API clients cannot "
                                     f"name {kind} paths (start it with --{kind}-root DIR)")
        if "\x00" in value:  # no file system takes it (os.path raises ValueError: a 500, not the client's error)
            raise PolicyError(where, f"{where} holds a NUL character, which no path can contain")
        p = Path(value)
        resolved = (p if p.is_absolute() else roots[0] / p).resolve()
        for root in roots:
            root = root.resolve()
            if resolved == root or root in resolved.parents:
                return str(resolved)
        raise PolicyError(where, f"{where}={value!r} is outside the server's {kind} roots "
                                 f"({', '.join(str(r) for r in roots)}); put it under one of them")

    def confine_source(self, value: str, where: str) -> str:
        """A data file or folder under the data roots, or (only where the operator allows it) a hub id."""
        p = Path(value)
        looks_like_path = p.is_absolute() or value.startswith((".", "~")) or p.suffix.lower() in DATA_SUFFIXES
        if looks_like_path or not HUB_ID.match(value) or (self.data_roots and (self.data_roots[0] / p).exists()):
            return self.confine(value, self.data_roots, where, "data")
        if not self.allow_hub_datasets:
            raise PolicyError(where, f"{where}={value!r} is not a file or folder under the server's data roots "
                                     f"({', '.join(str(r) for r in self.data_roots)}), and the server does not "
                                     "fetch hub datasets for API clients; put the data under a data root, or the "
                                     "operator can allow hub ids with ONPOLICY_ALLOW_HUB_DATASETS=1")
        return value

    def confine_field(self, value: str, kind: str, where: str, runs_root: Path) -> str:
        """A marked path field (`kind` from its marker) confined to the root its kind names."""
        if kind == "models":
            return self.confine(value, self.models_roots, where, "models")
        if kind == "data":
            return self.confine(value, self.data_roots, where, "data")
        if kind == "data_or_hub":
            return self.confine_source(value, where)
        if kind == "output":
            return self.confine(value, [runs_root], where, "runs")
        raise PolicyError(where, f"{where}: unknown path kind {kind!r} (a bug: see onpolicy/config/base.py `path_marker`)")

"""What a REST client may ask the server to touch: secrets by name, teacher hosts, files.

The control API runs runs with the server's environment, network position and file system, so a
client must not be able to point any of them somewhere of its choosing:
- **secrets**: `teacher.api_key_env` names an environment variable whose value is sent as a bearer
  token to the teacher URL. Only names with the prefix `ONPOLICY_TEACHER_KEY_` (or listed in
  `ONPOLICY_ALLOWED_KEY_ENVS`) may be named; anything else (say `ONPOLICY_API_TOKENS` or
  `RAY_AUTH_TOKEN`) would be handed to the client's URL.
- **hosts**: a teacher URL is fetched by the server; loopback, private, link-local, reserved and
  cloud-metadata addresses are refused unless the operator allows the host or its network
  (`ONPOLICY_TEACHER_ALLOW_HOSTS`: host names and CIDRs). URLs carry no user info, query or
  fragment, so an appended path cannot be neutralised (`?`) and nothing rides along.
- **files**: model and data paths resolve (symlinks followed) under the configured roots; a
  relative path is taken relative to the first root.

Each check raises `PolicyError(field, message)`; the API turns it into a 422 naming the field.
The CLI applies none of this: a local user already has the machine.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

KEY_ENV_PREFIX = "ONPOLICY_TEACHER_KEY_"
Resolver = Callable[[str], list[str]]


class PolicyError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def resolve_host(host: str) -> list[str]:
    """Every address the host name resolves to."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({info[4][0] for info in infos})


@dataclass
class Policy:
    models_roots: list[Path] = field(default_factory=list)
    data_roots: list[Path] = field(default_factory=list)
    allow_hosts: list[str] = field(default_factory=list)  # host names and CIDRs
    allowed_key_envs: list[str] = field(default_factory=list)
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

    # ---- hosts -----------------------------------------------------------------------------
    def _allowed(self, host: str, addresses: Iterable[str]) -> bool:
        for entry in self.allow_hosts:
            if "/" in entry:
                net = ipaddress.ip_network(entry, strict=False)
                if any(ipaddress.ip_address(a) in net for a in addresses):
                    return True
            elif entry.lower() == host.lower():
                return True
        return False

    def check_teacher_url(self, url: str, where: str) -> str:
        """The URL, normalised (no trailing slash), or PolicyError saying what is wrong with it."""
        try:
            u = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as err:
            raise PolicyError(where, f"{where} is not a valid URL: {err}") from None
        if u.scheme not in ("http", "https") or not u.host:
            raise PolicyError(where, f"{where} must be http(s)://host[:port][/path]")
        if u.userinfo or u.query or u.fragment:
            raise PolicyError(where, f"{where} must not carry user info, a query string or a fragment "
                                     "(the server appends the dialect's paths itself)")
        try:
            addresses = [ipaddress.ip_address(u.host.strip("[]")).compressed]  # an IP literal is itself
        except ValueError:
            addresses = None
        try:
            addresses = addresses or self.resolver(u.host)
        except (OSError, UnicodeError):  # UnicodeError: a label IDNA refuses (empty, over 63 characters)
            raise PolicyError(where, f"{where}: the host {u.host!r} does not resolve") from None
        if not self._allowed(u.host, addresses):
            for a in addresses:
                ip = ipaddress.ip_address(a)
                if not ip.is_global or ip.is_multicast:
                    raise PolicyError(
                        where, f"{where}: {u.host!r} resolves to {a}, a loopback, private, link-local or "
                               f"reserved address, which the server does not fetch for API clients; the operator "
                               f"can allow it with ONPOLICY_TEACHER_ALLOW_HOSTS={u.host} (or its network as a CIDR)")
        return str(u).rstrip("/")

    # ---- files -----------------------------------------------------------------------------
    def confine(self, value: str, roots: list[Path], where: str, kind: str) -> str:
        """`value` resolved under one of `roots` (relative: under the first), or PolicyError."""
        if not roots:
            raise PolicyError(where, f"{where}: the server has no {kind} root configured, so API clients cannot "
                                     f"name {kind} paths (start it with --{kind}-root DIR)")
        p = Path(value)
        resolved = (p if p.is_absolute() else roots[0] / p).resolve()
        for root in roots:
            root = root.resolve()
            if resolved == root or root in resolved.parents:
                return str(resolved)
        raise PolicyError(where, f"{where}={value!r} is outside the server's {kind} roots "
                                 f"({', '.join(str(r) for r in roots)}); put it under one of them")

"""Who may listen where: a server that binds beyond loopback must require a token.

Both HTTP services call `check_listen` before they start: a non-loopback address without tokens
is refused with a message saying how to fix it, unless the operator passes `--insecure-no-auth`,
which then logs a warning on every start.
"""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger(__name__)


class ListenRefused(ValueError):
    """The server would accept unauthenticated requests from beyond this machine."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name (or 0.0.0.0-like wildcard spelled otherwise): treat as reachable


def check_listen(host: str, has_auth: bool, insecure_no_auth: bool, *, what: str, token_hint: str) -> None:
    """Raise `ListenRefused` for an unauthenticated non-loopback bind unless `insecure_no_auth`."""
    if has_auth or is_loopback(host):
        return
    if not insecure_no_auth:
        raise ListenRefused(
            f"refusing to serve the {what} on {host} without authentication: anyone who can reach this "
            f"address could use it. Set {token_hint}, or bind to 127.0.0.1, or pass --insecure-no-auth to "
            f"accept the risk explicitly."
        )
    log.warning("INSECURE: the %s listens on %s with no authentication (--insecure-no-auth)", what, host)

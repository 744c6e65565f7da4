"""HTTP transports that connect to an address chosen in advance (`teacher.connect_to`), never to whatever
the host name resolves to when the request goes out.

The control API resolves a teacher's host once, vets every address it gets, and writes the one to use into
the run's config. Resolving again at connect time (in the API or later on a Ray node) would let a name that
answers a public address to the check and 127.0.0.1 to the connection (DNS rebinding) reach the server's own
network. `PinnedTransport` swaps the host for the pinned address below the request: the `Host` header and
the TLS server name (`sni_hostname`, also the name the certificate is checked against) stay the URL's.

Clients built here also ignore HTTP(S)_PROXY and friends from the environment (`trust_env=False`): a proxy
would make the connection somewhere the policy never looked at.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx


class PinnedTransport(httpx.BaseTransport):
    """An `httpx.HTTPTransport` whose connections to a pinned host go to its pinned address."""

    def __init__(self, connect_to: Mapping[str, str], **transport_kw: object) -> None:
        self.connect_to = {host.lower().strip("[]"): address for host, address in connect_to.items()}
        self._inner = httpx.HTTPTransport(**transport_kw)  # type: ignore[arg-type]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host.lower()
        address = self.connect_to.get(host)
        if address is not None:
            # The Host header was set from the URL when the request was built; only the connection moves.
            request.url = request.url.copy_with(host=address)
            request.extensions = {**request.extensions, "sni_hostname": host}
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def transport(connect_to: Mapping[str, str] | None = None, limits: httpx.Limits | None = None) -> httpx.BaseTransport:
    """The transport for a teacher client: pinned when `connect_to` names hosts, else a plain one."""
    kw: dict[str, object] = {"limits": limits} if limits is not None else {}
    return PinnedTransport(connect_to, **kw) if connect_to else httpx.HTTPTransport(**kw)  # type: ignore[arg-type]


def client(connect_to: Mapping[str, str] | None = None, **client_kw: object) -> httpx.Client:
    """An `httpx.Client` that connects to pinned addresses and ignores proxy variables (see the module doc)."""
    limits = client_kw.pop("limits", None)
    return httpx.Client(transport=transport(connect_to, limits), trust_env=False, **client_kw)  # type: ignore[arg-type]

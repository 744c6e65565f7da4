"""Which network addresses the server may fetch for a REST client, and how a host name is pinned to one.

A teacher URL's host is resolved once (`Resolver`, injectable: the tests answer for it), and *every* address
it resolves to must pass, so a name with one public and one loopback address is refused; the run then
connects to the address vetted here (`teacher.connect_to`), never to a second resolution.

An address passes when the operator allows its host name, or an allowed CIDR holds it, or it is public
(`is_global`, not multicast). IPv6 addresses that carry an IPv4 address inside (IPv4-mapped ::ffff:a.b.c.d,
IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo) are judged by the IPv4 address too:
Python calls `[64:ff9b::a9fe:a9fe]` (the metadata address through NAT64) and `[2002:7f00:1::]` (loopback
through 6to4) global. The local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215) is never public.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], list[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


def resolve_host(host: str) -> list[str]:
    """Every address the host name resolves to (the system resolver)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({info[4][0] for info in infos})


def embedded_ipv4(ip: IP) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (none for an IPv4 address)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    out = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are not IPv4-compatible
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def is_public(ip: IP) -> bool:
    """A global unicast address that carries no non-global IPv4 address inside."""
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL:
        return False
    return all(a.is_global and not a.is_multicast for a in (ip, *embedded_ipv4(ip)))


@dataclass
class HostRule:
    """Host names and CIDRs (the operator's ONPOLICY_TEACHER_ALLOW_HOSTS, or a key's bound hosts)."""

    entries: list[str]

    def names(self) -> set[str]:
        return {e.lower() for e in self.entries if "/" not in e}

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(e, strict=False) for e in self.entries if "/" in e]

    def allows_address(self, ip: IP) -> bool:
        """An allowed network holds the address (or the IPv4 address inside it)."""
        return any(a in net for net in self.networks() for a in (ip, *embedded_ipv4(ip)) if a.version == net.version)

    def allows(self, host: str, addresses: Iterable[str]) -> bool:
        """The host name is listed, or an allowed network holds every address."""
        ips = [ipaddress.ip_address(a) for a in addresses]
        return host.lower() in self.names() or bool(ips) and all(self.allows_address(ip) for ip in ips)


def literal(host: str) -> str | None:
    """The address, if `host` is an IP literal (brackets stripped), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]")).compressed
    except ValueError:
        return None


def refused_addresses(host: str, addresses: list[str], allow: HostRule) -> list[str]:
    """The addresses of `host` the server must not fetch for a REST client (empty: all pass)."""
    if host.lower() in allow.names():
        return []
    out = []
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if not (is_public(ip) or allow.allows_address(ip)):
            out.append(a)
    return out

"""Who is on the other end: the client's address, for every per-address limit.

Behind nginx the TCP peer is nginx. Its `X-Forwarded-For` names the client, but the header is
whatever the client sent plus what each proxy appended, so it is believed only as far as
trusted proxies wrote it: walking from the right (the hop nearest to us), every address that is
a trusted proxy is skipped, and the first one that is not is the client. A peer that is not a
trusted proxy is the client, whatever its headers say. (The walk of RFC 7239 section 7.4; the
same as nginx's `real_ip_recursive on`.)

`http.trusted_proxies` defaults to this host's loopback addresses: nginx on the same host, the
deployment the README describes. Without a proxy in front the list may stay as it is: a client
connecting from the internet is not a loopback address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Hops of X-Forwarded-For looked at, from the right: a longer chain is a client padding it.
MAX_HOPS = 16
# Addresses whose parse is remembered: every request parses its peer's (and every per-address
# limit its client's), and ipaddress takes microseconds each; bounded, so many addresses only
# cost misses.
PARSED_ADDRESSES = 4096


class ClientAddresses:
    """`of(request)`: the client's address as a string, or None when the transport has none
    (a Unix socket); per-address limits then share one key."""

    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        self._trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(p, strict=False) for p in trusted_proxies
        )

    def of(self, request: web.Request) -> str | None:
        peer = request.remote
        if peer is None or not self._is_trusted(peer):
            return peer
        header = ",".join(request.headers.getall("X-Forwarded-For", ()))
        hops = [h.strip() for h in header.split(",") if h.strip()][-MAX_HOPS:]
        client = peer
        for hop in reversed(hops):
            address = _parse(hop)
            if address is None:
                break  # garbage only a client could have written: the hop after it is ours
            client = str(address)
            if not self._is_trusted(client):
                break
        return client

    def _is_trusted(self, address: str) -> bool:
        ip = _parse(address)
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._trusted)


@functools.lru_cache(maxsize=PARSED_ADDRESSES)
def _parse(text: str) -> Address | None:
    """An address as proxies write it: bare, or IPv6 in brackets, maybe with a port."""
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None

"""Whose request it is (api/peer.py) and which page sent it (api/origins.py), by rule."""

from __future__ import annotations

from unittest.mock import Mock

import pytest
from aiohttp.test_utils import make_mocked_request

from livecomments.api.origins import OriginPolicy
from livecomments.api.peer import ClientAddresses
from livecomments.config import ConfigError, load_settings


def request(peer: str, headers: dict[str, str] | None = None, host: str = "here.example"):
    transport = Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 12345) if name == "peername" else default
    )
    return make_mocked_request(
        "GET", "/v1/ws", headers={"Host": host, **(headers or {})}, transport=transport
    )


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", None, "203.0.113.9"),  # no proxy
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # untrusted peer: header ignored
        ("127.0.0.1", None, "127.0.0.1"),  # trusted peer, no header: itself
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),  # nginx's word
        ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the client's own claim: no
        ("127.0.0.1", "198.51.100.1, 10.0.0.5", "198.51.100.1"),  # through two trusted proxies
        ("127.0.0.1", "garbage, 10.0.0.5", "10.0.0.5"),  # stops at what only a client writes
        ("127.0.0.1", "[2001:db8::1]:443", "2001:db8::1"),
        ("127.0.0.1", "198.51.100.1:5555", "198.51.100.1"),
        ("::ffff:127.0.0.1", "198.51.100.1", "198.51.100.1"),  # a v4-mapped peer
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(peer, forwarded, client):
    addresses = ClientAddresses(["127.0.0.1", "::1", "10.0.0.0/8"])
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    assert addresses.of(request(peer, headers)) == client


@pytest.mark.parametrize(
    ("allowed", "origin", "host", "allows"),
    [
        ([], None, "here.example", True),  # not a browser's cross-site request
        ([], "https://here.example", "here.example", True),
        ([], "http://here.example:8080", "here.example:8080", True),
        ([], "https://here.example", "here.example:443", True),
        ([], "https://evil.example", "here.example", False),
        # Another port of this host is another origin (a Host without a port is the default's).
        ([], "http://here.example:8081", "here.example", False),
        ([], "https://here.example:8443", "here.example:443", False),
        ([], "https://here.example.evil.example", "here.example", False),
        ([], "null", "here.example", False),
        ([], "http://[", "here.example", False),  # urlsplit raises on it: was a plain-text 500
        ([], "http://here.example:99999", "here.example", False),
        ([], "https://here.example", "[", False),
        (["https://good.example"], "https://good.example", "here.example", True),
        (["https://good.example"], "https://good.example:8443", "here.example", False),
        (["*"], "https://anyone.example", "here.example", True),
    ],
)
def test_origins(allowed, origin, host, allows):
    headers = {"Origin": origin} if origin else {}
    policy = OriginPolicy(allowed)
    assert policy.allows(request("127.0.0.1", headers, host)) is allows
    named = policy.cross_site_allowed(request("127.0.0.1", headers, host))
    assert named in ((origin, None) if allows else (None,))


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LIVECOMMENTS_HTTP_ALLOWED_ORIGINS", "https://good.example/path", "allowed_origins"),
        ("LIVECOMMENTS_HTTP_ALLOWED_ORIGINS", "good.example", "allowed_origins"),
        ("LIVECOMMENTS_HTTP_ALLOWED_ORIGINS", "https://Good.example", "allowed_origins"),
        ("LIVECOMMENTS_HTTP_ALLOWED_ORIGINS", "*,https://good.example", "allowed_origins"),
        ("LIVECOMMENTS_HTTP_TRUSTED_PROXIES", "nginx.internal", "trusted_proxies"),
    ],
)
def test_origin_and_proxy_settings_are_checked(variable, value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(None, {variable: value})

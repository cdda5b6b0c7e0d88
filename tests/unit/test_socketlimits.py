"""WebSocket limits on a fake clock: open sockets and new ones per client address, frames per
socket, what an address is, and that the bookkeeping does not outlive the sockets."""

from __future__ import annotations

import pytest

from livecomments import metrics
from livecomments.api.ratelimit import Rate
from livecomments.api.socketlimits import (
    RETRY_AFTER_WS_PER_IP,
    ConnectionLimits,
    FrameRate,
    Refused,
    Ticket,
    address_key,
)
from livecomments.config import LimitsSettings
from tests.unit.test_ratelimit import FakeClock, refused


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # the same host's /64
        ("::ffff:203.0.113.7", "203.0.113.7"),
        (None, ""),
        ("", ""),
        ("/run/livecomments.sock", "/run/livecomments.sock"),
    ],
)
def test_address_key(address: str | None, key: str):
    assert address_key(address) == key


def admitted(result: Ticket | Refused) -> Ticket:
    assert isinstance(result, Ticket), result
    return result


def test_open_sockets_per_address_are_capped_and_released():
    limits = ConnectionLimits(2, Rate(0.0, 1), clock=FakeClock())
    before = refused("ws_per_ip")
    first = admitted(limits.admit("198.51.100.1"))
    admitted(limits.admit("198.51.100.1"))
    assert limits.admit("198.51.100.1") == Refused("ws_per_ip", RETRY_AFTER_WS_PER_IP)
    admitted(limits.admit("198.51.100.2"))  # another address has its own count
    first.release()
    first.release()  # a second release is harmless: it frees one place, once
    assert limits.open_from("198.51.100.1") == 1
    admitted(limits.admit("198.51.100.1"))
    assert isinstance(limits.admit("198.51.100.1"), Refused)
    assert refused("ws_per_ip") == before + 2


def test_addresses_are_forgotten_when_their_last_socket_closes():
    limits = ConnectionLimits(5, Rate(0.0, 1), clock=FakeClock())
    tickets = [admitted(limits.admit(f"10.0.{i // 250}.{i % 250}")) for i in range(1000)]
    assert limits.addresses() == 1000
    for ticket in tickets:
        ticket.release()
    assert limits.addresses() == 0


def test_new_sockets_per_second_per_address():
    clock = FakeClock()
    limits = ConnectionLimits(0, Rate(per_second=2.0, burst=3), clock=clock)
    before = refused("ws_connects_per_ip")
    for _ in range(3):
        admitted(limits.admit("::1"))
    result = limits.admit("::1")
    assert isinstance(result, Refused) and result.limit == "ws_connects_per_ip"
    assert result.retry_after == pytest.approx(0.5)
    admitted(limits.admit("192.0.2.9"))
    clock.advance(0.5)
    admitted(limits.admit("::1"))
    assert refused("ws_connects_per_ip") == before + 1


def test_a_refused_connect_is_not_counted_as_open():
    clock = FakeClock()
    limits = ConnectionLimits(10, Rate(per_second=1.0, burst=1), clock=clock)
    admitted(limits.admit("192.0.2.1"))
    assert isinstance(limits.admit("192.0.2.1"), Refused)
    assert limits.open_from("192.0.2.1") == 1


def test_the_open_limit_is_checked_before_a_connect_token_is_spent():
    clock = FakeClock()
    limits = ConnectionLimits(1, Rate(per_second=1.0, burst=1), clock=clock)
    ticket = admitted(limits.admit("192.0.2.1"))
    clock.advance(1.0)
    assert limits.admit("192.0.2.1") == Refused("ws_per_ip", RETRY_AFTER_WS_PER_IP)
    ticket.release()
    admitted(limits.admit("192.0.2.1"))  # its token was not spent by the refusal


def test_zero_turns_both_connection_limits_off():
    limits = ConnectionLimits(0, Rate(0.0, 1), clock=FakeClock())
    assert all(isinstance(limits.admit("192.0.2.1"), Ticket) for _ in range(500))


def test_from_settings():
    limits = ConnectionLimits.from_settings(
        LimitsSettings(ws_per_ip=1, ws_connects_per_ip_per_second=5, ws_connects_burst=2)
    )
    admitted(limits.admit("192.0.2.1"))
    assert limits.admit("192.0.2.1") == Refused("ws_per_ip", RETRY_AFTER_WS_PER_IP)
    assert limits.max_open == 1


def test_frames_per_second():
    clock = FakeClock()
    frames = FrameRate(Rate(per_second=10.0, burst=5), clock=clock)
    before = refused("frames")
    assert all(frames.allow() for _ in range(5))
    assert not frames.allow()
    clock.advance(0.1)
    assert frames.allow()
    assert not frames.allow()
    assert refused("frames") == before + 2


def test_frames_off_and_from_settings():
    off = FrameRate.from_settings(LimitsSettings(frames_per_second=0))
    assert all(off.allow() for _ in range(10_000))
    default = FrameRate.from_settings(LimitsSettings())
    # The default burst lets a reconnecting socket resubscribe all of its posts at once.
    assert all(default.allow() for _ in range(LimitsSettings().posts_per_socket))


def test_the_metric_names_each_limit():
    names = {"comments", "ws_per_ip", "ws_connects_per_ip", "frames"}
    for name in names:
        metrics.RATE_LIMITED.labels(name)
    text = metrics.render().decode()
    assert all(f'livecomments_rate_limited_total{{limit="{n}"}}' in text for n in names)

"""Process counters and gauges, rendered in the Prometheus text format at /metrics.

Counters only go up; gauges are read when scraped, from the component that owns the value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

# name -> help text; every counter the service increments is declared here.
COUNTERS: dict[str, str] = {
    "comments_accepted_total": "Comments acknowledged (durable in the write-ahead queue).",
    "comments_rejected_total": "POSTs refused because the queue was full or could not commit.",
    "deliveries_total": "Comment events queued to local sockets.",
    "slow_consumer_closes_total": "Sockets closed because their outbox overflowed.",
    "ws_connections_total": "WebSocket connections accepted.",
    "ws_errors_total": "Error events sent to WebSocket clients for bad input.",
    "resyncs_total": "Resync events sent to local subscribers.",
    "redis_published_total": "Events published to Redis for the other instances.",
    "redis_publish_dropped_total": "Events never published: buffer full or retries exhausted.",
    "redis_received_total": "Events received from other instances through Redis.",
    "redis_discarded_total": "Redis messages dropped: malformed, or a retried duplicate.",
    "redis_reconnects_total": "Pub/Sub connections re-established after a loss.",
    "redis_probe_failures_total": "Pub/Sub connections found deaf by the liveness probe.",
    "redis_ring_moves_total": "Local posts moved to another Redis server by a ring change.",
}


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._counters_read: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, by: int = 1) -> None:
        self.counts[name] += by

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A value read when scraped; it may go down."""
        self._gauges[name] = (help_text, read)

    def counter_from(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A counter kept by its component (it only goes up), read when scraped."""
        self._counters_read[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []
        for name, help_text in COUNTERS.items():
            full = f"livecomments_{name}"
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} counter"]
            lines.append(f"{full} {self.counts[name]}")
        for kind, table in (("counter", self._counters_read), ("gauge", self._gauges)):
            for name, (help_text, read) in table.items():
                full = f"livecomments_{name}"
                lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
                lines.append(f"{full} {read():g}")
        return "\n".join(lines) + "\n"

"""Every metric the service exports at /metrics, declared once, as prometheus-client objects.

Module-level objects, not names looked up at run time: a misspelt metric is an AttributeError
at import (and a mypy error), never a counter that silently goes unexported. The default
registry also carries prometheus-client's process collector (`process_resident_memory_bytes`,
`process_open_fds`, CPU seconds) and the Python GC collector.

Names keep the `livecomments_` prefix; counters end in `_total`. Gauges that mirror a
component's state are read when scraped (`bind`), from the component that owns the value.
`*_created` series are turned off: nobody reads them and they double the output.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # type: ignore[no-untyped-call]

# -- the write path -----------------------------------------------------------------------------

COMMENTS_ACCEPTED = Counter(
    "livecomments_comments_accepted", "Comments acknowledged (durable in the write-ahead queue)."
)
COMMENTS_REJECTED = Counter(
    "livecomments_comments_rejected",
    "POSTs refused because the queue was full or could not commit (by code: http_errors).",
)
POST_ACK_SECONDS = Histogram(
    "livecomments_post_ack_seconds",
    "Time from a POST's arrival to its 201 (the comment durable): mostly the group commit.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 2.5),
)
FLUSHED = Counter("livecomments_flushed", "Comments moved into the store.")
FLUSH_ERRORS = Counter("livecomments_flush_errors", "Failed flush attempts.")
ID_COLLISIONS = Counter(
    "livecomments_id_collisions",
    "Acknowledged comments the store could not keep: their id was another comment's.",
)
QUEUE_DEPTH = Gauge("livecomments_queue_depth", "Comments durable but not yet in the store.")
QUEUE_BYTES = Gauge("livecomments_queue_bytes", "Bytes of unflushed comments.")
QUEUE_OLDEST_AGE = Gauge(
    "livecomments_queue_oldest_age_seconds", "Age of the oldest unflushed comment."
)
STORE_UP = Gauge("livecomments_store_up", "1 when the last store operation succeeded.")

# -- HTTP ---------------------------------------------------------------------------------------

HTTP_ERRORS = Counter(
    "livecomments_http_errors", "Error responses by the API's error code.", ["code"]
)

# -- live delivery ------------------------------------------------------------------------------

DELIVERIES = Counter("livecomments_deliveries", "Comment events queued to local sockets.")
FANOUT_SECONDS = Histogram(
    "livecomments_fanout_seconds",
    "Time to offer one event to every local subscriber of its post (no socket is awaited).",
    buckets=(0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
# Was livecomments_resyncs_total: the resync hint is gone; a reset is what remains of it.
RESETS = Counter(
    "livecomments_resets",
    "Viewers told to reload: a gap the stream's history no longer held, or a new epoch.",
)
RECOVERIES = Counter(
    "livecomments_recoveries",
    "Subscribes with a position, by whether the history replayed what they missed.",
    ["recovered"],
)
OUTBOX_UNAPPENDED = Gauge(
    "livecomments_outbox_unappended", "Acknowledged comments not yet in their post's stream."
)
OUTBOX_APPEND_FAILURES = Counter(
    "livecomments_outbox_append_failures",
    "Appends that found their post's shard unreachable (retried; shown locally meanwhile).",
)
# Was livecomments_ws_connections_total: a counter and the gauge below cannot share a name.
WS_CONNECTIONS_ACCEPTED = Counter(
    "livecomments_ws_connections_accepted", "WebSocket connections accepted."
)
WS_CONNECTIONS_OPEN = Gauge("livecomments_ws_connections", "Open WebSocket connections.")
CONNECTIONS_OPEN = Gauge(
    "livecomments_connections",
    "Open TCP connections (WebSockets, requests, idle keep-alive), against limits.max_connections.",
)
CONNECTIONS_REFUSED = Counter(
    "livecomments_connections_refused",
    "Connections closed as they were made because limits.max_connections were open.",
)
WS_ERRORS = Counter(
    "livecomments_ws_errors", "Error events sent to WebSocket clients, by error code.", ["code"]
)
WS_CLOSES = Counter(
    "livecomments_ws_closes", "WebSockets closed by the server, by close code.", ["code"]
)
SLOW_CONSUMER_CLOSES = Counter(
    "livecomments_slow_consumer_closes", "Sockets closed because their outbox overflowed."
)
POSTS_FOLLOWED = Gauge("livecomments_posts_followed", "Posts with local subscribers.")

# -- Redis --------------------------------------------------------------------------------------

REDIS_PUBLISHED = Counter(
    "livecomments_redis_published", "Comments appended to their stream on a Redis shard."
)
REDIS_PUBLISH_SECONDS = Histogram(
    "livecomments_redis_publish_seconds",
    "Round trip of one pipelined batch of appends (the APPEND script: offset, history, PUBLISH).",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0),
)
REDIS_RECEIVED = Counter(
    "livecomments_redis_received", "Publications received through Redis Pub/Sub."
)
REDIS_DISCARDED = Counter("livecomments_redis_discarded", "Redis messages dropped as malformed.")
REDIS_RECONNECTS = Counter(
    "livecomments_redis_reconnects",
    "Pub/Sub connections re-established after a loss, by shard.",
    ["shard"],
)
REDIS_PROBE_FAILURES = Counter(
    "livecomments_redis_probe_failures",
    "Pub/Sub connections found deaf by the liveness probe, by shard.",
    ["shard"],
)
REDIS_RING_MOVES = Counter(
    "livecomments_redis_ring_moves", "Local posts moved to another Redis server by a ring change."
)
REDIS_RING_SWEPT = Counter(
    "livecomments_redis_ring_swept_posts",
    "Posts whose keys a ring sweep deleted from a Redis server, by reason: moved_away (the ring "
    "maps the post elsewhere), stale (an epoch from before the post moved back), retired (the "
    "server left the ring).",
    ["reason"],
)
REDIS_RING_SWEEP_FAILURES = Counter(
    "livecomments_redis_ring_sweep_failures",
    "Ring sweeps of one Redis server given up after their retries (logged).",
)
REDIS_SHARD_UP = Gauge(
    "livecomments_redis_shard_up", "1 while the shard's Pub/Sub session is up, by shard.", ["shard"]
)


def bind(gauge: Gauge, read: Callable[[], float]) -> None:
    """Read `gauge` from its owner when scraped (the owner of the latest app, in tests)."""
    gauge.set_function(read)


def render() -> bytes:
    """The Prometheus text exposition of every metric above and the process collectors."""
    return generate_latest(REGISTRY)


# -- trust: authentication and rate limits ------------------------------------------------------

AUTHENTICATIONS = Counter(
    "livecomments_auth",
    "Credentials examined, by result: anonymous, token, server_key (accepted), or the refusal's "
    "code (unauthenticated, invalid_token, token_expired).",
    ["result"],
)
JWKS_FETCHES = Counter(
    "livecomments_jwks_fetches", "Fetches of the issuer's JWKS, by result (ok, error).", ["result"]
)
RATE_LIMITED = Counter(
    "livecomments_rate_limited",
    "Requests, upgrades and frames refused by a rate limit, by limit: comments, ws_per_ip, "
    "ws_connects_per_ip, frames.",
    ["limit"],
)
RATE_LIMIT_FALLBACKS = Counter(
    "livecomments_rate_limit_fallbacks",
    "Rate-limit decisions made by the local bucket because Redis failed or was recently down.",
    ["limit"],
)

"""Settings: `config.toml`, overridden key by key by `LIVECOMMENTS_<SECTION>_<KEY>` variables.

Every key has a default here and a documented line in the root `config.toml`; a key that is
unknown, of the wrong type or out of range raises `ConfigError` naming it, so a typo never
silently falls back to a default. Paths come out absolute: a relative one written in the file is
relative to the file's directory, any other to the working directory.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

# Re-exported (`as`, for mypy): the rooms that read settings import every section from here.
from livecomments.config_trust import AuthSettings as AuthSettings  # noqa: PLC0414
from livecomments.config_trust import check_auth, check_origins, check_proxies
from livecomments.urls import REDIS_PREFIXES, SQLITE_PREFIX, store_scheme

ENV_PREFIX = "LIVECOMMENTS_"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ConfigError(Exception):
    """A setting is unusable; the message names the key (`section.key`) and why."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    # 0-1023, part of every comment id: it must differ between instances sharing a store.
    # -1: claim a free one, leased in the store (lease.py).
    instance_id: int = -1
    # Seconds a drain (SIGTERM, SIGUSR1) spreads its sockets' reconnects over.
    drain_seconds: float = 10.0
    # Seconds, after the drain, the outbox gets to reach the shards and the database.
    shutdown_timeout: float = 10.0


@dataclass(frozen=True)
class HttpSettings:
    # Seconds a connection may take to send a complete request head, from connecting or from
    # its previous response: slow senders (slowloris) and idle keep-alive connections are
    # closed past it.
    idle_timeout: float = 15.0
    # Seconds a request body may take to arrive once its head has; past it, 408.
    body_timeout: float = 15.0
    # Origins (scheme://host[:port]) whose pages may use the API from a browser; empty: only
    # pages served by this host itself; ["*"]: any page (api/origins.py).
    allowed_origins: list[str] = field(default_factory=list)
    # Peers whose X-Forwarded-For names the client (api/peer.py): nginx on this host by default.
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])


@dataclass(frozen=True)
class StoreSettings:
    url: str = "sqlite:///data/comments.db"


@dataclass(frozen=True)
class QueueSettings:
    dir: str = "data/queue"
    # Upper bound on unflushed comment bytes; past it POST answers 503 + Retry-After.
    max_bytes: int = 256 * 1024 * 1024
    # Comments moved to the store per flush.
    flush_batch: int = 1000
    # Cap of the flusher's retry backoff, seconds.
    retry_max: float = 10.0


@dataclass(frozen=True)
class LimitsSettings:
    id_max_chars: int = 64
    message_max_chars: int = 2000
    # At least what the longest message needs in its most expensive encoding (see
    # min_body_bytes); 32 KiB covers the default 2000 characters.
    body_max_bytes: int = 32 * 1024
    ws_frame_max_bytes: int = 16 * 1024
    page_default: int = 50
    page_max: int = 200
    posts_per_socket: int = 100
    # Bytes of recent comments kept to answer POST retries that repeat a client_msg_id.
    retry_window_bytes: int = 16 * 1024 * 1024
    # Posts one instance follows at once (each is a Pub/Sub channel when Redis is on).
    posts_per_instance: int = 100_000
    max_connections: int = 20_000
    # Rate limits (api/ratelimit.py); 0 turns one off. Comments per author (shared through Redis
    # when redis.urls is set), a token bucket: `comments_per_minute` refill, `comments_burst` size.
    comments_per_minute: float = 20.0
    comments_burst: int = 10
    # Per client address (IPv6: its /64), per instance: open WebSockets, and new ones per second.
    ws_per_ip: int = 50
    ws_connects_per_ip_per_second: float = 10.0
    ws_connects_burst: int = 20
    # Per socket: frames from the client per second; past it the socket is closed (1008). The
    # burst must let a reconnecting socket resubscribe all of its posts_per_socket at once.
    frames_per_second: float = 20.0
    frames_burst: int = 120


@dataclass(frozen=True)
class WebSocketSettings:
    # Seconds between server pings; a peer that misses a pong for half of it is dropped.
    heartbeat: float = 30.0
    # Bytes queued in the process for one socket (not yet taken by the kernel) before it is
    # closed as a slow consumer (4008).
    outbox_max_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class RedisSettings:
    # Redis servers keeping the posts' streams, e.g. ["redis://127.0.0.1:6379/0"]. Empty: one
    # instance, its streams in memory. Posts are spread over them by a ring (live/redis/ring.py).
    urls: list[str] = field(default_factory=list)
    # Seconds between liveness probes of each Pub/Sub connection; a connection that does not
    # echo a probe within this interval is re-established (and its posts' gaps filled).
    probe_interval: float = 5.0
    # Seconds to connect to / wait on a Redis command (not the Pub/Sub read, which blocks).
    timeout: float = 2.0


@dataclass(frozen=True)
class HistorySettings:
    # Publications kept per post for clients that come back (recovery) and for GET on any node.
    size: int = 2000
    # Seconds a publication is kept (in Redis: since the post's last publication).
    ttl: float = 600.0
    # Seconds a post's position (epoch and offset) outlives its last use; past it, the post's
    # next comment starts a new epoch (its viewers reload once).
    meta_ttl: float = 86400.0


@dataclass(frozen=True)
class LogSettings:
    level: LogLevel = "INFO"


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    log: LogSettings = field(default_factory=LogSettings)


# Range checks, by `section.key`: (minimum, maximum), inclusive.
_RANGES: dict[str, tuple[float, float]] = {
    "server.port": (0, 65535),
    "server.instance_id": (-1, 1023),
    "server.shutdown_timeout": (0, 3600),
    "server.drain_seconds": (0, 3600),
    "http.idle_timeout": (0.5, 3600),
    "http.body_timeout": (0.5, 3600),
    "queue.max_bytes": (1024, 1 << 50),
    "queue.flush_batch": (1, 100_000),
    "queue.retry_max": (0.01, 3600),
    "limits.id_max_chars": (1, 256),
    "limits.message_max_chars": (1, 100_000),
    "limits.body_max_bytes": (256, 16 * 1024 * 1024),
    "limits.ws_frame_max_bytes": (256, 16 * 1024 * 1024),
    "limits.page_default": (1, 10_000),
    "limits.page_max": (1, 10_000),
    "limits.posts_per_socket": (1, 100_000),
    "limits.posts_per_instance": (1, 10_000_000),
    "limits.retry_window_bytes": (0, 1 << 40),
    "limits.max_connections": (1, 1_000_000),
    "limits.comments_per_minute": (0, 1_000_000),
    "limits.comments_burst": (1, 1_000_000),
    "limits.ws_per_ip": (0, 1_000_000),
    "limits.ws_connects_per_ip_per_second": (0, 1_000_000),
    "limits.ws_connects_burst": (1, 1_000_000),
    "limits.frames_per_second": (0, 1_000_000),
    "limits.frames_burst": (1, 1_000_000),
    "auth.leeway": (0, 300),
    "auth.delete_window": (0, 365 * 86400),
    "history.size": (1, 1_000_000),
    "history.ttl": (1, 7 * 86400),
    "history.meta_ttl": (60, 365 * 86400),
    "redis.probe_interval": (0.05, 3600),
    "redis.timeout": (0.05, 600),
    "websocket.heartbeat": (0.1, 3600),
    "websocket.outbox_max_bytes": (1024, 1 << 32),
}


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read `path` (if given), then apply `LIVECOMMENTS_*` variables over it.

    The paths in the result are absolute (see `_resolve_paths`): relative ones written in the
    file are relative to the file's directory, the others to the working directory."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    env = os.environ if environ is None else environ
    return _resolve_paths(_build(raw, env), raw, env, path)


def _build(raw: dict[str, Any], env: Mapping[str, str]) -> Settings:
    sections: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(Settings)}
    _check_env_names(env)
    for name in raw:
        if name not in known:
            raise ConfigError(f"{name}: unknown section")
    for name, fld in known.items():
        cls = fld.type if isinstance(fld.type, type) else get_type_hints(Settings)[name]
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: expected a table")
        sections[name] = _build_section(name, cls, table, env)
    settings = Settings(**sections)
    _check_relations(settings)
    return settings


def _check_env_names(env: Mapping[str, str]) -> None:
    """A misspelt variable must not silently leave the default in place (as a misspelt key in
    the file does not)."""
    hints = get_type_hints(Settings)
    valid = {
        f"{ENV_PREFIX}{section}_{f.name}".upper()
        for section in hints
        for f in dataclasses.fields(hints[section])
    }
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in valid:
            raise ConfigError(f"{name}: unknown setting (see config.toml for the keys)")


def _build_section(section: str, cls: type, table: dict[str, Any], env: Mapping[str, str]) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in names:
            raise ConfigError(f"{section}.{key}: unknown key")
    values: dict[str, Any] = {}
    for key in names:
        dotted = f"{section}.{key}"
        env_name = f"{ENV_PREFIX}{section}_{key}".upper()
        if env_name in env:
            values[key] = _from_env(dotted, hints[key], env[env_name])
        elif key in table:
            values[key] = _coerce(dotted, hints[key], table[key])
    return cls(**values)


def _from_env(dotted: str, hint: Any, text: str) -> Any:
    """Environment values are strings; turn them into the key's type before checking it."""
    if get_origin(hint) is list:
        return _coerce(dotted, hint, [p.strip() for p in text.split(",") if p.strip()])
    if hint in (int, float):
        try:
            return _coerce(dotted, hint, hint(text))
        except ValueError:
            raise ConfigError(f"{dotted}: expected a number, got {text!r}") from None
    return _coerce(dotted, hint, text)


def _coerce(dotted: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{dotted}: expected one of {', '.join(allowed)}, got {value!r}")
        return value
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{dotted}: expected a list of {item.__name__}")
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{dotted}: expected {hint.__name__}, got {value!r}")
    if dotted in _RANGES:
        low, high = _RANGES[dotted]
        if not low <= value <= high:
            raise ConfigError(f"{dotted}: must be between {low:g} and {high:g}, got {value!r}")
    return value


# Bytes one character of a message can take on the wire: a non-BMP character (an emoji) is
# "\ud83d\ude00" in ASCII-escaped JSON and "%F0%9F%98%80" in a form, 12 bytes either way.
MAX_BYTES_PER_CHAR = 12
# Field names, quotes and separators of the largest body, beyond the message and the ids.
BODY_OVERHEAD = 512
# Id-like fields of a comment body: post_id, uid, parent_id, reply_to, client_msg_id.
ID_FIELDS = 5


def min_body_bytes(limits: LimitsSettings) -> int:
    """The smallest body limit that admits every comment the other limits admit, in every
    encoding we accept (ids are ASCII and need no escaping)."""
    return (
        MAX_BYTES_PER_CHAR * limits.message_max_chars
        + ID_FIELDS * limits.id_max_chars
        + BODY_OVERHEAD
    )


def _check_relations(s: Settings) -> None:
    if s.limits.page_default > s.limits.page_max:
        raise ConfigError("limits.page_default: must not exceed limits.page_max")
    if s.history.meta_ttl < s.history.ttl:
        raise ConfigError("history.meta_ttl: must be at least history.ttl")
    if s.limits.body_max_bytes < min_body_bytes(s.limits):
        raise ConfigError(
            f"limits.body_max_bytes: must be at least {min_body_bytes(s.limits)} so that a "
            f"message of limits.message_max_chars ({s.limits.message_max_chars}) characters "
            "fits in every accepted encoding, got "
            f"{s.limits.body_max_bytes}"
        )
    url = s.store.url
    try:
        store_scheme(url)
    except ValueError as e:
        raise ConfigError(f"store.url: {e}") from None
    if not s.queue.dir:
        raise ConfigError("queue.dir: must not be empty")
    for url in s.redis.urls:
        if not url.startswith(REDIS_PREFIXES):
            raise ConfigError(f"redis.urls: expected redis://host:port[/db], got {url!r}")
    if len(set(s.redis.urls)) != len(s.redis.urls):
        raise ConfigError("redis.urls: lists the same server twice")
    if s.limits.frames_per_second and s.limits.frames_burst < s.limits.posts_per_socket:
        raise ConfigError(
            "limits.frames_burst: must be at least limits.posts_per_socket "
            f"({s.limits.posts_per_socket}): a reconnecting socket resubscribes all its posts"
        )
    try:
        check_auth(s.auth)
        check_origins(s.http.allowed_origins)
        check_proxies(s.http.trusted_proxies)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _resolve_paths(
    settings: Settings, raw: dict[str, Any], env: Mapping[str, str], path: str | Path | None
) -> Settings:
    """Make `queue.dir`, `auth.public_key` and the path of a `sqlite:///relative.db` store URL
    absolute, once, so that the queue, the store and `migrate` use the same files whatever their
    working directory.

    A relative path written in the config file is relative to the file's directory: a service
    manager that starts the process elsewhere (systemd without `WorkingDirectory` starts it in
    `/`) still finds the data next to its config. A relative path from a `LIVECOMMENTS_*`
    variable, or a default the file does not set, is relative to the working directory, as a
    path typed on a command line is. Absolute paths and non-SQLite URLs are kept as written."""
    cwd = Path.cwd()
    # Not .resolve(): a symlinked config file's directory is the link's, as the user wrote it.
    file_dir = cwd if path is None else (cwd / path).parent

    def base(section: str, key: str) -> Path:
        in_file = key in raw.get(section, {})
        return file_dir if in_file and f"{ENV_PREFIX}{section}_{key}".upper() not in env else cwd

    queue_dir = settings.queue.dir
    if not os.path.isabs(queue_dir):
        queue_dir = str(base("queue", "dir") / queue_dir)
    url = settings.store.url
    if url.startswith(SQLITE_PREFIX) and not os.path.isabs(url[len(SQLITE_PREFIX) :]):
        url = SQLITE_PREFIX + str(base("store", "url") / url[len(SQLITE_PREFIX) :])
    public_key = settings.auth.public_key
    if public_key and not os.path.isabs(public_key):
        public_key = str(base("auth", "public_key") / public_key)
    if public_key and not os.access(public_key, os.R_OK):
        raise ConfigError(f"auth.public_key: cannot read {public_key}")
    return dataclasses.replace(
        settings,
        queue=dataclasses.replace(settings.queue, dir=queue_dir),
        store=dataclasses.replace(settings.store, url=url),
        auth=dataclasses.replace(settings.auth, public_key=public_key),
    )

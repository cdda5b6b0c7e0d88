"""What the app holds, by typed key: every long-lived resource a handler reaches.

Set once: SETTINGS, RECENT, CONNS, BATCHER, LIFECYCLE, HUB, ADDRESSES and SOCKET_LIMITS by
`create_app`; AUTH and COMMENT_BUCKETS by the trust context, LOG by the durable log's, IDS and
LEASE by the instance-id context, PUBLISHER by the outbox's (app.py), before the first request.
"""

from __future__ import annotations

from aiohttp import web

from livecomments.api.auth import Authenticator
from livecomments.api.dedupe import RecentRequests
from livecomments.api.lifecycle import Lifecycle
from livecomments.api.peer import ClientAddresses
from livecomments.api.ratelimit import Buckets
from livecomments.api.socketlimits import ConnectionLimits
from livecomments.config import Settings
from livecomments.live.conn import Conn, WriteBatcher
from livecomments.live.hub import Hub
from livecomments.model.ids import SnowflakeGenerator
from livecomments.storage.lease import InstanceLease
from livecomments.storage.log import DurableLog
from livecomments.storage.publisher import StreamPublisher

SETTINGS = web.AppKey("settings", Settings)
LOG = web.AppKey("durable_log", DurableLog)
IDS = web.AppKey("ids", SnowflakeGenerator)
LEASE = web.AppKey("lease", InstanceLease)
PUBLISHER = web.AppKey("publisher", StreamPublisher)
HUB = web.AppKey("hub", Hub)
RECENT = web.AppKey("recent", RecentRequests)
CONNS = web.AppKey[set[Conn]]("conns")
BATCHER = web.AppKey("batcher", WriteBatcher)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
AUTH = web.AppKey("auth", Authenticator)
COMMENT_BUCKETS = web.AppKey[Buckets]("comment_buckets")
ADDRESSES = web.AppKey("addresses", ClientAddresses)
SOCKET_LIMITS = web.AppKey("socket_limits", ConnectionLimits)

"""What the app holds, by typed key: every long-lived resource a handler reaches.

Set once: SETTINGS, RECENT, CONNS, BATCHER, LIFECYCLE and HUB by `create_app`; LOG by the durable
log's context, IDS and LEASE by the instance-id context, PUBLISHER by the outbox's (app.py),
before the first request.
"""

from __future__ import annotations

from aiohttp import web

from livecomments.api.dedupe import RecentRequests
from livecomments.api.lifecycle import Lifecycle
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

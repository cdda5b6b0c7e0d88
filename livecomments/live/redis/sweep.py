"""Ring sweeps: after a ring change, no shard continues a position from a post's earlier stay.

The problem. A post's position (`livecomments:{P}:m`, streams.py) stays on its shard for
`history.meta_ttl` after its last use. A post that moves A -> B and later back to A (a server
added then removed; or removed and added back) would find its old `:m` on A and continue that
epoch: a client away the whole time comes back with its old position, is told `recovered`, and
silently misses what was published while the post lived on B. The promise is every comment
exactly once, or a plain `reset`.

**The rule.** A ring change `c` that moves post P onto shard S (the ring before `c` maps P
elsewhere, or does not list S) makes every epoch of P on S created before `c` was applied
*stale*: it is from an earlier stay, and lacks what was published meanwhile. APPEND and HISTORY
record when they create an epoch (`at` in `:m`: Redis `TIME`, ms); an `:m` without `at` (older
code) counts as stale. And the keys of a post that the ring maps elsewhere do not belong on S.
Deleting a post's keys costs at most an epoch change (its viewers get a `reset`); keeping a
stale epoch risks a silent miss. Where the two cannot be told apart, we delete.

**The guard** (hot path, only while needed). From the moment this node applies a change until
its sweep of S completes, every APPEND, HISTORY and RECENT of a post that a pending change moved
onto S is preceded, in the same pipeline, by `DROP_STALE`: one atomic script that unlinks all
the post's keys if its epoch is older than the rule allows (`max_age_ms`). So a stale epoch is
never served, from the first request after the reload, however far the sweep has got: the sweep
lets the guard stop, it does not make the rule hold. Other posts pay a ring lookup (about a
microsecond) while a change is pending, nothing after.

**The sweep** (background: neither the reload nor delivery waits for it). Per shard,
concurrently, on its own connection: `SCAN` for `livecomments:{*}:m`, `SCAN_COUNT` per step,
`PAUSE` between steps, `redis.timeout` on every call; per step one pipeline that, on a shard of
the new ring, UNLINKs the posts the ring maps elsewhere and runs DROP_STALE (the guard's own
check: an epoch created since the change is never deleted) for the posts a pending change moved
onto it. On an *added* shard every post counts as moved onto it, so what it kept from an earlier
membership goes, and what nodes already on the new ring created there stays. On a shard no
longer listed, if it answers, every post's keys go (best effort: nothing depends on it). A shard
that fails is retried from its last cursor, `ATTEMPTS` times in all with backoff, then logged
and counted; its changes stay pending (still guarded) and the next ring change sweeps it again.
A change applied during a sweep restarts it over every pending change: the latest change that
moved a post onto S decides, so a rollback before the first sweep finished is covered.

**Why nothing is silently missed.** A -> B -> A: the change back moved P onto A, so the epoch
the away client holds is stale; the guard drops it at the first request and the client gets
`recovered: false`. A server removed while down, added back later: the change that adds it has
an old ring without it, so everything it kept is stale; no flush needed. Several nodes sweeping
at once repeat each other's work (UNLINK; DROP_STALE decides by age alone). A straggler still on
the old ring may write a moved post's keys to its old shard after the others swept it: its own
sweep removes them when it reloads, nobody on the new ring reads them meanwhile, and should the
post ever move back, that change makes them stale. Commands in flight at the switch leave the
same kind of garbage, with the same end (or `meta_ttl`).

**The margin.** Nodes apply a change seconds apart; an epoch that a node already on the new ring
created on S shortly before this node applied the change is fresh. So this node takes for stale
only epochs created more than `MARGIN` before it applied the change, and never more than the time
since its own previous change (an epoch from a stay that ended then is stale, however quick the
rollback). A node reloading more than `MARGIN` after another deletes the other's new epochs:
one more `reset` for their viewers, never a miss.

**Clocks.** Only ages are compared, never two machines' clocks: a script measures an epoch's age
on its server's clock (`TIME` - `at`), the node the time since it applied the change on its
monotonic clock. The limit is computed when a request is queued and checked when Redis runs it,
which errs towards deleting. A Redis clock stepped back by more than the margin would make old
epochs look young: not covered.

Not covered either: a server list changed by *restarting* the nodes, not by SIGHUP, applies no
change: nothing is swept or guarded. A server added back that way must first lose our keys
(FLUSHDB, or stay out of the ring for `history.meta_ttl`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from livecomments import metrics
from livecomments.backoff import Backoff
from livecomments.live.redis import streams
from livecomments.live.redis.client import close_fully
from livecomments.live.redis.ring import Ring
from livecomments.urls import redact_url

log = logging.getLogger(__name__)

# Keys SCAN looks at per step (a hint to Redis: about this many), and the pause between steps:
# each step is a SCAN and one pipeline of at most a step's posts, well under a millisecond of
# Redis's time per 1000 keys, so the pause keeps a sweep to a small share of the server.
SCAN_COUNT = 1000
PAUSE = 0.01
# Attempts per shard, and the backoff between them (seconds): 7.5 to 15 s of waiting in all.
ATTEMPTS = 5
RETRY_BASE = 1.0
RETRY_CAP = 8.0
# Seconds before this node applied a change during which an epoch on the post's new shard still
# counts as created by a node already on the new ring (see the module docstring).
MARGIN = 10.0

MATCH = "livecomments:{*}:m"
_PREFIX, _SUFFIX = b"livecomments:{", b"}:m"

Reason = Literal["moved_away", "stale", "retired"]
REASONS: tuple[Reason, ...] = ("moved_away", "stale", "retired")
SweepState = Literal["waiting", "sweeping", "retrying", "done", "failed"]

# KEYS: the post's keys, `:m` first (streams.keys). ARGV[1]: the oldest, in ms, an epoch may be
# and still be continued. Unlinks every key if `:m` is older (or has no `at`); 1 if it did.
DROP_STALE = """
local at = redis.call('HGET', KEYS[1], 'at')
if at then
  local now = redis.call('TIME')
  if now[1] * 1000 + math.floor(now[2] / 1000) - tonumber(at) <= tonumber(ARGV[1]) then
    return 0
  end
elseif redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('UNLINK', unpack(KEYS))
return 1
"""


def post_of_key(key: bytes | str) -> str | None:
    """`livecomments:{P}:m` -> P (redis-py gives bytes: no `decode_responses`)."""
    if isinstance(key, str):
        key = key.encode()
    if not (key.startswith(_PREFIX) and key.endswith(_SUFFIX)):
        return None
    return key[len(_PREFIX) : -len(_SUFFIX)].decode(errors="replace")


class RingChange:
    """One ring change as this node applied it. Shards are named by their URL without
    credentials (`redact_url`), as the ring places them: a new password is not a new shard."""

    __slots__ = ("applied", "margin", "new", "new_names", "old", "old_names")

    def __init__(self, old: Ring, new: Ring, applied: float, margin: float) -> None:
        self.old, self.new = old, new
        self.old_names = {url: redact_url(url) for url in old.urls}
        self.new_names = {url: redact_url(url) for url in new.urls}
        self.applied = applied  # time.monotonic()
        self.margin = margin

    def moved_onto(self, post_id: str, name: str) -> bool:
        """The ring before this change put the post elsewhere (or did not list `name`)."""
        return self.old_names[self.old.node_for(post_id)] != name

    def owner(self, post_id: str) -> str:
        return self.new_names[self.new.node_for(post_id)]


@dataclass
class ShardSweep:
    """One shard's latest sweep, for /readyz and the tests."""

    name: str
    retired: bool
    state: SweepState = "waiting"
    attempts: int = 0
    cursor: int = 0
    scanned: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    last_error: str | None = None

    def status(self) -> dict[str, object]:
        shown = {k: v for k, v in vars(self).items() if k not in ("name", "cursor", "started")}
        return {"url": self.name, **shown, "dropped": dict(self.dropped)}

    def summary(self) -> str:
        d = self.dropped
        return (
            f"{'no longer in the ring, ' if self.retired else ''}{self.seconds} s, "
            f"{self.attempts} attempt(s), {self.scanned} positions scanned, posts dropped: "
            f"{d['moved_away']} moved away, {d['stale']} stale, {d['retired']} retired"
            f"{f' (last error: {self.last_error})' if self.last_error else ''}"
        )


class RingSweeper:
    """Applies the rule of the module docstring: the guard (`max_age_ms`) and the sweeps.

    `connect(url)` opens a connection for one shard's sweep (closed when it ends); `timeout()`
    is the current `redis.timeout`. The tuning attributes are the module's constants; tests
    shrink them."""

    def __init__(self, connect: Callable[[str], Redis], timeout: Callable[[], float]) -> None:
        self.connect = connect
        self._timeout = timeout
        self.scan_count = SCAN_COUNT
        self.pause = PAUSE
        self.attempts = ATTEMPTS
        self.retry_base = RETRY_BASE
        self.retry_cap = RETRY_CAP
        self.margin = MARGIN
        # By shard name: the changes whose sweep of it has not completed, oldest first.
        self._pending: dict[str, list[RingChange]] = {}
        # By shard name, its URL: shards the ring no longer lists, to be emptied once.
        self._retired: dict[str, str] = {}
        self._latest: RingChange | None = None
        # The sweep under way, and any cancelled one still closing its connections.
        self._tasks: set[asyncio.Task[None]] = set()
        self.sweeps: dict[str, ShardSweep] = {}

    # -- the guard -----------------------------------------------------------------------------

    def max_age_ms(self, post_id: str, name: str) -> int | None:
        """None if the post's epoch on shard `name` can be trusted as it is; otherwise the age
        (ms) past which it is stale, for DROP_STALE before the post's next script there."""
        changes = self._pending.get(name)
        if not changes:
            return None
        # The latest change that moved the post onto this shard decides: the changes after it
        # kept the post here.
        for change in reversed(changes):
            if change.moved_onto(post_id, name):
                return max(0, int((time.monotonic() - change.applied + change.margin) * 1000))
        return None

    # -- ring changes --------------------------------------------------------------------------

    def ring_changed(self, old: Ring, new: Ring) -> None:
        """Called by the broker in the same step that switches its ring (so the guard holds
        from the first request on the new ring). Starts the sweep; never waits for it."""
        now = time.monotonic()
        margin = self.margin
        if self._latest is not None:
            margin = min(margin, now - self._latest.applied)
        change = RingChange(old, new, now, margin)
        self._latest = change
        names = set(change.new_names.values())
        for name in set(self._pending) - names:
            del self._pending[name]  # added back later, the change that adds it covers it
        for name in names:
            self._pending.setdefault(name, []).append(change)
            self._retired.pop(name, None)
        for url, name in change.old_names.items():
            if name not in names:
                self._retired[name] = url
        previous = set(self._tasks)
        self._cancel()
        task = asyncio.create_task(self._sweep_worker(previous), name="redis-ring-sweep")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel(self) -> None:
        # Once each: a second cancel would interrupt a cancelled sweep closing its connection.
        for task in self._tasks:
            if not task.cancelling():
                task.cancel()

    async def stop(self) -> None:
        self._cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def sweeping(self) -> bool:
        return any(not (task.done() or task.cancelling()) for task in self._tasks)

    def status(self) -> dict[str, object]:
        return {
            "sweeping": self.sweeping,
            "pending": {name: len(c) for name, c in self._pending.items() if c},
            "shards": [sweep.status() for sweep in self.sweeps.values()],
        }

    # -- the sweep -----------------------------------------------------------------------------

    async def _sweep_worker(self, previous: set[asyncio.Task[None]]) -> None:
        if previous:  # cancelled: let them close their connections first (wait, not gather:
            await asyncio.wait(previous)  # cancelling this one must not cancel them again)
        try:
            await self._sweep_all()
        except Exception:
            # A bug outside any one shard's sweep: logged, never a silent death. The changes stay
            # pending (the guard holds) and the next ring change sweeps again.
            log.exception("redis: ring sweep failed")

    async def _sweep_all(self) -> None:
        latest = self._latest
        assert latest is not None
        jobs: list[tuple[str, str, Sequence[RingChange] | None]] = [
            (name, url, None) for name, url in self._retired.items()
        ]
        urls = {name: url for url, name in latest.new_names.items()}
        jobs += [(name, urls[name], list(c)) for name, c in self._pending.items() if c]
        self.sweeps = {name: ShardSweep(name, retired=c is None) for name, _, c in jobs}
        done = await asyncio.gather(
            *(self._sweep_shard(self.sweeps[name], url, latest) for name, url, _ in jobs)
        )
        for (name, url, changes), ok in zip(jobs, done, strict=True):
            if changes is None:
                # Best effort, once: if it is ever added back, that change covers it.
                if self._retired.get(name) == url:
                    del self._retired[name]
            elif ok and name in self._pending:  # an empty list: nothing guarded any more
                self._pending[name] = [c for c in self._pending[name] if c not in changes]

    async def _sweep_shard(self, sweep: ShardSweep, url: str, latest: RingChange) -> bool:
        """One shard, retried from its last cursor; True once every step succeeded."""
        backoff = Backoff(self.retry_base, self.retry_cap)
        while True:
            sweep.attempts += 1
            sweep.state = "sweeping"
            try:
                await self._scan(sweep, url, latest)
            except (RedisError, OSError, TimeoutError) as e:
                sweep.last_error = f"{type(e).__name__}: {e}"
            except Exception as e:
                # A bug: logged with its traceback, and treated like a failure (retried, then
                # given up): the sweep must not die silently, nor take the other shards along.
                log.exception("redis: ring sweep of %s failed", sweep.name)
                sweep.last_error = f"{type(e).__name__}: {e}"
            else:
                sweep.state = "done"
                sweep.seconds = round(time.monotonic() - sweep.started, 3)
                log.info("redis: ring sweep of %s done: %s", sweep.name, sweep.summary())
                return True
            if sweep.attempts >= self.attempts:
                sweep.state = "failed"
                sweep.seconds = round(time.monotonic() - sweep.started, 3)
                metrics.REDIS_RING_SWEEP_FAILURES.inc()
                then = "its keys stay until they expire (history.meta_ttl)"
                if not sweep.retired:
                    then = "its moved posts stay guarded; the next ring change sweeps it again"
                log.error(
                    "redis: ring sweep of %s gave up: %s; %s", sweep.name, sweep.summary(), then
                )
                return False
            sweep.state = "retrying"
            delay = backoff.next()
            log.warning(
                "redis: ring sweep of %s: attempt %d failed (%s); again in %.1f s",
                sweep.name,
                sweep.attempts,
                sweep.last_error,
                delay,
            )
            await asyncio.sleep(delay)

    async def _scan(self, sweep: ShardSweep, url: str, latest: RingChange) -> None:
        client = self.connect(url)
        try:
            drop_stale = client.register_script(DROP_STALE)
            while True:
                async with asyncio.timeout(self._timeout()):
                    cursor, found = await client.scan(
                        sweep.cursor, match=MATCH, count=self.scan_count
                    )
                if found:
                    await self._drop(client, drop_stale, sweep, latest, found)
                sweep.scanned += len(found)
                sweep.cursor = cursor  # a retry resumes here: SCAN cursors are stateless
                if cursor == 0:
                    return
                await asyncio.sleep(self.pause)
        finally:
            await close_fully(client.aclose)

    async def _drop(
        self,
        client: Redis,
        drop_stale: Any,
        sweep: ShardSweep,
        latest: RingChange,
        found: Iterable[bytes | str],
    ) -> None:
        """One pipeline for one SCAN step's posts."""
        reasons: list[Reason] = []
        async with asyncio.timeout(self._timeout()):
            async with client.pipeline(transaction=False) as pipe:
                for key in found:
                    post_id = post_of_key(key)
                    if post_id is None:
                        continue
                    keys = streams.keys(post_id)
                    if sweep.retired:
                        reason: Reason = "retired"
                    elif latest.owner(post_id) != sweep.name:
                        reason = "moved_away"
                    else:
                        age = self.max_age_ms(post_id, sweep.name)
                        if age is None:
                            continue
                        await drop_stale(keys=keys, args=[age], client=pipe)
                        reasons.append("stale")
                        continue
                    pipe.unlink(*keys)
                    reasons.append(reason)
                replies = await pipe.execute() if reasons else []
        for reason, reply in zip(reasons, replies, strict=True):
            if reply:  # 0: gone already (another node's sweep, the guard, a TTL) or kept
                sweep.dropped[reason] += 1
                metrics.REDIS_RING_SWEPT.labels(reason).inc()

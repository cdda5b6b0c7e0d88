"""The channels of one Pub/Sub session: which it wants, which Redis confirmed, which are in flight.

Kept apart from the session (pubsub.py) so the bookkeeping, the part that races (a subscribe
waiting while an unsubscribe for the same post is in flight, a subscribe that gave up while the
hub kept its post), can be read in one place. Channel names, not post ids; the session's probe
channel is among them. Nothing here awaits: the session sends the commands.
"""

from __future__ import annotations

import asyncio


class Channels:
    def __init__(self) -> None:
        self.wanted: set[str] = set()
        self.confirmed: set[str] = set()  # Redis confirmed SUBSCRIBE, no UNSUBSCRIBE since
        self.pending_sub: set[str] = set()  # sent, not yet confirmed
        self.pending_unsub: set[str] = set()
        self.settled = asyncio.Event()  # nothing pending, or the reader ended
        self.dirty = asyncio.Event()  # wanted changed: the session's command worker has work
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Channels whose subscribe gave up while the hub kept the post: they stay wanted and,
        # once Redis confirms them, their gap is reported.
        self.late: set[str] = set()

    def is_subscribed(self, channel: str) -> bool:
        """Confirmed and not on its way out: a new subscriber need not wait for anything."""
        return channel in self.confirmed and channel not in self.pending_unsub

    def want(self, channel: str) -> None:
        if channel not in self.wanted:
            self.wanted.add(channel)
            self.dirty.set()

    def unwant(self, channel: str) -> None:
        self.late.discard(channel)
        if channel in self.wanted:
            self.wanted.discard(channel)
            self.dirty.set()

    def keep_only(self, keep: set[str]) -> None:
        if keep != self.wanted:
            self.wanted = keep
            self.dirty.set()

    def owe_late(self, channel: str) -> None:
        """A subscribe is giving up and the hub keeps the post: follow it when we can."""
        self.late.add(channel)
        self.want(channel)

    # -- waiting for Redis ---------------------------------------------------------------------

    def waiter(self, channel: str) -> asyncio.Future[None]:
        """A future resolved when Redis confirms `channel` (or failed with the session)."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(future)
        self.want(channel)
        return future

    def forget_waiter(self, channel: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(channel)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[channel]

    def fail_waiters(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
                    # Whoever awaited it sees the error; don't let asyncio call it unretrieved.
                    future.exception()

    # -- one session's rounds ------------------------------------------------------------------

    def new_session(self, wanted: set[str]) -> None:
        """A new connection: nothing is confirmed or in flight; follow `wanted`."""
        self.confirmed.clear()
        self.pending_sub.clear()
        self.pending_unsub.clear()
        self.wanted = wanted
        self.dirty.clear()

    def start_round(self) -> tuple[set[str], set[str]]:
        """What to SUBSCRIBE and UNSUBSCRIBE now; both are in flight until confirmed."""
        to_sub = self.wanted - self.confirmed
        to_unsub = self.confirmed - self.wanted
        self.pending_sub |= to_sub
        self.pending_unsub |= to_unsub
        if to_sub or to_unsub:
            self.settled.clear()
        return to_sub, to_unsub

    def on_subscribed(self, channel: str) -> bool:
        """Redis confirmed a SUBSCRIBE: wake its waiters. True if it came late (a gap)."""
        self.pending_sub.discard(channel)
        self.confirmed.add(channel)
        for waiter in self._waiters.pop(channel, ()):
            if not waiter.done():
                waiter.set_result(None)
        self._check_settled()
        late = channel in self.late
        self.late.discard(channel)
        return late

    def on_unsubscribed(self, channel: str) -> None:
        self.pending_unsub.discard(channel)
        self.confirmed.discard(channel)
        self._check_settled()

    def _check_settled(self) -> None:
        if not self.pending_sub and not self.pending_unsub:
            self.settled.set()

"""The one retry delay of the service: capped exponential backoff with jitter.

Every loop that retries something that failed (the flusher against a database that is down, a
Redis reconnect, a publish) waits `Backoff.next()` seconds between attempts: uniform(c / 2, c),
c = min(cap, base * 2**attempt). Doubling finds a server's recovery within a factor of two; the
cap bounds how late we notice; the jitter keeps instances that failed together from retrying in
step, which would hit a recovering server all at once.
"""

from __future__ import annotations

import random

# Defaults: first retry after 25-50 ms, never more than 5 s apart.
BASE = 0.05
CAP = 5.0


class Backoff:
    def __init__(self, base: float = BASE, cap: float = CAP) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        """The delay before the next attempt, in seconds; each call counts one failure."""
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """The last attempt succeeded: the next failure starts from `base` again."""
        self.attempt = 0

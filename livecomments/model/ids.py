"""Comment ids: 64-bit snowflakes, unique across instances and ordered by time.

Layout, most significant bit first::

    0 | 41 bits: ms since EPOCH_MS | 10 bits: instance id | 12 bits: sequence

so ids sort by creation time (to the millisecond) and, within one instance, strictly by creation
order. They stay below 2**63, so they fit a signed 64-bit column, and are rendered as decimal
strings in the API because JavaScript numbers cannot hold 64 bits exactly.

Clock steps: the generator never goes back. If the wall clock reads earlier than the last id's
millisecond (NTP step, VM migration), it keeps issuing ids on the last millisecond and, when its
4096 sequence numbers are used up, moves to the next millisecond by itself: ids stay unique and
increasing, and run slightly ahead of the wall clock until it catches up. `created_at` always
carries the wall clock, so it may then disagree with the id's time by the size of the step.
A restart resumes after the highest id the write-ahead queue has recorded (`seed`), so a clock
that stepped back across a restart cannot make an instance reissue an id either.
"""

from __future__ import annotations

import time
from collections.abc import Callable

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
INSTANCE_BITS = 10
SEQUENCE_BITS = 12
MAX_INSTANCE = (1 << INSTANCE_BITS) - 1
_SEQUENCE_MASK = (1 << SEQUENCE_BITS) - 1
_TIME_SHIFT = INSTANCE_BITS + SEQUENCE_BITS
# Ids stay below 2**63: they fit a signed 64-bit column.
MAX_SNOWFLAKE = (1 << 63) - 1


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class InstanceIdPending(Exception):
    """No instance id is settled yet (lease.py: the store was down at start-up)."""


class SnowflakeGenerator:
    """Issues ids for one instance. Not thread-safe: one per event loop.

    Made without an instance id, it refuses (`InstanceIdPending`) until `assign()` gives one."""

    def __init__(
        self, instance_id: int | None, clock_ms: Callable[[], int] = wall_clock_ms
    ) -> None:
        self._instance: int | None = None
        if instance_id is not None:
            self.assign(instance_id)
        self._clock_ms = clock_ms
        self._last_ms = 0
        self._sequence = 0

    def assign(self, instance_id: int) -> None:
        if not 0 <= instance_id <= MAX_INSTANCE:
            raise ValueError(f"instance_id must be 0..{MAX_INSTANCE}, got {instance_id}")
        self._instance = instance_id

    @property
    def instance_id(self) -> int | None:
        return self._instance

    def seed(self, last_id: int) -> None:
        """Never issue an id at or below `last_id`'s millisecond (survives restarts)."""
        self._last_ms = max(self._last_ms, timestamp_ms(last_id) - EPOCH_MS)
        self._sequence = _SEQUENCE_MASK  # the next id moves to a fresh millisecond

    def next_id(self) -> int:
        if self._instance is None:
            raise InstanceIdPending("no instance id is claimed yet")
        now = self._clock_ms() - EPOCH_MS
        if now > self._last_ms:
            self._last_ms = now
            self._sequence = 0
        else:
            # Same millisecond, or the clock stepped back: carry on from the last one.
            self._sequence = (self._sequence + 1) & _SEQUENCE_MASK
            if self._sequence == 0:
                self._last_ms += 1
        return (self._last_ms << _TIME_SHIFT) | (self._instance << SEQUENCE_BITS) | self._sequence


def timestamp_ms(snowflake: int) -> int:
    """The Unix time in ms encoded in an id."""
    return (snowflake >> _TIME_SHIFT) + EPOCH_MS


def lowest_id_at(unix_ms: int) -> int:
    """The smallest id any instance can issue at `unix_ms`: a lower bound for `after=`."""
    return max(0, unix_ms - EPOCH_MS) << _TIME_SHIFT


def instance_of(snowflake: int) -> int:
    return (snowflake >> SEQUENCE_BITS) & MAX_INSTANCE

"""A small mergeable latency histogram, in microseconds, with under 1% relative error.

Values below 128 us are counted exactly; above, each power of two is split into 64 buckets, so
a bucket's width is under 1/64 of its value and its midpoint is within 1/128 of any value in it.
Bucket keys grow with the value, so percentiles are a walk over the sorted keys. Load generator
processes each keep one and send it to the orchestrator as `[key, count]` pairs to be merged.
"""

from __future__ import annotations

from collections.abc import Iterable

EXACT_BITS = 7  # values below 1 << EXACT_BITS are their own bucket


def bucket_of(us: int) -> int:
    """The bucket key of a value in microseconds (negative values count as 0)."""
    if us < (1 << EXACT_BITS):
        return us if us > 0 else 0
    shift = us.bit_length() - EXACT_BITS
    return (shift << EXACT_BITS) | (us >> shift)


def value_of(key: int) -> float:
    """The midpoint, in microseconds, of the values counted in bucket `key`."""
    shift = key >> EXACT_BITS
    if shift == 0:
        return float(key)
    mantissa = key & ((1 << EXACT_BITS) - 1)
    return (mantissa << shift) + ((1 << shift) - 1) / 2


class Histogram:
    __slots__ = ("counts", "max_us", "n")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.max_us = 0

    def add(self, us: int) -> None:
        key = bucket_of(us)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.n += 1
        self.max_us = max(self.max_us, us)

    def merge_pairs(self, pairs: Iterable[Iterable[int]], max_us: int = 0) -> None:
        for key, count in pairs:
            self.counts[key] = self.counts.get(key, 0) + count
            self.n += count
        self.max_us = max(self.max_us, max_us)

    def pairs(self) -> list[list[int]]:
        return [[k, c] for k, c in sorted(self.counts.items())]

    def percentile_ms(self, q: float) -> float | None:
        """The q-th percentile (0 < q <= 100) in milliseconds; None when empty."""
        if self.n == 0:
            return None
        rank = max(1, -(-self.n * q // 100))  # ceil(n * q / 100): nearest-rank definition
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                return round(min(value_of(key), float(self.max_us)) / 1000, 3)
        return round(self.max_us / 1000, 3)  # not reached: the counts sum to n

    def summary(self) -> dict[str, float | int | None]:
        return {
            "n": self.n,
            "p50_ms": self.percentile_ms(50),
            "p99_ms": self.percentile_ms(99),
            "p99_9_ms": self.percentile_ms(99.9),
            "max_ms": round(self.max_us / 1000, 3) if self.n else None,
        }

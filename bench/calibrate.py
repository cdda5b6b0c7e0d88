"""`python -m bench.calibrate [UNITS]`: how fast this CPU is right now, in CPU ms per unit of work.

A unit is a fixed piece of pure Python (2,000 JSON encodes and decodes of a comment-sized dict);
it prints one JSON line: the median and the minimum CPU time of a unit over UNITS (10) units.
CPU time, not wall time: a process that waits for the CPU does not look slower. What it catches
is a CPU that does less work per second it runs, which the busy share of /proc/stat does not
show: on the shared VM of issue 8 the same unit took ~11 ms at some moments and ~21 ms at others,
for seconds at a time, and every figure of a run scales with that. run.py measures it on the
server's core at the start and end of a run and before each ingest measurement.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

UNIT_ITERATIONS = 2000


def unit() -> None:
    comment = {"post_id": "p", "uid": "u", "message": "x" * 100, "n": 0}
    for i in range(UNIT_ITERATIONS):
        comment["n"] = i
        json.loads(json.dumps(comment))


def measure(units: int = 10) -> dict[str, float]:
    unit()  # warm-up: imports and caches
    times = []
    for _ in range(units):
        t = time.process_time()
        unit()
        times.append((time.process_time() - t) * 1000)
    return {
        "unit_ms": round(statistics.median(times), 2),
        "min_ms": round(min(times), 2),
        "units": units,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(measure(int(args[0]) if args else 10)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

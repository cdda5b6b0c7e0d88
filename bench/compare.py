"""`python -m bench.compare [--base 4b1ac5a]`: what carrying stream positions costs per delivery.

Issue 10 asks that the cost per delivery of positions (offsets and epochs on every live event,
the per-post stream, the outbox) stay under 10%. This measures it the only honest way on a
shared VM: the code from before positions (`--base`, by default 4b1ac5a, the last commit before
issue 10) and this checkout run side by side in one run, each with the same 1,000 viewers of one
post, and their steps interleave (base, head, head, base, ...), so a change in the machine's
speed falls on both alike.

Per step: comments posted at a fixed rate for a few seconds, below both servers' capacity; the
subscribers' server's CPU seconds over the deliveries that arrived is the CPU per delivery.
Then one step past capacity: the throughput at any latency. Both are measured on the embedded
default and across two instances over a private redis-server (subscribers on one instance,
POSTs to the other: the subscribers' instance's CPU is measured).

And the write path alone (`ingest`): durable POSTs in a closed loop, no viewer, CPU per comment.

The base runs from `git archive` of its commit, with the same interpreter and packages, with
only the settings it knows. The difference includes everything between the two commits (trust,
limits, deletions), so it is an upper bound on the cost of positions alone.

Writes bench/results/positions-cost.json, which `make bench` turns into BENCHMARKS.md's
"Cost of positions" section.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.hist import Histogram
from bench.procs import REPO, CpuMeter, Pinning, ProcGroup, Worker, free_port, raise_nofile
from bench.report import POSITIONS_COST, positions_cost_section
from bench.scenarios import (
    INGEST_POSTS,
    LIVECOMMENTS_SETTINGS,
    PAD,
    SCALES,
    Context,
    Load,
    Server,
    start_redis,
)

BASE = "4b1ac5a"  # "The house by concept", the last commit before positions (issue 10)


@dataclass(frozen=True)
class Plan:
    """How much to measure; the defaults are the published run, the smoke test asks less."""

    viewers: int = 1000
    rate: float = 40_000  # deliveries/s of a measured step: below both servers' capacity
    peak: float = 600_000  # deliveries/s asked of the saturation step: past both capacities
    step_s: float = 4.0
    peak_s: float = 3.0
    rounds: int = 3
    ingest_concurrency: int = 50
    ingest_s: float = 5.0


SIDES = ("base", "head")


@dataclass
class Side:
    """One code version under test: its source dir (None: this checkout) and settings."""

    name: str
    source: Path | None
    env: dict[str, str]


def extract(commit: str, into: Path) -> Path:
    """The commit's tree (git archive), so that its server runs beside this checkout's."""
    done = subprocess.run(
        ["git", "archive", "--format=tar", commit, "livecomments"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    )
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def settings_known_by(source: Path) -> set[str]:
    """The environment variables the base's config reads: it refuses any other one."""
    code = (
        "import dataclasses; from livecomments.config import ENV_PREFIX, Settings; s = Settings()\n"
        "for sec in dataclasses.fields(s):\n"
        "    for f in dataclasses.fields(getattr(s, sec.name)):\n"
        "        print(f'{ENV_PREFIX}{sec.name}_{f.name}'.upper())\n"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", code],
        env=os.environ | {"PYTHONPATH": str(source)},
        capture_output=True,
        check=True,
        timeout=60,
        text=True,
    )
    return set(done.stdout.split())


async def start(
    group: ProcGroup, side: Side, tag: str, workdir: Path, extra: dict[str, str]
) -> Server:
    """A server of one side; `-P` keeps the checkout (the cwd) off sys.path, so PYTHONPATH's
    extracted tree is the `livecomments` that runs."""
    port = free_port()
    data = workdir / tag
    data.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
    env |= side.env | extra
    env |= {
        "LIVECOMMENTS_SERVER_HOST": "127.0.0.1",
        "LIVECOMMENTS_SERVER_PORT": str(port),
        "LIVECOMMENTS_STORE_URL": f"sqlite:///{data}/comments.db",
        "LIVECOMMENTS_QUEUE_DIR": str(data / "queue"),
    }
    if side.source is not None:
        env["PYTHONPATH"] = str(side.source)
    argv = [sys.executable, "-P", "-m", "livecomments", "--config", os.devnull, "serve"]
    proc = await group.server(tag, argv, env, port)
    return Server("livecomments", port, proc)


async def open_side(
    group: ProcGroup, side: Side, mode: str, ctx: Context, viewers: int
) -> tuple[Load, int]:
    """The side's server(s) and load generators, with `viewers` subscribed; the port the poster
    posts to (the other instance, over Redis)."""
    tag = f"{mode}-{side.name}"
    workdir, scale = ctx.workdir, ctx.scale
    poster_port: int | None = None
    if mode == "redis":
        redis_port = await start_redis(group, ctx, f"{tag}-redis")
        extra = {"LIVECOMMENTS_REDIS_URLS": f"redis://127.0.0.1:{redis_port}/0"}
        poster_port = (await start(group, side, f"{tag}-a", workdir, extra)).port
        starting = start(group, side, f"{tag}-b", workdir, extra)
    else:
        starting = start(group, side, tag, workdir, {})
    load = await Load.start(group, starting, scale, tag)
    await load.open_sockets([["hot"]] * viewers, within=90)
    port = poster_port or load.server.port
    await load.poster.call(10, cmd="connect", port=port, connections=1, pad=PAD)
    return load, port


async def fresh_poster(load: Load, port: int) -> None:
    """New poster connections before each step: the other side's steps keep this side's idle
    past `http.idle_timeout`, and a connection the server closes mid-step fails the step."""
    await load.poster.call(10, cmd="close")
    await load.poster.call(
        30, cmd="connect", port=port, connections=SCALES["full"].poster_connections, pad=PAD
    )


def summarize_step(step: dict[str, Any]) -> dict[str, Any]:
    used = step["server_cpu"] * step["active_s"]
    return {
        "target_deliveries_per_s": step["target_deliveries_per_s"],
        "deliveries": step["deliveries"],
        "expected": step["expected"],
        "cpu_us_per_delivery": round(used / step["deliveries"] * 1e6, 3)
        if step["deliveries"]
        else None,
        "server_cpu": step["server_cpu"],
        "throughput_per_s": step["throughput_per_s"],
        "p99_ms": step["latency"]["p99_ms"],
        "pass": step["pass"],
        "why": step["why"],
        "machine_cpu": step["machine_cpu"],
    }


async def measure_mode(mode: str, sides: list[Side], ctx: Context, plan: Plan) -> dict[str, Any]:
    """Both sides open at once; their steps interleave, in an order that alternates per round."""
    log = ctx.log
    out: dict[str, Any] = {side.name: {"steps": [], "peaks": []} for side in sides}
    async with ProcGroup(ctx.workdir, ctx.pinning) as group:
        loads = {side.name: await open_side(group, side, mode, ctx, plan.viewers) for side in sides}

        async def step(side: Side, deliveries_per_s: float, seconds: float) -> dict[str, Any]:
            load, port = loads[side.name]
            await load.repair()
            await fresh_poster(load, port)
            return summarize_step(
                await load.step(["hot"], deliveries_per_s / plan.viewers, seconds, plan.viewers)
            )

        for r in range(plan.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for side in order:
                measured = await step(side, plan.rate, plan.step_s)
                out[side.name]["steps"].append(measured)
                log(
                    f"{mode} {side.name} round {r}: {measured['cpu_us_per_delivery']} us/delivery,"
                    f" p99 {measured['p99_ms']} ms, {measured['why'] or 'pass'}"
                )
            for side in order[::-1]:
                peak = await step(side, plan.peak, plan.peak_s)
                out[side.name]["peaks"].append(peak)
                log(f"{mode} {side.name} round {r}: peak {peak['throughput_per_s']:,}/s")
    return summarize_mode(out)


def _median(values: list[Any]) -> float:
    # CPU time comes in ticks of 10 ms: a tiny (smoke) step may show none.
    return float(statistics.median([v for v in values if v is not None] or [0.0]))


def summarize_mode(out: dict[str, Any]) -> dict[str, Any]:
    """Medians per side and the after/before ratios, from the steps alone (so a results file
    can be summarized again)."""
    for side in SIDES:
        steps, peaks = out[side]["steps"], out[side]["peaks"]
        out[side]["cpu_us_per_delivery_median"] = _median([s["cpu_us_per_delivery"] for s in steps])
        out[side]["peak_cpu_us_per_delivery_median"] = _median(
            [s["cpu_us_per_delivery"] for s in peaks]
        )
        out[side]["peak_median"] = _median([s["throughput_per_s"] for s in peaks])
        out[side]["peak_p99_ms_median"] = _median([s["p99_ms"] for s in peaks])
        out[side]["peak_arrived_all"] = all(s["deliveries"] == s["expected"] for s in peaks)
        out[side]["all_steps_passed"] = all(s["pass"] for s in steps)
    base, head = out["base"], out["head"]
    for key, ratio in (
        ("cpu_us_per_delivery_median", "cost_ratio"),
        ("peak_cpu_us_per_delivery_median", "peak_cost_ratio"),
        ("peak_median", "peak_ratio"),
    ):
        out[ratio] = _ratio(head[key], base[key])
    return out


def _ratio(after: float, before: float) -> float | None:
    return round(after / before, 3) if before else None


async def measure_ingest(sides: list[Side], ctx: Context, plan: Plan) -> dict[str, Any]:
    """Durable POSTs, closed loop at INGEST_CONCURRENCY, no viewer: the CPU per comment of the
    write path (the queue, which became the outbox, and the stream append), interleaved."""
    out: dict[str, Any] = {side.name: {"steps": []} for side in sides}
    async with ProcGroup(ctx.workdir, ctx.pinning) as group:
        servers: dict[str, tuple[Server, Worker]] = {}
        for side in sides:
            poster = await group.worker(f"ingest-{side.name}-poster", "poster")
            server = await start(group, side, f"ingest-{side.name}", ctx.workdir, {})
            await poster.call(30, cmd="connect", port=server.port, connections=1, pad=PAD)
            servers[side.name] = (server, poster)
        for r in range(plan.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                server, poster = servers[side.name]
                meter = CpuMeter([server.proc.pid])
                meter.start()
                reply = await poster.call(
                    plan.ingest_s + 30,
                    cmd="closed",
                    posts=INGEST_POSTS,
                    connections=plan.ingest_concurrency,
                    duration=plan.ingest_s,
                )
                used = meter.used()
                ack = Histogram()
                ack.merge_pairs(reply["ack"], reply["ack_max_us"])
                step = {
                    "comments_per_s": reply["rate"],
                    "ok": reply["ok"],
                    "statuses": reply["statuses"],
                    "cpu_us_per_comment": round(used / reply["ok"] * 1e6, 1)
                    if reply["ok"]
                    else None,
                    "p99_ms": ack.summary()["p99_ms"],
                }
                out[side.name]["steps"].append(step)
                ctx.log(
                    f"ingest {side.name} round {r}: {step['comments_per_s']}/s, "
                    f"{step['cpu_us_per_comment']} us/comment, p99 {step['p99_ms']} ms"
                )
    return summarize_ingest(out)


def summarize_ingest(out: dict[str, Any]) -> dict[str, Any]:
    for side in SIDES:
        steps = out[side]["steps"]
        out[side]["cpu_us_per_comment_median"] = _median([s["cpu_us_per_comment"] for s in steps])
        out[side]["comments_per_s_median"] = _median([s["comments_per_s"] for s in steps])
        out[side]["p99_ms_median"] = _median([s["p99_ms"] for s in steps])
    base, head = out["base"], out["head"]
    out["cost_ratio"] = _ratio(head["cpu_us_per_comment_median"], base["cpu_us_per_comment_median"])
    out["rate_ratio"] = _ratio(head["comments_per_s_median"], base["comments_per_s_median"])
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    p.add_argument("--base", default=BASE, help=f"commit to compare with (default {BASE})")
    p.add_argument("--modes", default="embedded,redis,ingest", help="embedded,redis,ingest")
    p.add_argument("--out", type=Path, default=POSITIONS_COST)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--loadgen-cpus", default="1")
    p.add_argument("--smoke", action="store_true", help="a few viewers, one short round")
    return p.parse_args(argv)


SMOKE = Plan(
    viewers=10,
    rate=200,
    peak=1000,
    step_s=0.5,
    peak_s=0.5,
    rounds=1,
    ingest_concurrency=2,
    ingest_s=0.5,
)


def head_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    plan = SMOKE if args.smoke else Plan()
    raise_nofile()
    pinning = Pinning.choose(args.server_cpu, args.loadgen_cpus)
    pinning.pin_self()
    workdir = Path(tempfile.mkdtemp(prefix="livecomments-compare-"))
    try:
        source = extract(args.base, workdir / "base-src")
        ours = {k: v for k, (v, _) in LIVECOMMENTS_SETTINGS.items()}
        known = settings_known_by(source)
        sides = [
            Side("base", source, {k: v for k, v in ours.items() if k in known}),
            Side("head", None, ours),
        ]
        results: dict[str, Any] = {
            "measured": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base": args.base,
            "head": head_commit(),
            "command": f".venv/bin/python -m bench.compare --base {args.base}",
            "viewers": plan.viewers,
            "rate": plan.rate,
            "peak_target": plan.peak,
            "rounds": plan.rounds,
            "loadavg_start": list(os.getloadavg()),
            "modes": {},
        }
        ctx = Context(SCALES["full"], pinning, workdir, ("livecomments",), args.out, log=log)
        started = time.monotonic()
        for mode in args.modes.split(","):
            if mode == "redis" and shutil.which("redis-server") is None:
                results["modes"][mode] = {"skipped": "redis-server is not installed"}
                continue
            log(f"compare: {mode}, base {args.base} beside head {results['head']}")
            if mode == "ingest":
                results["modes"][mode] = await measure_ingest(sides, ctx, plan)
            else:
                results["modes"][mode] = await measure_mode(mode, sides, ctx, plan)
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        results["loadavg_end"] = list(os.getloadavg())
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    print(positions_cost_section(args.out))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

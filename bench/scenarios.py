"""The four scenarios of issue 5, each against a fresh server process and fresh load generators.

1. `hot_post`: one post, S subscribers; comments posted at a rising ladder of rates. The figure is
   the highest rate of deliveries (comments x subscribers that arrived) at which POST-to-socket
   p99 stayed <= 100 ms with nothing lost; then latency at half that rate.
2. `many_posts`: N posts, each watched by 2 sockets; a fixed comment rate spread round-robin
   over the posts (in a shuffled order): latency percentiles and server CPU.
3. `ingest`: durable POSTs, closed loop at several concurrencies: comments/s and ack latency,
   beside the disk's own fsync latency measured in the queue's directory in the same run.
4. `idle`: N idle subscribed sockets: server RSS per socket (VmRSS after - before, / N) and
   whether the process holds them all.

Each scenario function fills the `out` dict as it goes, so a time cap (run.py) keeps what was
measured before it struck. Every process is started in a `ProcGroup`, stopped when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.hist import Histogram
from bench.leanws import Dialect
from bench.procs import (
    REPO,
    CpuMeter,
    Pinning,
    Proc,
    ProcGroup,
    ServerDied,
    Worker,
    free_port,
    http_get,
    rss_kib,
)

Servers = tuple[str, ...]  # "livecomments", "socketio"
P99_BUDGET_MS = 100.0
MIN_ARRIVED = 0.999  # share of expected deliveries that must arrive for a step to pass
MAX_POST_LATE_MS = 50.0  # a step whose poster fell further behind its schedule is not trusted
MIN_ACTIVE_S = 0.05  # floor of a step's active time, for rates per second
DRAIN_MAX_S = 10.0  # after its last POST, a step waits at most this long for deliveries
SATURATED = 0.9  # cores per CPU at which a side counts as saturated in a step
SATURATION_FACTOR = 1.5  # the saturation step asks this much over the estimated capacity
PROFILE_MIN_RATE = 20_000  # deliveries/s of the profiled step, at least
SKIP_BELOW = 0.4  # ladder rungs below this share of the capacity estimated so far are skipped
PAD = 80  # characters of padding in each comment's message, after the latency marker


@dataclass(frozen=True)
class Scale:
    """How big each scenario is; `full` is the published run."""

    name: str
    hot_sizes: tuple[int, ...]
    hot_ladder: tuple[int, ...]  # target deliveries per second, climbed until a step fails
    hot_step_s: float
    hot_half_s: float
    hot_run_budget_s: float  # per (server, size): no new ladder step starts after this
    many_posts: int
    many_rate: float
    many_warmup_s: float
    many_s: float
    ingest_concurrency: tuple[int, ...]
    ingest_s: float
    wrk_connections: int  # wrk runs right after the harness's level of this concurrency
    wrk_s: int  # whole seconds: wrk's -d takes no fraction
    calibrate_units: int  # units of bench/calibrate.py per CPU speed measurement
    latency_n: int  # comments posted one at a time (after latency_warmup more)
    latency_warmup: int
    latency_redis: int  # Redis servers of the two-instance measurement; 0: not measured
    drain_comments: int  # backlog queued while PostgreSQL is down; 0: not measured
    drain_batches: tuple[int, ...]  # queue.flush_batch values tried
    fsync_n: int
    idle_n: int
    idle_posts: int
    idle_settle_s: float
    idle_hold_s: float
    subscriber_workers: int
    poster_connections: int
    quiet_s: float  # a step stops waiting for missing deliveries after this long without one
    caps: dict[str, float]  # seconds per scenario, all servers included


SCALES: dict[str, Scale] = {
    "full": Scale(
        name="full",
        hot_sizes=(1000, 5000, 10000),
        hot_ladder=(
            2_500,
            5_000,
            10_000,
            20_000,
            35_000,
            50_000,
            70_000,
            100_000,
            140_000,
            200_000,
            280_000,
            400_000,
        ),
        hot_step_s=3.0,
        hot_half_s=5.0,
        hot_run_budget_s=35.0,
        many_posts=10_000,
        many_rate=2000.0,
        many_warmup_s=2.0,
        many_s=6.0,
        ingest_concurrency=(1, 50, 200),
        ingest_s=5.0,
        wrk_connections=50,
        wrk_s=10,
        calibrate_units=10,
        latency_n=1000,
        latency_warmup=50,
        latency_redis=2,
        drain_comments=100_000,
        drain_batches=(100, 1000, 5000),
        fsync_n=200,
        idle_n=10_000,
        idle_posts=1000,
        idle_settle_s=2.0,
        idle_hold_s=5.0,
        subscriber_workers=2,
        poster_connections=256,
        quiet_s=3.0,
        caps={
            "hot_post": 330.0,
            "hot_post_redis": 60.0,
            "many_posts": 110.0,
            "ingest": 70.0,
            "idle": 100.0,
            "latency": 60.0,
            "drain": 180.0,
        },
    ),
    "quick": Scale(
        name="quick",
        hot_sizes=(1000,),
        hot_ladder=(2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 200_000),
        hot_step_s=1.0,
        hot_half_s=1.5,
        hot_run_budget_s=9.0,
        many_posts=500,
        many_rate=250.0,
        many_warmup_s=0.5,
        many_s=1.5,
        ingest_concurrency=(1, 50, 200),
        ingest_s=1.0,
        wrk_connections=50,
        wrk_s=2,
        calibrate_units=5,
        latency_n=100,
        latency_warmup=10,
        latency_redis=2,
        drain_comments=5_000,
        drain_batches=(1000,),
        fsync_n=50,
        idle_n=1000,
        idle_posts=100,
        idle_settle_s=0.5,
        idle_hold_s=0.5,
        subscriber_workers=2,
        poster_connections=64,
        quiet_s=1.0,
        caps={
            "hot_post": 30.0,
            "hot_post_redis": 20.0,
            "many_posts": 15.0,
            "ingest": 20.0,
            "idle": 20.0,
            "latency": 30.0,
            "drain": 30.0,
        },
    ),
    "smoke": Scale(
        name="smoke",
        hot_sizes=(10,),
        hot_ladder=(1000,),
        hot_step_s=0.2,
        hot_half_s=0.2,
        hot_run_budget_s=3.0,
        many_posts=10,
        many_rate=40.0,
        many_warmup_s=0.2,
        many_s=0.4,
        ingest_concurrency=(1, 4),
        ingest_s=0.2,
        wrk_connections=4,
        wrk_s=1,
        calibrate_units=2,
        latency_n=10,
        latency_warmup=3,
        latency_redis=0,
        drain_comments=0,
        drain_batches=(),
        fsync_n=10,
        idle_n=20,
        idle_posts=5,
        idle_settle_s=0.2,
        idle_hold_s=0.2,
        subscriber_workers=1,
        poster_connections=4,
        quiet_s=0.3,
        caps={
            "hot_post": 20.0,
            "hot_post_redis": 15.0,
            "many_posts": 12.0,
            "ingest": 12.0,
            "idle": 10.0,
            "latency": 10.0,
            "drain": 5.0,
        },
    ),
}

# Our server's configuration in every scenario, each documented in BENCHMARKS.md (report.py).
# check_settings() refuses a variable livecomments does not read: it ignores unknown ones.
LIVECOMMENTS_SETTINGS: dict[str, tuple[str, str]] = {
    "LIVECOMMENTS_LIMITS_MAX_CONNECTIONS": (
        "20000",
        "the default; above every scenario's socket count (10,000 at most)",
    ),
    "LIVECOMMENTS_LIMITS_POSTS_PER_INSTANCE": ("100000", "the default; many_posts follows 10,000"),
    "LIVECOMMENTS_LIMITS_POSTS_PER_SOCKET": ("100", "the default; many_posts watches 2 per socket"),
    "LIVECOMMENTS_WEBSOCKET_OUTBOX_MAX_BYTES": (
        "1048576",
        "the default (1 MiB): a socket further behind is cut as slow, which fails the step",
    ),
    "LIVECOMMENTS_WEBSOCKET_HEARTBEAT": ("30", "the default; the load generator answers pings"),
    "LIVECOMMENTS_QUEUE_FLUSH_BATCH": ("1000", "the default"),
    "LIVECOMMENTS_HTTP_IDLE_TIMEOUT": (
        "300",
        "the poster keeps its keep-alive connections between steps, and a big audience's "
        "steps (their drain, reopening sockets) can take longer than the default 15 s",
    ),
    "LIVECOMMENTS_LOG_LEVEL": ("WARNING", "no per-request logs (there are none at INFO either)"),
    "LIVECOMMENTS_LIMITS_COMMENTS_PER_MINUTE": (
        "0",
        "off: the load generator is one author on one address, far past any per-author rate",
    ),
    "LIVECOMMENTS_LIMITS_WS_PER_IP": ("0", "off: every socket comes from 127.0.0.1"),
    "LIVECOMMENTS_LIMITS_WS_CONNECTS_PER_IP_PER_SECOND": (
        "0",
        "off: thousands of sockets connect from 127.0.0.1 at once",
    ),
    "LIVECOMMENTS_LIMITS_FRAMES_PER_SECOND": (
        "0",
        "off, as the others (the load generator sends few frames; a limit would cost a check each)",
    ),
}


def check_settings() -> None:
    """Every bench variable must name a livecomments setting, with a value it accepts."""
    from livecomments.config import ENV_PREFIX, Settings, load_settings  # noqa: PLC0415

    sections = {f.name: f.type for f in dataclasses.fields(Settings)}
    for var in LIVECOMMENTS_SETTINGS:
        section, _, key = var.removeprefix(ENV_PREFIX).lower().partition("_")
        cls = getattr(Settings(), section, None)
        if (
            section not in sections
            or cls is None
            or key not in {f.name for f in dataclasses.fields(cls)}
        ):
            raise RuntimeError(f"{var} is not a livecomments setting (renamed or removed?)")
    load_settings(os.devnull, environ={k: v for k, (v, _) in LIVECOMMENTS_SETTINGS.items()})


@dataclass
class Context:
    scale: Scale
    pinning: Pinning
    workdir: Path
    servers: Servers
    results_path: Path  # this run's results file; its other files (profiles) take its name
    profile: bool = False
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Server:
    kind: str
    port: int
    proc: Proc

    @property
    def dialect(self) -> Dialect:
        return "lc" if self.kind == "livecomments" else "sio"


async def start_server(
    group: ProcGroup, ctx: Context, kind: str, tag: str, extra_env: dict[str, str] | None = None
) -> Server:
    """A fresh server; one that dies while starting is tried once more (and the retry noted):
    once a fresh process got SIGTERM from outside the harness before it was ready."""
    try:
        return await _start_server(group, ctx, kind, tag, extra_env)
    except ServerDied as e:
        ctx.log(f"{tag}: {e}; starting it again")
        ctx.notes.append(f"{tag}-{kind} died while starting ({str(e).splitlines()[0]}); retried")
        return await _start_server(group, ctx, kind, f"{tag}-retry", extra_env)


async def _start_server(
    group: ProcGroup, ctx: Context, kind: str, tag: str, extra_env: dict[str, str] | None
) -> Server:
    port = free_port()
    data = ctx.workdir / f"{tag}-{kind}"
    data.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
    if kind == "livecomments":
        env.update({k: v for k, (v, _) in LIVECOMMENTS_SETTINGS.items()})
        env.update(
            {
                "LIVECOMMENTS_SERVER_HOST": "127.0.0.1",
                "LIVECOMMENTS_SERVER_PORT": str(port),
                "LIVECOMMENTS_STORE_URL": f"sqlite:///{data}/comments.db",
                "LIVECOMMENTS_QUEUE_DIR": str(data / "queue"),
            }
        )
        env.update(extra_env or {})
        argv = [sys.executable, "-m", "livecomments", "--config", os.devnull, "serve"]
    else:
        argv = [sys.executable, "-m", "bench.peer_socketio", "--port", str(port)]
    proc = await group.server(f"{tag}-{kind}", argv, env, port)
    return Server(kind, port, proc)


async def server_counters(server: Server) -> dict[str, float]:
    """livecomments' own counters after a run (slow-consumer closes, deliveries)."""
    if server.kind != "livecomments":
        return {}
    try:
        text = (await http_get(server.port, "/metrics")).decode()
    except (OSError, TimeoutError):
        return {}
    wanted = (
        "livecomments_slow_consumer_closes_total",
        "livecomments_deliveries_total",
        "livecomments_comments_accepted_total",
    )
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name.removeprefix("livecomments_")] = float(value)
    return out


# -- system load: how noisy the machine was ------------------------------------------------------


def _cpu_ticks() -> dict[str, tuple[int, int]]:
    """Per CPU line of /proc/stat: (busy ticks, total ticks)."""
    out: dict[str, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *nums = line.split()
            v = [int(x) for x in nums[:8]]
            idle = v[3] + v[4]
            out[name] = (sum(v) - idle, sum(v))
    return out


class SystemMeter:
    """Busy share of each CPU between start() and stop(), to tell our load from others'."""

    def start(self) -> None:
        self._t0 = _cpu_ticks()

    def stop(self) -> dict[str, float]:
        t1 = _cpu_ticks()
        out: dict[str, float] = {}
        for name, (busy, total) in t1.items():
            b0, tot0 = self._t0.get(name, (busy, total))
            if total > tot0:
                out[name] = round((busy - b0) / (total - tot0), 3)
        return out


# -- load generators ---------------------------------------------------------------------------


@dataclass
class Load:
    """The load generator processes of one run: subscriber workers and one poster."""

    subscribers: list[Worker]
    poster: Worker
    server: Server
    quiet_s: float
    loadgen_cpus: int
    sockets: int = 0

    @classmethod
    async def start(
        cls, group: ProcGroup, server_starting: Awaitable[Server], scale: Scale, tag: str
    ) -> Load:
        """The load generators, spawned first so that they boot (on their own core) while the
        server starts; then the server, awaited."""
        # One subscriber process per load generator CPU at least (more CPUs: more processes).
        cpus = group.pinning.loadgen_cpu_count
        workers = max(scale.subscriber_workers, cpus)
        subs = [await group.worker(f"{tag}-subs{i}", "subscribers") for i in range(workers)]
        poster = await group.worker(f"{tag}-poster", "poster")
        return cls(subs, poster, await server_starting, scale.quiet_s, cpus)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in (*self.subscribers, self.poster)]

    async def each(self, wait: float, /, **cmd: Any) -> list[dict[str, Any]]:
        """The same command to every subscriber worker; their results."""
        return list(await asyncio.gather(*(w.call(wait, **cmd) for w in self.subscribers)))

    async def open_sockets(self, subscriptions: list[list[str]], within: float) -> dict[str, Any]:
        """Spread the sockets over the subscriber workers; wait until each is subscribed."""
        n = len(self.subscribers)
        started = time.monotonic()
        replies = await asyncio.gather(
            *(
                w.call(
                    within + 10,
                    cmd="open",
                    dialect=self.server.dialect,
                    port=self.server.port,
                    subscriptions=subscriptions[i::n],
                    within=within,
                )
                for i, w in enumerate(self.subscribers)
            )
        )
        opened = sum(r["opened"] for r in replies)
        self.sockets += opened
        out: dict[str, Any] = {
            "opened": opened,
            "failed": sum(r["failed"] for r in replies),
            "seconds": round(time.monotonic() - started, 2),
        }
        if out["failed"]:
            errors = [s["errors"] for s in await self.each(10, cmd="status")]
            raise RuntimeError(f"{out['failed']} of {len(subscriptions)} sockets failed: {errors}")
        return out

    async def drain(self, expected: int) -> bool:
        """Wait until `expected` deliveries have arrived (True), or none has for `quiet_s`, or
        DRAIN_MAX_S have passed (False: the missing ones count as lost)."""
        start = changed = time.monotonic()
        seen = -1
        while time.monotonic() - start < DRAIN_MAX_S:
            total = sum(r["deliveries"] for r in await self.each(10, cmd="count"))
            if total >= expected:
                return True
            if total != seen:
                seen, changed = total, time.monotonic()
            elif time.monotonic() - changed >= self.quiet_s:
                return False
            await asyncio.sleep(0.02)
        return False

    async def repair(self) -> int:
        """Reopen sockets the server closed since the last step (slow consumers)."""
        replies = await self.each(90, cmd="reopen")
        return sum(r["replaced"] for r in replies)

    async def step(
        self, posts: list[str], rate: float, duration: float, fanout: int
    ) -> dict[str, Any]:
        """Post at `rate` for `duration` s; collect what arrived. `fanout`: sockets per comment."""
        since = time.time_ns()  # the clock of the comments' markers and of kernel stamps
        await self.each(10, cmd="begin", since_ns=since)
        server_cpu, loadgen_cpu = CpuMeter([self.server.proc.pid]), CpuMeter(self.pids)
        system = SystemMeter()
        server_cpu.start()
        loadgen_cpu.start()
        system.start()
        posted = await self.poster.call(
            duration + 30, cmd="rate", posts=posts, rate=rate, duration=duration
        )
        drained = await self.drain(posted["ok"] * fanout)
        ends = await self.each(10, cmd="end")
        # CPU per second of the step's active time: from its start to the last arrival (the
        # backlog drained after the last POST belongs to the step; waiting in drain() does not).
        window = server_cpu.elapsed()
        used_server, used_loadgen = server_cpu.used(), loadgen_cpu.used()
        machine = system.stop()
        statuses = await self.each(10, cmd="status")
        # The step was active from its start until its last POST was sent or its last arrival,
        # whichever came later: a one-comment step is as long as that comment's fan-out.
        last = max((e["last_ns"] for e in ends), default=0)
        active = max((last - since) / 1e9 if last else 0.0, posted["send_span_s"], MIN_ACTIVE_S)
        latency, read_latency = Histogram(), Histogram()
        for e in ends:
            latency.merge_pairs(e["hist"], e["max_us"])
            read_latency.merge_pairs(e["read_hist"], e["read_max_us"])
        ack = Histogram()
        ack.merge_pairs(posted["ack"], posted["ack_max_us"])
        deliveries = sum(e["deliveries"] for e in ends)
        expected = posted["ok"] * fanout
        closed = sum(s["closed"] for s in statuses)
        result: dict[str, Any] = {
            "target_comments_per_s": round(rate, 2),
            "target_deliveries_per_s": round(rate * fanout),
            "duration_s": duration,
            "active_s": round(active, 3),
            "posted_ok": posted["ok"],
            "post_statuses": posted["statuses"],
            "post_unsent": posted["unsent"],
            "post_max_late_ms": posted["max_late_ms"],
            "deliveries": deliveries,
            "expected": expected,
            "arrived": round(deliveries / expected, 5) if expected else None,
            "deliveries_per_s": round(deliveries / duration),
            # Deliveries over the time until the last one arrived: throughput at any latency.
            "throughput_per_s": round(deliveries / active),
            "latency_samples": sum(e["samples"] for e in ends),
            "stale_samples": sum(e["stale"] for e in ends),
            "latency": latency.summary(),
            # Until the load generator read it: the gap to `latency` is the generator's delay.
            "read_latency": read_latency.summary(),
            "ack": ack.summary(),
            "server_cpu": round(used_server / active, 3),
            "loadgen_cpu": round(used_loadgen / active, 3),
            # Over the whole window, quiet wait included, to set beside the machine's CPUs.
            "window_s": round(window, 3),
            "server_cpu_window": round(used_server / window, 3),
            "loadgen_cpu_window": round(used_loadgen / window, 3),
            "machine_cpu": machine,
            "closed_sockets": closed,
            "close_codes": _merge_counts(s["close_codes"] for s in statuses),
            "drained": drained,
        }
        result["saturated"] = [
            side
            for side, cores, n in (
                ("server", result["server_cpu"], 1),
                ("loadgen", result["loadgen_cpu"], self.loadgen_cpus),
            )
            if cores >= SATURATED * n
        ]
        result["pass"], result["why"] = judge(result)
        return result


def _merge_counts(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def judge(step: dict[str, Any]) -> tuple[bool, str]:
    """A step passes when it was posted as asked, nothing was lost and p99 <= 100 ms."""
    p99 = step["latency"]["p99_ms"]
    problems = []
    if step["post_unsent"]:
        problems.append(f"poster fell behind ({step['post_unsent']} unsent)")
    if set(step["post_statuses"]) - {"201"}:
        problems.append(f"POST errors {step['post_statuses']}")
    if step["post_max_late_ms"] > MAX_POST_LATE_MS:
        problems.append(f"poster {step['post_max_late_ms']} ms behind schedule")
    if step["closed_sockets"]:
        problems.append(f"{step['closed_sockets']} sockets closed {step['close_codes']}")
    if step["arrived"] is None or step["arrived"] < MIN_ARRIVED:
        problems.append(f"arrived {step['arrived']}")
    if p99 is None or p99 > P99_BUDGET_MS:
        problems.append(f"p99 {p99} ms")
    if step["stale_samples"]:
        problems.append(f"{step['stale_samples']} late arrivals from the step before")
    return not problems, "; ".join(problems)


def _budget_left(started: float, budget: float) -> float:
    return budget - (time.monotonic() - started)


# -- 1. hot post -------------------------------------------------------------------------------


async def hot_post(ctx: Context, out: dict[str, Any]) -> None:
    for kind in ctx.servers:
        runs: dict[str, Any] = out.setdefault(kind, {})
        for size in ctx.scale.hot_sizes:
            run: dict[str, Any] = runs.setdefault(str(size), {})
            ctx.log(f"hot_post: {kind}, {size} subscribers")
            await _hot_post_run(ctx, kind, size, run)


async def hot_post_redis(ctx: Context, out: dict[str, Any]) -> None:
    """The hot post again, across two instances: the POSTs go to one, every subscriber is on
    the other, and each comment crosses a private redis-server (its stream's APPEND, then
    Pub/Sub). Both instances and Redis share the server's core."""
    if "livecomments" not in ctx.servers:
        return
    if shutil.which("redis-server") is None:
        ctx.log("hot_post_redis: skipped: redis-server is not installed")
        out["livecomments"] = {"skipped": "redis-server is not installed"}
        return
    runs: dict[str, Any] = out.setdefault("livecomments", {})
    size = min(ctx.scale.hot_sizes)
    run: dict[str, Any] = runs.setdefault(str(size), {})
    ctx.log(f"hot_post_redis: livecomments, 2 instances via Redis, {size} subscribers")
    await _hot_post_run(ctx, "livecomments", size, run, via_redis=True)


async def _hot_post_run(
    ctx: Context, kind: str, size: int, run: dict[str, Any], *, via_redis: bool = False
) -> None:
    scale = ctx.scale
    run_started = time.monotonic()
    tag = f"hot{size}" + ("-redis" if via_redis else "")
    async with ProcGroup(ctx.workdir, ctx.pinning) as group:
        poster_port: int | None = None
        if via_redis:
            redis_port = await start_redis(group, ctx, f"{tag}-redis")
            env = {"LIVECOMMENTS_REDIS_URLS": f"redis://127.0.0.1:{redis_port}/0"}
            poster_port = (await start_server(group, ctx, kind, f"{tag}-a", env)).port
            starting = start_server(group, ctx, kind, f"{tag}-b", env)
        else:
            starting = start_server(group, ctx, kind, tag)
        load = await Load.start(group, starting, scale, f"{tag}-{kind}")
        server = load.server
        run["sockets"] = await load.open_sockets([["hot"]] * size, within=90)
        fanout = run["sockets"]["opened"]
        started = time.monotonic()  # the ladder's budget starts once everyone is subscribed
        await load.poster.call(
            30,
            cmd="connect",
            port=poster_port or server.port,
            connections=scale.poster_connections,
            pad=PAD,
        )
        steps: list[dict[str, Any]] = run.setdefault("steps", [])

        async def measure(deliveries_per_s: float, duration: float) -> dict[str, Any]:
            replaced = await load.repair()
            step = await load.step(["hot"], deliveries_per_s / fanout, duration, fanout)
            step["sockets_replaced_before"] = replaced
            ctx.log(_step_line(step))
            return step

        last_pass: float | None = None
        first_fail: float | None = None
        estimate = 0.0  # deliveries/s the server could do on a full core, from the last pass
        for target in scale.hot_ladder:
            if target < SKIP_BELOW * estimate:
                continue
            if _budget_left(started, scale.hot_run_budget_s) < scale.hot_step_s:
                run["ladder_stopped"] = "run budget exhausted"
                break
            step = await measure(target, scale.hot_step_s)
            steps.append(step)
            if not step["pass"]:
                first_fail = target
                break
            last_pass = target
            estimate = step["deliveries_per_s"] / max(step["server_cpu"], 0.02)
        if (
            last_pass is not None
            and first_fail is not None
            and _budget_left(started, scale.hot_run_budget_s) > scale.hot_step_s
        ):
            # One bisection step between the last pass and the first fail, geometrically.
            steps.append(await measure((last_pass * first_fail) ** 0.5, scale.hot_step_s))
        if (
            steps
            and not any("server" in s["saturated"] for s in steps)
            and _budget_left(started, scale.hot_run_budget_s) > scale.hot_step_s
        ):
            # "Peak" needs a step that used the server's whole CPU; a ladder that stopped early
            # (a slow fan-out fails p99 at any rate) had none: one more, past the capacity
            # estimated from the last step.
            last = steps[-1]
            capacity = last["throughput_per_s"] / max(last["server_cpu"], 0.02)
            target = min(SATURATION_FACTOR * capacity, scale.hot_ladder[-1])
            steps.append(await measure(target, scale.hot_step_s))
            steps[-1]["purpose"] = "saturation"
        passed = [s for s in steps if s["pass"]]
        best = max(passed, key=lambda s: s["deliveries_per_s"]) if passed else None
        run["best"] = best
        run["sustained_deliveries_per_s"] = best["deliveries_per_s"] if best else 0
        run["peak_throughput_per_s"] = max((s["throughput_per_s"] for s in steps), default=0)
        run["loadgen_cpu_max"] = max((s["loadgen_cpu"] for s in steps), default=0.0)
        # Whose CPU ran out at the first failing step: only "server" makes the figure the
        # server's capacity; "loadgen" alone makes it a lower bound.
        failed = [s for s in steps if not s["pass"]]
        run["limited_by"] = failed[0]["saturated"] if failed else None
        if best is not None:
            half = await measure(best["target_deliveries_per_s"] / 2, scale.hot_half_s)
            run["half_rate"] = half
        if ctx.profile and kind == "livecomments" and size == max(scale.hot_sizes):
            # Profile where the server works hardest: the highest rate tried (>= 20k/s).
            target = max([PROFILE_MIN_RATE] + [s["target_deliveries_per_s"] for s in steps])
            run["profile"] = await _profile_during(
                ctx, group, server, lambda: measure(target, max(scale.hot_half_s, 5.0))
            )
        run["server_counters"] = await server_counters(server)
        run["seconds"] = round(time.monotonic() - run_started, 1)


def _step_line(step: dict[str, Any]) -> str:
    lat, read = step["latency"], step["read_latency"]
    return (
        f"  {step['target_deliveries_per_s']:>8,}/s target: {step['deliveries_per_s']:>8,}/s "
        f"arrived {step['arrived']}, p50 {lat['p50_ms']} p99 {lat['p99_ms']} ms "
        f"(read: p99 {read['p99_ms']}), "
        f"server cpu {step['server_cpu']}, loadgen cpu {step['loadgen_cpu']}"
        f"{'' if step['pass'] else ' FAIL: ' + step['why']}"
    )


async def _profile_during(
    ctx: Context,
    group: ProcGroup,
    server: Server,
    work: Callable[[], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """py-spy (sampling, non-blocking) on the server while `work` runs; returns the top frames."""
    spy = _py_spy()
    if spy is None:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    results = ctx.results_path
    raw = results.with_name(f"profile-{server.kind}-{results.stem}.txt")
    proc = await group.helper(
        "py-spy",
        [
            spy,
            *("record", "--pid", str(server.proc.pid), "--rate", "250", "--nonblocking"),
            *("--format", "raw", "--output", str(raw), "--duration", "600"),
        ],
    )
    await asyncio.sleep(1.0)  # py-spy attaches
    step = await work()
    await proc.stop_gently()  # SIGINT: py-spy writes what it sampled and exits
    summary: dict[str, Any] = (
        summarize_profile(raw) if _exists(raw) else {"error": proc.log_tail(2000)}
    )
    summary["step"] = step
    summary["raw"] = str(raw.relative_to(REPO)) if raw.is_relative_to(REPO) else str(raw)
    ctx.profiles.append(summary)
    return summary


def _py_spy() -> str | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return spy if _exists(Path(spy)) else None


def _exists(path: Path) -> bool:
    return path.exists()


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    own_lines: dict[str, int] = {}
    total_in: dict[str, int] = {}
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + count
        leaf = _frame_name(stack.rsplit(";", 1)[-1], keep_line=True)
        own_lines[leaf] = own_lines.get(leaf, 0) + count
        for name in set(frames):
            total_in[name] = total_in.get(name, 0) + count

    def share(d: dict[str, int]) -> list[list[Any]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [[name, round(100 * n / samples, 1)] for name, n in ranked]

    return {
        "samples": samples,
        "self_pct": share(own),
        "self_lines_pct": share(own_lines)[:8],
        "inclusive_pct": share(total_in),
    }


def _frame_name(frame: str, keep_line: bool = False) -> str:
    """`send (/venv/.../aiohttp/x.py:123)` -> `send (aiohttp/x.py)` (lines of one function summed,
    unless `keep_line`)."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if not keep_line:
        where = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


# -- 2. many posts -----------------------------------------------------------------------------


def many_posts_layout(posts: int) -> list[list[str]]:
    """Socket i watches posts i and i+1 (mod N): every post has exactly 2 watching sockets.

    N sockets, not 2N: 2N sockets would pass this machine's hard limit of 20,000 descriptors
    per process at N = 10,000; the fan-out per comment (2) and the post count are as specified.
    """
    assert posts >= 2
    return [[f"m{i}", f"m{(i + 1) % posts}"] for i in range(posts)]


async def many_posts(ctx: Context, out: dict[str, Any]) -> None:
    scale = ctx.scale
    order = [f"m{i}" for i in range(scale.many_posts)]
    random.Random(5).shuffle(order)
    for kind in ctx.servers:
        run: dict[str, Any] = out.setdefault(kind, {})
        ctx.log(f"many_posts: {kind}, {scale.many_posts} posts, {scale.many_rate:g} comments/s")
        async with ProcGroup(ctx.workdir, ctx.pinning) as group:
            starting = start_server(group, ctx, kind, "many")
            load = await Load.start(group, starting, scale, f"many-{kind}")
            server = load.server
            run["sockets"] = await load.open_sockets(many_posts_layout(scale.many_posts), 90)
            await load.poster.call(
                30,
                cmd="connect",
                port=server.port,
                connections=scale.poster_connections,
                pad=PAD,
            )
            warm = await load.step(order, scale.many_rate, scale.many_warmup_s, 2)
            run["warmup_pass"] = warm["pass"]
            step = await load.step(order, scale.many_rate, scale.many_s, 2)
            ctx.log(_step_line(step))
            run["step"] = step
            run["server_counters"] = await server_counters(server)


# -- 3. ingest ---------------------------------------------------------------------------------


def fsync_floor(directory: Path, n: int, size: int = 256) -> dict[str, Any]:
    """n x (append `size` bytes + os.fsync) in `directory`: the disk's floor under a durable ack."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fsync-probe"
    times: list[float] = []
    block = b"x" * size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
    times.sort()
    median = statistics.median(times)
    return {
        "n": n,
        "bytes": size,
        "p50_ms": round(median * 1000, 3),
        "p99_ms": round(times[min(n - 1, int(n * 0.99))] * 1000, 3),
        "fsyncs_per_s": round(1 / median) if median > 0 else None,
    }


# Comments of the ingest scenario are spread round-robin over 100 posts, by the harness's poster
# and by wrk alike: one post was a few percent faster than 100 in issue 8's runs, and the two
# load generators should differ only in being two load generators.
INGEST_POSTS = [f"ingest-{i}" for i in range(100)]
WRK_SCRIPT = REPO / "bench" / "wrk_post.lua"
WRK_POSTS = len(INGEST_POSTS)
WRK_MESSAGE_CHARS = 100  # the harness's: `~<19-digit ns>~` and PAD characters, 101


def wrk_command(connections: int, seconds: int, port: int) -> list[str]:
    """The standard tool's ingest run, as an outsider would type it (bench/wrk_post.lua)."""
    script = WRK_SCRIPT.relative_to(REPO)
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), _url(port)]


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def parse_wrk(output: str) -> dict[str, Any]:
    """The `wrk-result {...}` line that bench/wrk_post.lua's done() prints (the last one)."""
    lines = [line for line in output.splitlines() if line.startswith("wrk-result ")]
    if not lines:
        raise RuntimeError(f"wrk printed no result line:\n{output[-2000:]}")
    raw: dict[str, int] = orjson.loads(lines[-1].removeprefix("wrk-result "))
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return {
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "comments_per_s": round(raw["requests"] / seconds, 1) if seconds else 0.0,
        # wrk counts a status >= 400 as a status error; 201 and 200 look alike to it, which is
        # why the server's own count of accepted comments is set beside `requests`.
        "status_errors": raw["status_errors"],
        "socket_errors": errors,
        "ack": {
            "n": raw["requests"],
            "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "p99_9_ms": raw["p99_9_us"] / 1000,
            "max_ms": raw["max_us"] / 1000,
        },
    }


async def cpu_speed(group: ProcGroup, tag: str, units: int) -> dict[str, float] | None:
    """bench/calibrate.py on the server's core: CPU ms per fixed unit of work (lower: faster)."""
    argv = [sys.executable, "-m", "bench.calibrate", str(units)]
    code, output, _ = await group.run_once(f"calibrate-{tag}", "server", argv, within=30)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        return None
    speed: dict[str, float] = orjson.loads(lines[-1])
    return speed


async def ingest(ctx: Context, out: dict[str, Any]) -> None:
    scale = ctx.scale
    run: dict[str, Any] = out.setdefault("livecomments", {})
    ctx.log("ingest: livecomments (python-socketio has no durable write to compare)")
    async with ProcGroup(ctx.workdir, ctx.pinning) as group:
        poster = await group.worker("ingest-poster", "poster")  # boots while the server starts
        server = await start_server(group, ctx, "livecomments", "ingest")
        queue_dir = ctx.workdir / "ingest-livecomments" / "queue"
        run["fsync"] = await asyncio.to_thread(fsync_floor, queue_dir, scale.fsync_n)
        ctx.log(f"  fsync floor: {run['fsync']}")
        await poster.call(30, cmd="connect", port=server.port, connections=1, pad=PAD)
        levels: dict[str, Any] = run.setdefault("concurrency", {})
        for c in scale.ingest_concurrency:
            speed = await cpu_speed(group, f"ingest-c{c}", scale.calibrate_units)
            server_cpu, loadgen_cpu = CpuMeter([server.proc.pid]), CpuMeter([poster.pid])
            system = SystemMeter()
            server_cpu.start()
            loadgen_cpu.start()
            system.start()
            reply = await poster.call(
                scale.ingest_s + 30,
                cmd="closed",
                posts=INGEST_POSTS,
                connections=c,
                duration=scale.ingest_s,
            )
            ack = Histogram()
            ack.merge_pairs(reply["ack"], reply["ack_max_us"])
            level = {
                "comments_per_s": reply["rate"],
                "ok": reply["ok"],
                "statuses": reply["statuses"],
                "ack": ack.summary(),
                "server_cpu": server_cpu.cores(),
                "loadgen_cpu": loadgen_cpu.cores(),
                "machine_cpu": system.stop(),
                "cpu_speed": speed,
            }
            levels[str(c)] = level
            ctx.log(
                f"  concurrency {c}: {level['comments_per_s']}/s, ack p50 "
                f"{level['ack']['p50_ms']} p99 {level['ack']['p99_ms']} ms, "
                f"server cpu {level['server_cpu']}, loadgen cpu {level['loadgen_cpu']}, "
                f"cpu speed {_unit_ms(speed)}"
            )
            if c == scale.wrk_connections:
                # Right after the harness's own level, on the same server: the two load
                # generators are compared a few seconds apart, not a day apart.
                run["wrk"] = await _wrk_ingest(ctx, group, server, c, scale.wrk_s)
        run["server_counters"] = await server_counters(server)


def _unit_ms(speed: dict[str, float] | None) -> str:
    return f"{speed['unit_ms']} ms/unit" if speed else "?"


async def _wrk_ingest(
    ctx: Context, group: ProcGroup, server: Server, connections: int, seconds: int
) -> dict[str, Any]:
    """wrk posting comments on the load generators' core, as the harness pins its own poster."""
    if shutil.which("wrk") is None:
        ctx.log("  wrk: skipped: wrk is not installed (apt-get install wrk); harness figures only")
        return {"skipped": "wrk is not installed (apt-get install wrk)"}
    argv = wrk_command(connections, seconds, server.port)
    speed = await cpu_speed(group, "wrk", ctx.scale.calibrate_units)
    before = await server_counters(server)
    server_cpu, system = CpuMeter([server.proc.pid]), SystemMeter()
    server_cpu.start()
    system.start()
    env = dict(os.environ, WRK_POSTS=str(WRK_POSTS), WRK_MESSAGE_CHARS=str(WRK_MESSAGE_CHARS))
    code, output, wrk_cpu = await group.run_once("ingest-wrk", "loadgen", argv, seconds + 30, env)
    wall = server_cpu.elapsed()
    result = {
        "command": " ".join(
            group.pinning.prefix("loadgen") + argv[:-1] + ["http://127.0.0.1:PORT"]
        ),
        "connections": connections,
        "posts": WRK_POSTS,
        "message_chars": WRK_MESSAGE_CHARS,
        "exit": code,
        **parse_wrk(output),
        "server_cpu": server_cpu.cores(),
        "loadgen_cpu": round(wrk_cpu / wall, 3) if wall > 0 else 0.0,
        "machine_cpu": system.stop(),
        "cpu_speed": speed,
    }
    after = await server_counters(server)
    key = "comments_accepted_total"
    if key in before and key in after:
        result["accepted_by_server"] = int(after[key] - before[key])
    ack = result["ack"]
    ctx.log(
        f"  wrk -c{connections}: {result['comments_per_s']}/s, ack p50 {ack['p50_ms']} "
        f"p99 {ack['p99_ms']} ms, server cpu {result['server_cpu']}, "
        f"wrk cpu {result['loadgen_cpu']}, cpu speed {_unit_ms(speed)}"
    )
    return result


# -- 4. idle -----------------------------------------------------------------------------------


async def idle(ctx: Context, out: dict[str, Any]) -> None:
    scale = ctx.scale
    for kind in ctx.servers:
        run: dict[str, Any] = out.setdefault(kind, {})
        ctx.log(f"idle: {kind}, {scale.idle_n} sockets")
        async with ProcGroup(ctx.workdir, ctx.pinning) as group:
            starting = start_server(group, ctx, kind, "idle")
            load = await Load.start(group, starting, scale, f"idle-{kind}")
            server = load.server
            # Warm up: the first sockets load code paths and caches that are not per socket.
            await load.open_sockets([["warm"]] * 16, 30)
            await load.each(10, cmd="close", within=1.0)
            await asyncio.sleep(scale.idle_settle_s)
            pid = server.proc.pid
            before = rss_kib(pid)
            subs = [[f"idle-{i % scale.idle_posts}"] for i in range(scale.idle_n)]
            run["sockets"] = await load.open_sockets(subs, 120)
            await asyncio.sleep(scale.idle_settle_s)
            after = rss_kib(pid)
            opened = run["sockets"]["opened"]
            server_cpu = CpuMeter([pid])
            server_cpu.start()
            await asyncio.sleep(scale.idle_hold_s)
            statuses = await load.each(10, cmd="status")
            run.update(
                {
                    "rss_before_kib": before,
                    "rss_after_kib": after,
                    "rss_per_socket_kib": round((after - before) / opened, 2) if opened else None,
                    "held_after_hold": sum(s["open"] for s in statuses),
                    "hold_s": scale.idle_hold_s,
                    "server_cpu_idle": server_cpu.cores(),
                }
            )
            ctx.log(
                f"  rss {before} -> {after} KiB: {run['rss_per_socket_kib']} KiB/socket, "
                f"{run['held_after_hold']} of {scale.idle_n} held; "
                f"opened in {run['sockets']['seconds']} s"
            )


# -- 5. one comment at a time -------------------------------------------------------------------


async def latency(ctx: Context, out: dict[str, Any]) -> None:
    """POST -> socket with nothing else going on: each comment waits for the previous one to
    arrive (bench/latency.py's loop, in the orchestrator on the load generators' core). First one
    instance, the socket on the instance that took the POST; then two instances sharing
    `latency_redis` private redis-server processes, the socket on the other instance, so every
    comment crosses Redis. Every server-side process (instances, Redis) is on the server's core."""
    scale = ctx.scale
    run: dict[str, Any] = out.setdefault("livecomments", {})
    ctx.log(f"latency: livecomments, {scale.latency_n} comments one at a time")
    async with ProcGroup(ctx.workdir, ctx.pinning) as group:
        server = await start_server(group, ctx, "livecomments", "latency")
        run["one_instance"] = await _one_at_a_time(ctx, server, server)
    if not scale.latency_redis:
        return
    if shutil.which("redis-server") is None:
        why = "redis-server is not installed"
        ctx.log(f"  via Redis: skipped: {why}")
        run["via_redis"] = {"skipped": why}
        return
    async with ProcGroup(ctx.workdir, ctx.pinning) as group:
        ports = [
            await start_redis(group, ctx, f"latency-redis{i}") for i in range(scale.latency_redis)
        ]
        urls = ",".join(f"redis://127.0.0.1:{port}/0" for port in ports)
        env = {"LIVECOMMENTS_REDIS_URLS": urls}
        poster = await start_server(group, ctx, "livecomments", "latency-i1", env)
        watcher = await start_server(group, ctx, "livecomments", "latency-i2", env)
        run["via_redis"] = await _one_at_a_time(ctx, poster, watcher)
        run["via_redis"]["redis_servers"] = scale.latency_redis


async def _one_at_a_time(ctx: Context, poster: Server, watcher: Server) -> dict[str, Any]:
    from bench.latency import one_at_a_time  # noqa: PLC0415 (aiohttp's client: this scenario only)

    scale = ctx.scale
    to_socket, to_ack = await one_at_a_time(
        _url(poster.port), _url(watcher.port) + "/v1/ws", scale.latency_n, scale.latency_warmup
    )
    socket_hist, ack_hist = Histogram(), Histogram()
    for ms in to_socket:
        socket_hist.add(round(ms * 1000))
    for ms in to_ack:
        ack_hist.add(round(ms * 1000))
    result = {"to_socket": socket_hist.summary(), "to_ack": ack_hist.summary()}
    where = "one instance" if poster is watcher else "via Redis"
    ctx.log(
        f"  {where}: POST -> socket p50 {result['to_socket']['p50_ms']} p99 "
        f"{result['to_socket']['p99_ms']} ms; POST -> 201 p50 {result['to_ack']['p50_ms']} "
        f"p99 {result['to_ack']['p99_ms']} ms"
    )
    return result


async def start_redis(group: ProcGroup, ctx: Context, name: str) -> int:
    """A private redis-server on a free port (never the machine's shared 6379), no persistence,
    on the server's core; its port once it answers PING."""
    port = free_port()
    data = ctx.workdir / name
    data.mkdir(parents=True, exist_ok=True)
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(data)]
    await group.service(name, argv, _redis_answers, port)
    return port


async def _redis_answers(port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# -- 6. backlog drain into PostgreSQL ------------------------------------------------------------


def postgres_installed() -> bool:
    """As bench/drain_postgres.py decides (tests/pg_cluster.py finds the binaries)."""
    return shutil.which("pg_ctl") is not None or Path("/usr/lib/postgresql").is_dir()


def parse_drain(output: str) -> dict[str, Any]:
    """The `drain-result {...}` line of bench/drain_postgres.py (the last one)."""
    lines = [line for line in output.splitlines() if line.startswith("drain-result ")]
    if not lines:
        raise RuntimeError(f"drain_postgres printed no result line:\n{output[-2000:]}")
    result: dict[str, Any] = orjson.loads(lines[-1].removeprefix("drain-result "))
    return result


async def drain(ctx: Context, out: dict[str, Any]) -> None:
    """`python -m bench.drain_postgres` per `drain_batches`: a backlog queued while a private
    PostgreSQL was down, drained once it is back, through the service's own queue, flusher and
    store. Not one core: the tool and the PostgreSQL it starts share both CPUs (a database has
    its own machine in production)."""
    scale = ctx.scale
    run: dict[str, Any] = out.setdefault("livecomments", {})
    if not scale.drain_comments:
        ctx.log(f"drain: not run in {scale.name} mode")
        run["skipped"] = f"not run in {scale.name} mode"
        return
    if not postgres_installed():
        why = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        ctx.log(f"drain: skipped: {why}")
        run["skipped"] = why
        return
    batches: dict[str, Any] = run.setdefault("batch", {})
    async with ProcGroup(ctx.workdir, ctx.pinning) as group:
        for batch in scale.drain_batches:
            ctx.log(f"drain: {scale.drain_comments:,} comments, batch {batch}")
            argv = [sys.executable, "-m", "bench.drain_postgres"]
            argv += ["--comments", str(scale.drain_comments), "--batch", str(batch)]
            code, output, _ = await group.run_once(f"drain-{batch}", "both", argv, within=120)
            if code != 0:
                raise RuntimeError(f"drain_postgres exited {code}:\n{output[-2000:]}")
            result = parse_drain(output)
            batches[str(batch)] = result
            ctx.log(
                f"  drained {result['drain_per_s']:,}/s; enqueued {result['enqueue_per_s']:,}/s; "
                f"{result['queue_bytes_per_comment']} bytes per comment in the queue"
            )


Scenario = Callable[[Context, dict[str, Any]], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {
    "hot_post": hot_post,
    "hot_post_redis": hot_post_redis,
    "many_posts": many_posts,
    "ingest": ingest,
    "idle": idle,
    "latency": latency,
    "drain": drain,
}

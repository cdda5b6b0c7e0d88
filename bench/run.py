"""`python -m bench.run [--quick]`: every benchmark scenario, then the table and the files.

Writes `bench/results/<date>-<hhmmss>.json` (`...-quick.json` for `--quick`, which git ignores)
and, for the full scale, `BENCHMARKS.md`. Exit status 0 when every scenario ran (whether or not
the targets were met), 1 when one failed or hit its time cap, 130 on Ctrl-C. Every process it
started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench import report
from bench.procs import REPO, Pinning, ProcGroup, raise_nofile, started_processes
from bench.scenarios import (
    LIVECOMMENTS_SETTINGS,
    SCALES,
    SCENARIOS,
    Context,
    check_settings,
    cpu_speed,
)

PEERS = ("livecomments", "socketio")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a smaller run of every scenario (< 60 s)")
    p.add_argument("--scale", choices=sorted(SCALES), help="full (default), quick, or smoke")
    p.add_argument("--only", help=f"comma-separated scenarios, of: {', '.join(SCENARIOS)}")
    p.add_argument("--servers", default=",".join(PEERS), help="livecomments,socketio")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results dir")
    p.add_argument("--markdown", type=Path, help="where to write BENCHMARKS.md")
    p.add_argument("--no-markdown", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--profile", action="store_true", help="py-spy on our server, hot post")
    p.add_argument("--hot-sizes", help="subscriber counts of the hot post, e.g. 10000")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--loadgen-cpus", default="1")
    p.add_argument("--keep-workdir", action="store_true", help="keep data dirs and logs")
    args = p.parse_args(argv)
    args.scale = args.scale or ("quick" if args.quick else "full")
    # BENCHMARKS.md is one whole full run: a smaller or partial run does not replace it.
    whole = args.scale == "full" and not args.only and not args.hot_sizes
    if args.markdown is None and whole and not args.no_markdown:
        args.markdown = REPO / "BENCHMARKS.md"
    if args.no_markdown:
        args.markdown = None
    return args


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def machine_info(workdir: Path) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) // 1024:,} MiB"
    versions = []
    for dist in ("aiohttp", "uvloop", "orjson", "python-socketio", "python-engineio"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        commit = head + ("+changes" if dirty else "")
    wrk = "not installed"
    if shutil.which("wrk"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(["wrk", "-v"], capture_output=True, timeout=5, check=False)
            wrk = done.stdout.decode(errors="replace").splitlines()[0].split(" Copyright")[0]
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": ", ".join(versions),
        "wrk": wrk,
        "commit": commit,
        "workdir_parent": str(workdir.parent),
        "workdir_fs": _filesystem(workdir),
    }


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=5, check=False)
    return done.stdout.decode().strip()


def _filesystem(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            dev, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, f"{fstype} on {dev}"
    return kind


async def run(args: argparse.Namespace) -> int:
    scale = SCALES[args.scale]
    if args.hot_sizes:
        scale = replace(scale, hot_sizes=tuple(int(x) for x in args.hot_sizes.split(",")))
    soft, _ = raise_nofile()
    pinning = Pinning.choose(args.server_cpu, args.loadgen_cpus)
    pinning.pin_self()
    servers = tuple(s for s in args.servers.split(",") if s)
    if unknown := set(servers) - set(PEERS):
        raise SystemExit(f"unknown server {unknown}; choose from {PEERS}")
    notes = []
    if "socketio" in servers and importlib.util.find_spec("socketio") is None:
        servers = tuple(s for s in servers if s != "socketio")
        notes.append("python-socketio not installed (pip install -e '.[bench]'): peer skipped")
    chosen = args.only.split(",") if args.only else list(SCENARIOS)
    if unknown := set(chosen) - set(SCENARIOS):
        raise SystemExit(f"unknown scenario {unknown}; choose from {list(SCENARIOS)}")

    if "livecomments" in servers:
        check_settings()
    workdir = Path(tempfile.mkdtemp(prefix="livecomments-bench-"))
    args.out.mkdir(parents=True, exist_ok=True)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = report.results_path(args.out, started_at, scale.name)
    ctx = Context(scale, pinning, workdir, servers, path, args.profile, log, notes=notes)
    detail = asdict(scale) | {"pad": 80}
    results: dict[str, Any] = {
        "version": 1,
        "started": started_at,
        "scale": scale.name,
        "scale_detail": detail,
        "servers": list(servers),
        "machine": machine_info(workdir) | {"nofile": soft},
        "pinning": asdict(pinning),
        "settings": {k: v for k, (v, _) in LIVECOMMENTS_SETTINGS.items()},
        "notes": notes,
        "only": chosen if args.only else None,
        "loadavg_start": list(os.getloadavg()),
        "scenarios": {},
    }
    for note in notes:
        log(f"note: {note}")
    log(f"bench: scale {scale.name}, servers {', '.join(servers)}, workdir {workdir}")
    started = time.monotonic()
    failures = 0
    interrupted = False
    try:
        results["cpu_speed_start"] = await measure_cpu_speed(ctx, "start")
        for name in chosen:
            out: dict[str, Any] = results["scenarios"].setdefault(name, {})
            failures += not await run_scenario(ctx, name, out)
        results["cpu_speed_end"] = await measure_cpu_speed(ctx, "end")
    except asyncio.CancelledError:
        interrupted = True
        results["interrupted"] = True
        log("interrupted: every started process was stopped")
    finally:
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        results["loadavg_end"] = list(os.getloadavg())
        results["noise"] = report.noise(results)
        results["targets"] = report.targets(results)
        results["profiles"] = ctx.profiles
        results["processes"] = started_processes()
        report.write_json(path, results)
        if failures or interrupted or args.keep_workdir:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        return 130
    print_report(results, path, args.markdown)
    return 1 if failures else 0


async def measure_cpu_speed(ctx: Context, tag: str) -> dict[str, float] | None:
    """How fast the server's core is now (bench/calibrate.py): figures of runs whose speeds
    differ cannot be compared, whatever the busy share of the CPUs says."""
    async with ProcGroup(ctx.workdir, ctx.pinning) as group:
        speed = await cpu_speed(group, tag, ctx.scale.calibrate_units)
    log(f"cpu speed ({tag}): {speed}")
    return speed


async def run_scenario(ctx: Context, name: str, out: dict[str, Any]) -> bool:
    """One scenario under its time cap; False (and `out["error"]`) if it failed."""
    cap = ctx.scale.caps[name]
    t0 = time.monotonic()
    capped = asyncio.timeout(cap)
    ok = False
    try:
        async with capped:
            await SCENARIOS[name](ctx, out)
        ok = True
    except TimeoutError as e:
        out["error"] = (
            f"time cap of {cap:g} s reached; results so far kept"
            if capped.expired()
            else f"TimeoutError: {e}"
        )
        log(f"{name}: {out['error']}")
    except Exception as e:  # recorded and reported; the next scenario still runs
        out["error"] = f"{type(e).__name__}: {e}"
        (ctx.workdir / f"{name}-error.txt").write_text(traceback.format_exc())
        log(f"{name}: FAILED: {out['error'][:2000]}")
    out["seconds"] = round(time.monotonic() - t0, 1)
    return ok


def print_report(results: dict[str, Any], path: Path, markdown: Path | None) -> None:
    print(report.table(results))
    print()
    print(report.targets_table(results))
    print()
    print(f"load generator: {report.loadgen_summary(results)}")
    if results["profiles"]:
        print()
        print(report.profile_text(results))
    print(f"\nresults: {path} ({results['elapsed_s']} s)")
    if markdown is not None:
        markdown.write_text(report.markdown(results, path.name))
        print(f"report: {markdown}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    async def guarded() -> int:
        # SIGTERM is handled like Ctrl-C: cancel, so every child is stopped on the way out.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await run(args)
        except asyncio.CancelledError:
            return 130

    try:
        return asyncio.run(guarded())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

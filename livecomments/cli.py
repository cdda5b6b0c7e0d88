"""`livecomments serve | migrate`: the process around the app (config, logging, signals)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from livecomments.api.app import apply_reload, create_app, drain, runner_options
from livecomments.api.connections import guard_connections
from livecomments.api.keys import IDS
from livecomments.config import ConfigError, Settings, load_settings
from livecomments.storage import open_store

log = logging.getLogger("livecomments")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as e:
        print(f"livecomments: config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log.level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.server").addFilter(_drop_malformed_http)
    runner = _event_loop_runner()
    if args.command == "migrate":
        return runner(migrate(settings))
    return runner(serve(settings, args.config))


def _drop_malformed_http(record: logging.LogRecord) -> bool:
    """aiohttp logs a traceback at ERROR for every unparseable HTTP request (it answers 400
    itself): any client could fill the log with them, one per request. Keep the rest."""
    error = record.exc_info[1] if record.exc_info else None
    return not isinstance(error, HttpProcessingError)


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the command: `livecomments serve --config x.toml`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="path to config.toml (default: ./config.toml if present)",
    )
    parser = argparse.ArgumentParser(prog="livecomments", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the service", parents=[common])
    serve_cmd.add_argument("--host", help="overrides server.host")
    serve_cmd.add_argument("--port", type=int, help="overrides server.port")
    sub.add_parser("migrate", help="apply database schema migrations and exit", parents=[common])
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    path = getattr(args, "config", None)
    if path is None and Path("config.toml").is_file():
        path = "config.toml"
    args.config = path
    settings = load_settings(path)
    server = settings.server
    if getattr(args, "host", None):
        server = replace(server, host=args.host)
    if getattr(args, "port", None) is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port: must be between 0 and 65535, got {args.port}")
        server = replace(server, port=args.port)
    return replace(settings, server=server)


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop when installed: its faster socket I/O is most of what a fan-out process does."""
    try:
        import uvloop  # noqa: PLC0415 (optional)
    except ImportError:
        return asyncio.run
    return uvloop.run


async def _reload(app: web.Application, config_path: str | None) -> None:
    """SIGHUP: re-read the config file and environment; runtime-changeable keys take effect."""
    try:
        await apply_reload(app, load_settings(config_path))
    except (ConfigError, ValueError) as e:
        log.error("reload: kept the running configuration: %s", e)
    except Exception:
        log.exception("reload: failed; kept the running configuration")


# Young-generation threshold of the cyclic GC (CPython's default is 700), and how many young
# collections make a middle one, and middle ones an old one (defaults 10 and 10).
GC_THRESHOLDS = (10_000, 20, 100)


def tune_gc() -> None:
    """Keep the cyclic garbage collector's pauses out of the latency of live delivery.

    With 10k sockets the process holds millions of objects, and CPython's default thresholds
    ran old-generation collections every few hundred ms under load, each pausing the event loop
    for 30-600 ms (measured with gc.callbacks in the many-posts benchmark: p99 17.8 ms; with this,
    4.2 ms). Two changes: everything alive at start-up (modules, classes: hundreds of thousands
    of objects that never become garbage) is moved out of the collector's sight with
    gc.freeze(), and collections run less often. Cycles are still collected, just in fewer,
    larger young passes."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(settings: Settings, config_path: str | None = None) -> int:
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        shutdown_timeout=settings.server.shutdown_timeout,
        handle_signals=False,
        access_log=None,
        **runner_options(settings),
    )
    try:
        await runner.setup()
    except Exception as e:
        log.error("cannot start: %s", e)
        await runner.cleanup()
        return 1
    assert runner.server is not None
    guard_connections(runner.server, settings.limits.max_connections)
    site = web.TCPSite(runner, settings.server.host, settings.server.port, backlog=1024)
    try:
        await site.start()
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", settings.server.host, settings.server.port, e)
        await runner.cleanup()
        return 1
    host, port = _bound_address(runner)
    tune_gc()
    instance = app[IDS].instance_id
    log.info(
        "listening on http://%s:%d/ (instance %s; auth %s)",
        host,
        port,
        "pending" if instance is None else instance,
        _auth_summary(settings),
    )
    await _until_stopped(app, config_path)
    log.info("stopping: flushing the queue into the streams and the database")
    await runner.cleanup()
    log.info("stopped")
    return 0


def _auth_summary(settings: Settings) -> str:
    """The start-up line says how open the service is: a service in open mode on the internet
    should be a choice, not a surprise."""
    auth = settings.auth
    if auth.mode == "open":
        return "mode open: anyone may post as any uid; see the README's Security section"
    return f"mode jwt, reading {auth.read}"


async def _until_stopped(app: web.Application, config_path: str | None) -> None:
    """Serve until a signal says stop. SIGTERM drains first (viewers are handed to other nodes
    over server.drain_seconds, see api/lifecycle.py); SIGINT, or a second signal during the
    drain, stops at once (sockets closed with 1001). SIGUSR1 drains and keeps running, for a node
    about to be removed; SIGHUP reloads the config."""
    stop = asyncio.Event()
    drain_first = True
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_stop(drain: bool) -> None:
        nonlocal drain_first
        drain_first = drain_first and drain and not stop.is_set()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop, True)
    loop.add_signal_handler(signal.SIGINT, on_stop, False)
    loop.add_signal_handler(signal.SIGUSR1, lambda: spawn(drain(app)))
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(_reload(app, config_path)))
    await stop.wait()
    if drain_first:
        stop.clear()
        draining = asyncio.create_task(drain(app))
        again = asyncio.create_task(stop.wait())  # a second signal cuts the drain short
        await asyncio.wait({draining, again}, return_when=asyncio.FIRST_COMPLETED)
        for task in (draining, again):
            task.cancel()
        await asyncio.gather(draining, again, return_exceptions=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _bound_address(runner: web.AppRunner) -> tuple[str, int]:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return str(address[0]), int(address[1])
    return "?", 0


async def migrate(settings: Settings) -> int:
    store = open_store(settings.store.url)
    try:
        await store.open()
    except Exception as e:
        log.error("migrate: %s", e)
        return 1
    finally:
        with contextlib.suppress(Exception):
            await store.close()
    log.info("migrate: schema is up to date")
    return 0

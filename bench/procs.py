"""The processes of a run: servers pinned to one core, load generators pinned to the other.

Every process is started inside a `ProcGroup`, which stops all of them when its block ends,
whether it ended well, on an error, on a time cap or on Ctrl-C: SIGTERM, a bounded wait, then
SIGKILL, each by pid. As a second line of defence every child asks the kernel for SIGTERM when
the orchestrator dies (PR_SET_PDEATHSIG), and load generators also exit at end of their stdin.

CPU use is read from /proc/PID/stat (utime + stime, every thread), memory from /proc/PID/status
(VmRSS), so the numbers are the kernel's, not the processes' own accounts.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

import orjson

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
READY_TIMEOUT = 30.0  # seconds a server may take to answer /healthz


# Every child ever started: the last resort at interpreter exit kills those still unreaped.
_STARTED: list[asyncio.subprocess.Process] = []
# (name, process) of every child, for the results: each one's exit status shows it was stopped.
_NAMED: list[tuple[str, asyncio.subprocess.Process]] = []


def started_processes() -> list[dict[str, Any]]:
    return [{"name": n, "pid": p.pid, "exit": p.returncode} for n, p in _NAMED]


@atexit.register
def _kill_leftovers() -> None:
    for process in _STARTED:
        if process.returncode is None:  # not reaped, so the pid is still this child's
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


class WorkerError(RuntimeError):
    """A load generator refused a command, died, or did not answer in time."""


class ServerDied(RuntimeError):
    """A server process exited before it answered /healthz."""


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit, for this process and (inherited) its children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the server and the load generators run on (None: not pinned)."""

    server_cpu: int | None
    loadgen_cpus: str | None
    note: str = ""

    @classmethod
    def choose(cls, server_cpu: int, loadgen_cpus: str) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if shutil.which("taskset") is None:
            return cls(None, None, "taskset not found: processes not pinned")
        if len(cpus) < 2:
            return cls(None, None, f"only CPUs {cpus} available: processes not pinned")
        return cls(server_cpu, loadgen_cpus)

    @property
    def loadgen_cpu_count(self) -> int:
        return len(_cpu_list(self.loadgen_cpus)) if self.loadgen_cpus else 1

    def prefix(self, role: str) -> list[str]:
        """`taskset` for a role: `server`, `loadgen`, or `both` (a tool that starts its own
        services, which then get the machine's CPUs rather than one core)."""
        cpus = str(self.server_cpu) if role == "server" else self.loadgen_cpus
        if role == "both" and self.server_cpu is not None:
            cpus = f"{self.server_cpu},{self.loadgen_cpus}"
        if cpus is None or cpus == "None":
            return []
        return ["taskset", "-c", cpus]

    def pin_self(self) -> None:
        """The orchestrator waits on the load generators' core, never on the server's."""
        if self.loadgen_cpus is not None:
            os.sched_setaffinity(0, _cpu_list(self.loadgen_cpus))


def _cpu_list(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _append(path: Path) -> BinaryIO:
    return open(path, "ab")  # closed by the caller's `with`


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the orchestrator dies. Survives exec."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    is_server: bool = False
    stop_last: bool = False  # a service the servers use (Redis): stopped after them

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill_now(self) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def stop_gently(self) -> int | None:
        """SIGINT first (py-spy writes its samples on it), then `stop()`."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
        return await self.stop()

    async def stop(self) -> int | None:
        """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL; returns the exit code."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
        return self.process.returncode


class Worker(Proc):
    """A load generator process (loadgen.py) and its JSON-lines command channel."""

    async def call(self, wait: float, /, **cmd: Any) -> dict[str, Any]:
        """Send one command; its result, within `wait` seconds."""
        proc = self.process
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(orjson.dumps(cmd) + b"\n")
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), wait)
        except (TimeoutError, ConnectionError) as e:
            raise WorkerError(f"{self.name}: no answer to {cmd['cmd']!r}: {e!r}") from e
        if not line:
            raise WorkerError(f"{self.name} exited:\n{self.log_tail()}")
        reply: dict[str, Any] = orjson.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.name}: {cmd['cmd']!r} failed: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def stop(self) -> int | None:
        if self.running and self.process.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.process.stdin.close()  # the worker exits at end of input
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 3.0)
        return await super().stop()


@dataclass
class ProcGroup:
    """Starts processes; stops every one of them when the `async with` block ends."""

    workdir: Path
    pinning: Pinning
    procs: list[Proc] = field(default_factory=list)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_all()

    async def stop_all(self) -> None:
        """Load generators first (their sockets close), then servers, which then stop sooner."""
        procs, self.procs = self.procs, []
        try:
            await asyncio.gather(*(p.stop() for p in procs if not p.is_server))
            await asyncio.gather(*(p.stop() for p in procs if p.is_server and not p.stop_last))
            await asyncio.gather(*(p.stop() for p in procs if p.stop_last))
        except BaseException:
            # Interrupted while stopping (a second Ctrl-C): no child is left behind.
            for p in procs:
                p.kill_now()
            raise

    async def _spawn(
        self, name: str, role: str, argv: list[str], env: dict[str, str] | None, pipes: bool
    ) -> tuple[asyncio.subprocess.Process, Path]:
        log_path = self.workdir / f"{name}.log"
        with _append(log_path) as log:
            process = await asyncio.create_subprocess_exec(
                *self.pinning.prefix(role),
                *argv,
                cwd=REPO,
                env=env,
                stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipes else log,
                stderr=log,
                preexec_fn=_die_with_parent,
            )
        _STARTED.append(process)
        _NAMED.append((name, process))
        return process, log_path

    async def worker(self, name: str, role: str) -> Worker:
        argv = [sys.executable, "-m", "bench.loadgen", "--role", role]
        process, log_path = await self._spawn(name, "loadgen", argv, None, pipes=True)
        worker = Worker(name, process, log_path)
        self.procs.append(worker)
        return worker

    async def helper(self, name: str, argv: list[str]) -> Proc:
        """A tool on the load generators' core (py-spy)."""
        process, log_path = await self._spawn(name, "loadgen", argv, None, pipes=False)
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    async def run_once(
        self,
        name: str,
        role: str,
        argv: list[str],
        within: float,
        env: dict[str, str] | None = None,
    ) -> tuple[int, str, float]:
        """Run a tool to its end on `role`'s CPUs (`loadgen` or `server`): its exit status, its
        output (stdout and stderr), and the CPU seconds it used. Killed after `within` seconds.

        Its CPU comes from RUSAGE_CHILDREN, which counts a child once it is reaped: the caller
        must have no other child ending meanwhile (a scenario's servers and workers end later).
        """
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        process, log_path = await self._spawn(name, role, argv, env, pipes=False)
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        try:
            code = await asyncio.wait_for(process.wait(), within)
        except TimeoutError:
            tail = proc.log_tail()
            raise WorkerError(f"{name} did not finish within {within:g} s:\n{tail}") from None
        finally:
            await proc.stop()
            self.procs.remove(proc)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return code, proc.log_tail(100_000), cpu

    async def server(self, name: str, argv: list[str], env: dict[str, str], port: int) -> Proc:
        """Start a server and wait until `GET /healthz` answers 200."""
        return await self.service(name, argv, _healthy, port, env=env, stop_last=False)

    async def service(
        self,
        name: str,
        argv: list[str],
        ready: Callable[[int], Awaitable[bool]],
        port: int,
        *,
        env: dict[str, str] | None = None,
        stop_last: bool = True,
    ) -> Proc:
        """Start a server-side process on the server's core; wait until `ready(port)`. A
        service (`stop_last`) is stopped after the servers, which may use it while stopping."""
        process, log_path = await self._spawn(name, "server", argv, env, pipes=False)
        proc = Proc(name, process, log_path, is_server=True, stop_last=stop_last)
        self.procs.append(proc)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if not proc.running:
                raise ServerDied(f"{name} exited with {process.returncode}:\n{proc.log_tail()}")
            if await ready(port):
                return proc
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{name} not ready after {READY_TIMEOUT}s:\n{proc.log_tail()}")


async def _healthy(port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 1.0)
        return status.startswith(b"HTTP/1.1 200")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def http_get(port: int, path: str, within: float = 5.0) -> bytes:
    """A small GET for /metrics; returns the body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), within)
    try:
        writer.write(
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path.encode()
        )
        # Connection: close: the server ends the body by closing the connection.
        data = await asyncio.wait_for(reader.read(), within)
        return data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class CpuMeter:
    """CPU seconds used by a set of processes since `start()`, and the wall time passed."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._c0 = 0.0

    def _total(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def start(self) -> None:
        self._t0, self._c0 = time.monotonic(), self._total()

    def used(self) -> float:
        return self._total() - self._c0

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def cores(self) -> float:
        """Average cores used since start() (1.0 = one CPU busy all the time)."""
        wall = self.elapsed()
        return round(self.used() / wall, 3) if wall > 0 else 0.0

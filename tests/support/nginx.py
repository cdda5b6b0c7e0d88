"""A private nginx in front of test servers: never the machine's own.

`Nginx(tmp_dir, upstreams)` writes its own `nginx.conf` into `tmp_dir` (nothing of the system's
config is included), listens on a free port of 127.0.0.1 and proxies everything, WebSockets
included, to one upstream block of `127.0.0.1:<port>` servers, round-robin. Its pid file, error
and access logs and every temp directory are in `tmp_dir`. `start()` runs it in the foreground
(`daemon off`, so the process we hold is the master) and waits, with a deadline, until it
accepts connections; `stop()` sends that pid SIGQUIT (a graceful stop, bounded by
`worker_shutdown_timeout`), waits, and kills it only if it does not go.

What the config promises (the lines the docs should show are marked in `render()`):

- `proxy_next_upstream error timeout http_503;`: a request whose upstream refuses the connection,
  times out, or answers 503 (a node that is draining or not ready) is passed to the next server,
  WebSocket upgrades included (they are GETs; nginx never retries a POST once sent). Each server
  is tried at most once per request (`proxy_next_upstream_tries` = the number of servers).
- `max_fails=0`: a server that failed is not set aside for `fail_timeout` (nginx's default is
  one failure, ten seconds), so every request tries the servers in round-robin order and a test
  sees the retry on every request, and a restarted node gets traffic at once. Production
  configs keep passive health checks (`max_fails=3 fail_timeout=10s`).
- WebSockets: HTTP/1.1 to the upstream with `Upgrade` and `Connection` passed through, and
  `proxy_read_timeout`/`proxy_send_timeout` of 90 s, above the server's 30 s ping.
- `X-Forwarded-For` is set (`$proxy_add_x_forwarded_for`).
- The access log has one tab-separated line per request: status, `$upstream_addr` (every server
  tried, comma-separated, the one that answered last), `$upstream_status`, method and URI,
  `X-Forwarded-For` as sent upstream. nginx writes a WebSocket's line when the socket closes,
  so read the log after closing the sockets (and poll: the worker writes it a moment later).

As root, the master runs its workers as root (`user root;`): the default `nobody` could not
read a test's temp directory. As any other user the `user` line is left out (nginx ignores it
and runs the workers as that user).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.server import free_port
from tests.support.wait import wait_for_blocking

DEBIAN_NGINX = "/usr/sbin/nginx"
# Seconds a graceful stop may take: open WebSockets are cut after this (worker_shutdown_timeout).
SHUTDOWN = 3
# Seconds nginx has to start, and to go once told to.
START_TIMEOUT = 10.0
# Connections per worker (a proxied WebSocket takes two): room for ~2000 test sockets. The file
# limit is raised to match; where the hard limit is lower, nginx logs it and goes on.
WORKER_CONNECTIONS = 4096
STOP_TIMEOUT = 10.0


def nginx_binary() -> str:
    """nginx's path; skips the test where it is missing, fails it under CI."""
    path = shutil.which("nginx") or (DEBIAN_NGINX if os.access(DEBIAN_NGINX, os.X_OK) else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have nginx (.ci/run installs it)")
        pytest.skip("nginx is not installed: apt-get install nginx")
    return path


@dataclass(frozen=True)
class AccessLogEntry:
    status: int
    upstream_addrs: list[str]  # every upstream tried, in order ("127.0.0.1:PORT")
    upstream_statuses: list[str]  # the status of each attempt ("503", "101", "502", ...)
    request: str  # "GET /v1/ws?post_id=p"
    forwarded_for: str

    @property
    def upstream_port(self) -> int | None:
        """The port of the upstream that gave the final answer."""
        if not self.upstream_addrs or ":" not in self.upstream_addrs[-1]:
            return None
        return int(self.upstream_addrs[-1].rsplit(":", 1)[1])


class Nginx:
    def __init__(self, tmp_dir: Path, upstreams: list[int]) -> None:
        if not upstreams:
            raise ValueError("nginx needs at least one upstream port")
        self.binary = nginx_binary()
        self.dir = Path(tmp_dir).resolve()
        self.upstreams = list(upstreams)
        self.port = free_port()
        self.conf_path = self.dir / "nginx.conf"
        self.error_log = self.dir / "error.log"
        self.access_log = self.dir / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def render(self) -> str:
        d = self.dir
        user = "user root;\n" if os.geteuid() == 0 else ""
        servers = "".join(f"        server 127.0.0.1:{p} max_fails=0;\n" for p in self.upstreams)
        return f"""# Written by tests/support/nginx.py; nothing of the system's config is included.
{user}worker_processes 1;
worker_rlimit_nofile {2 * WORKER_CONNECTIONS};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
worker_shutdown_timeout {SHUTDOWN}s;

events {{
    worker_connections {WORKER_CONNECTIONS};
}}

http {{
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    # One tab-separated line per request (log_format joins its strings); see AccessLogEntry.
    log_format upstreams "$status\\t$upstream_addr\\t$upstream_status\\t"
                         "$request_method $request_uri\\t$proxy_add_x_forwarded_for";
    access_log {d}/access.log upstreams;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream livecomments {{
{servers}    }}

    server {{
        listen 127.0.0.1:{self.port};

        location / {{
            proxy_pass http://livecomments;
            # For the docs: pass a refused, timed-out or 503 (draining) request to the next node.
            proxy_next_upstream error timeout http_503;
            proxy_next_upstream_tries {len(self.upstreams)};
            proxy_connect_timeout 2s;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 90s;
            proxy_send_timeout 90s;
            proxy_buffering off;
        }}
    }}
}}
"""

    def start(self, timeout: float = START_TIMEOUT) -> Nginx:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.render())
        log = open(self.dir / "stderr.log", "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            # -e: the error log used before the config is read (else /var/log/nginx/error.log).
            [
                self.binary,
                "-p",
                f"{self.dir}/",
                "-c",
                str(self.conf_path),
                "-e",
                str(self.error_log),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_blocking(self._answers, timeout, f"nginx on port {self.port} to listen")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGQUIT to the master (graceful: open sockets get `worker_shutdown_timeout`), then
        wait; SIGKILL only if it has not gone by `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def logs(self) -> str:
        parts = []
        for path in (self.dir / "stderr.log", self.error_log):
            with contextlib.suppress(OSError):  # not written yet: nothing to show
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def access_log_lines(self) -> list[str]:
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def access_log_entries(self) -> list[AccessLogEntry]:
        entries = []
        for line in self.access_log_lines():
            status, addrs, statuses, request, forwarded = line.split("\t")
            entries.append(
                AccessLogEntry(
                    status=int(status),
                    upstream_addrs=_split(addrs),
                    upstream_statuses=_split(statuses),
                    request=request,
                    forwarded_for=forwarded,
                )
            )
        return entries


def _split(value: str) -> list[str]:
    """`$upstream_addr`/`$upstream_status`: ", " between attempts (" : " between internal
    redirects, which this config has none of); "-" when no upstream was asked."""
    if value == "-":
        return []
    return [part.strip() for part in value.replace(" : ", ", ").split(",")]

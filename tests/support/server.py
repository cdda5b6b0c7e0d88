"""A real livecomments server in a subprocess, for functional tests.

`ServerProcess` starts `python -m livecomments serve` on a free port with its own data directory,
configured only through `LIVECOMMENTS_*` variables, waits (with a deadline) until /readyz answers,
and stops it by pid: `stop()` sends SIGTERM, `kill()` sends SIGKILL (a crash).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The rate limits are on by default (config.toml) at values a small site lives with; most tests
# post and connect far faster, from one address, as one author. They run with the limits off,
# and the tests of the limits (tests/functional/test_limits_functional.py) turn them on by
# passing their own values, which win.
LIMITS_OFF = {
    "LIVECOMMENTS_LIMITS_COMMENTS_PER_MINUTE": "0",
    "LIVECOMMENTS_LIMITS_WS_PER_IP": "0",
    "LIVECOMMENTS_LIMITS_WS_CONNECTS_PER_IP_PER_SECOND": "0",
    "LIVECOMMENTS_LIMITS_FRAMES_PER_SECOND": "0",
}


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and never handed out before in this test session: the
    kernel may give a just-released port again, and two servers of one test told the same port
    would look like one (the second fails to bind while the first answers its readiness check)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class ServerProcess:
    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        name: str = "server",
        config_path: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        # A config file to pass with --config (SIGHUP re-reads it); /dev/null when not given.
        self.config_path = config_path
        self.port = port or free_port()
        self.name = name
        self.log_path = data_dir / f"{name}-{self.port}.log"
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
        env.update(
            {
                "LIVECOMMENTS_SERVER_HOST": "127.0.0.1",
                "LIVECOMMENTS_SERVER_PORT": str(self.port),
                "LIVECOMMENTS_STORE_URL": f"sqlite:///{self.data_dir}/comments.db",
                "LIVECOMMENTS_QUEUE_DIR": str(self.data_dir / "queue"),
                "LIVECOMMENTS_LOG_LEVEL": "INFO",
                **LIMITS_OFF,
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "livecomments",
                "--config",
                str(self.config_path or os.devnull),
                "serve",
            ],
            cwd=REPO,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed, nothing closed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL if it does not stop in time)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise
        return self.proc.returncode

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

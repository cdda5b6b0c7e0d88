"""A private PostgreSQL cluster for tests and benches: never the machine's own server.

`PgCluster` runs `initdb` into a fresh temporary directory and `pg_ctl` on a free port, with its
socket in that directory and `fsync=off` (a test database need not survive a power cut; it must
survive its server being stopped and killed, which fsync=off does not change: commits still reach
the kernel before they return. So `synchronous_commit` stays on: off would lose the last commits
to `pg_ctl stop -m immediate`, which is a crash of the server process). The server refuses
to run as root, so as root every command runs as the `postgres` user (`runuser`), and the
directory is handed to it. The cluster is stopped by its own `pg_ctl stop`, nothing broader.

Fixtures: `pg_cluster` (one cluster per test session, started on first use) and `pg_url` (a fresh
database in it per test). Tests that stop the cluster restart it before they end; `pg_url` also
starts it if an earlier test left it down.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import free_port

PG_USER = "postgres"
# Seconds pg_ctl may take to start or stop the server; past it, it fails and says so.
PG_CTL_WAIT = 30


def pg_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else the newest Debian-style install."""
    found = shutil.which("pg_ctl")
    if found is not None and shutil.which("initdb") is not None:
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


class PgCluster:
    """One private PostgreSQL server in its own temporary directory."""

    def __init__(self, port: int | None = None) -> None:
        bin_dir = pg_bin_dir()
        if bin_dir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bin_dir = bin_dir
        self.port = port or free_port()
        self._as_root = os.geteuid() == 0
        # As root, under /tmp whatever TMPDIR says: the postgres user must reach the directory.
        self.root = Path(
            tempfile.mkdtemp(prefix="livecomments-pg-", dir="/tmp" if self._as_root else None)
        )
        self.data_dir = self.root / "data"
        self.log_path = self.root / "server.log"
        if self._as_root:
            pw = pwd.getpwnam(PG_USER)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.running = False

    def _cmd(self, tool: str, *args: str) -> list[str]:
        argv = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", PG_USER, "--", *argv] if self._as_root else argv

    def _check(self, argv: list[str]) -> None:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=PG_CTL_WAIT + 30
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}\n"
                f"{self.logs()}"
            )

    def init(self) -> PgCluster:
        """initdb: trust authentication for the `postgres` role, no fsync while building."""
        self._check(
            self._cmd("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", PG_USER, "-N")
        )
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off"
        )
        self._check(
            self._cmd(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-o",
                options,
                "-l",
                str(self.log_path),
                "-t",
                str(PG_CTL_WAIT),
                "-w",
                "start",
            )
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`fast`: clients are disconnected, a clean shutdown. `immediate`: a crash."""
        self._check(
            self._cmd(
                "pg_ctl", "-D", str(self.data_dir), "-m", mode, "-t", str(PG_CTL_WAIT), "-w", "stop"
            )
        )
        self.running = False

    def ensure_started(self) -> None:
        if not self.running:
            self.start()

    def destroy(self) -> None:
        """Stop the server if it runs (ignoring a failure to) and remove its directory."""
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self._check(
            self._cmd("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, name)
        )
        return self.url(name)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


_shared: PgCluster | None = None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's cluster. Test modules import this fixture, so it may be set up once per
    module that does; all of them share the one cluster, stopped when the session ends."""
    global _shared  # noqa: PLW0603 (one cluster per process, whichever module asks first)
    if _shared is None:
        if pg_bin_dir() is None:
            if os.environ.get("CI"):
                pytest.fail("CI must have the PostgreSQL server binaries (initdb, pg_ctl)")
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
        cluster = PgCluster().init()
        cluster.start()
        _shared = cluster
    yield _shared
    if _shared is not None:
        _shared.destroy()
        _shared = None


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh database in the session's cluster, which is started if a test left it down."""
    pg_cluster.ensure_started()
    return pg_cluster.create_database()

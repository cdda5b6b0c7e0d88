"""Settings: defaults, file, environment overrides, and errors that name the key."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from livecomments.api.app import create_app
from livecomments.config import (
    ConfigError,
    LimitsSettings,
    ServerSettings,
    Settings,
    load_settings,
)
from tests.support.server import REPO


def test_defaults_match_the_documented_config_toml():
    # The file's relative paths are relative to its directory: `make run` writes to ./data of
    # the repository, as the defaults do from the repository's root.
    defaults = Settings()
    expected = replace(
        defaults,
        store=replace(defaults.store, url=f"sqlite:///{REPO}/data/comments.db"),
        queue=replace(defaults.queue, dir=str(REPO / "data" / "queue")),
    )
    assert load_settings(REPO / "config.toml", environ={}) == expected


def test_environment_overrides_each_section():
    env = {
        "LIVECOMMENTS_SERVER_PORT": "8081",
        "LIVECOMMENTS_STORE_URL": "sqlite:////tmp/x/c.db",
        "LIVECOMMENTS_QUEUE_DIR": "/tmp/x/queue",
        "LIVECOMMENTS_LIMITS_MESSAGE_MAX_CHARS": "500",
        "LIVECOMMENTS_WEBSOCKET_HEARTBEAT": "5",
        "LIVECOMMENTS_REDIS_URLS": "redis://127.0.0.1:7001, redis://127.0.0.1:7002",
    }
    s = load_settings(None, environ=env)
    assert s.server.port == 8081
    assert s.store.url == "sqlite:////tmp/x/c.db"
    assert s.queue.dir == "/tmp/x/queue"
    assert s.limits.message_max_chars == 500
    assert s.websocket.heartbeat == 5.0
    assert s.redis.urls == ["redis://127.0.0.1:7001", "redis://127.0.0.1:7002"]


def test_environment_wins_over_the_file(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n')
    s = load_settings(path, environ={"LIVECOMMENTS_SERVER_PORT": "9001"})
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9001)


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[server]\nport = 'abc'\n", {}, "server.port"),
        ("[server]\nport = 70000\n", {}, "server.port"),
        ("[server]\nprot = 1\n", {}, "server.prot"),
        ("[nope]\n", {}, "nope"),
        ("", {"LIVECOMMENTS_SERVER_PORT": "eighty"}, "server.port"),
        ("", {"LIVECOMMENTS_WEBSOCKET_HEARTBEAT": "often"}, "websocket.heartbeat"),
        ("[store]\nurl = 'mysql://x'\n", {}, "store.url"),
        ("[log]\nlevel = 'LOUD'\n", {}, "log.level"),
        ("[limits]\npage_default = 500\n", {}, "limits.page_default"),
        ("[redis]\nurls = ['http://x']\n", {}, "redis.urls"),
        ("[server\n", {}, "config file"),
        ("", {"LIVECOMMENTS_SERVER_PROT": "1"}, "LIVECOMMENTS_SERVER_PROT"),
        ("", {"LIVECOMMENTS_STORE_URL": "sqlite://rel.db"}, "store.url"),
        ("", {"LIVECOMMENTS_STORE_URL": "sqlite:///"}, "store.url"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, env: dict[str, str], key: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(path, environ=env)
    assert str(e.value).startswith(key)


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_option_goes_before_or_after_the_command(tmp_path: Path, where: str):
    path = tmp_path / "c.toml"
    path.write_text("[queue]\nflush_batch = 0\n")  # invalid: proves the file was read
    args = (
        ["--config", str(path), "serve"] if where == "before" else ["serve", "--config", str(path)]
    )
    result = subprocess.run(
        [sys.executable, "-m", "livecomments", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2 and "queue.flush_batch" in result.stderr


def test_cli_exits_non_zero_with_one_line_naming_the_key(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text("[queue]\nflush_batch = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "livecomments", "--config", str(path), "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "queue.flush_batch" in lines[0]


# -- relative paths -----------------------------------------------------------------------------


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the config file's."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _config_in(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(text)
    return path


def test_relative_paths_in_the_file_are_relative_to_its_directory(tmp_path: Path, elsewhere: Path):
    etc = tmp_path / "etc"
    path = _config_in(etc, '[store]\nurl = "sqlite:///db/c.db"\n[queue]\ndir = "q"\n')
    s = load_settings(path, environ={})
    assert s.store.url == f"sqlite:///{etc}/db/c.db"
    assert s.queue.dir == str(etc / "q")


def test_a_relative_config_path_is_taken_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _config_in(tmp_path / "etc", '[queue]\ndir = "q"\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings("etc/config.toml", environ={}).queue.dir == str(tmp_path / "etc" / "q")


def test_environment_values_and_defaults_are_relative_to_the_working_directory(
    tmp_path: Path, elsewhere: Path
):
    etc = tmp_path / "etc"
    path = _config_in(etc, '[store]\nurl = "sqlite:///db/c.db"\n[queue]\ndir = "q"\n')
    s = load_settings(path, environ={"LIVECOMMENTS_QUEUE_DIR": "envq"})
    assert s.queue.dir == str(elsewhere / "envq")  # the variable wins, against the cwd
    assert s.store.url == f"sqlite:///{etc}/db/c.db"  # the file's own value, against its dir
    defaults = load_settings(_config_in(etc, ""), environ={})
    assert defaults.queue.dir == str(elsewhere / "data" / "queue")
    assert defaults.store.url == f"sqlite:///{elsewhere}/data/comments.db"
    no_file = load_settings(None, environ={"LIVECOMMENTS_STORE_URL": "sqlite:///x.db"})
    assert no_file.store.url == f"sqlite:///{elsewhere}/x.db"
    assert no_file.queue.dir == str(elsewhere / "data" / "queue")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////var/lib/livecomments/c.db",
        "postgresql://lc:secret@db:5432/livecomments",
        "postgres://db/livecomments",
    ],
)
def test_absolute_paths_and_other_urls_are_kept_as_written(
    tmp_path: Path, elsewhere: Path, url: str
):
    path = _config_in(tmp_path / "etc", f'[store]\nurl = "{url}"\n[queue]\ndir = "/var/q/"\n')
    s = load_settings(path, environ={})
    assert (s.store.url, s.queue.dir) == (url, "/var/q/")


async def test_the_queue_and_the_store_use_the_files_next_to_the_config(
    aiohttp_client: Any, tmp_path: Path, elsewhere: Path
):
    etc = tmp_path / "etc"
    path = _config_in(etc, '[store]\nurl = "sqlite:///data/c.db"\n[queue]\ndir = "data/q"\n')
    client = await aiohttp_client(create_app(load_settings(path, environ={})))
    body = {"post_id": "p", "uid": "u", "message": "m"}
    assert (await client.post("/v1/comments", json=body)).status == 201
    assert (etc / "data" / "q" / "queue.db").is_file()
    assert (etc / "data" / "c.db").is_file()
    assert list(elsewhere.iterdir()) == []


def test_migrate_creates_the_database_next_to_the_config(tmp_path: Path, elsewhere: Path):
    etc = tmp_path / "etc"
    path = _config_in(etc, '[store]\nurl = "sqlite:///data/c.db"\n')
    result = subprocess.run(
        [sys.executable, "-m", "livecomments", "--config", str(path), "migrate"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=elsewhere,
        env={**_environ_without_settings(), "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (etc / "data" / "c.db").is_file()
    assert list(elsewhere.iterdir()) == []


def _environ_without_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}


# -- the systemd unit ---------------------------------------------------------------------------

UNIT = REPO / "docs" / "livecomments.service"
# SIGTERM drains (server.drain_seconds), then stops (server.shutdown_timeout); the process needs
# a moment beyond both to exit.
STOP_MARGIN = 10.0


def _unit_service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    unit.optionxform = str  # systemd keys are case-sensitive
    assert unit.read(UNIT), f"{UNIT} is missing"
    return unit["Service"]


def _seconds(span: str) -> float:
    """A systemd time span: `90`, `90s`, `1min 30s`, `2m`."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts, span
    return sum(float(n) * units[u] for n, u in parts)


def test_the_systemd_unit_has_what_one_host_needs():
    service = _unit_service()
    assert service["User"] not in ("", "root")
    # ProtectSystem=strict leaves only StateDirectory writable: the working directory (where
    # defaults and environment paths land) must be it.
    assert service["ProtectSystem"] == "strict"
    assert service["WorkingDirectory"] == f"/var/lib/{service['StateDirectory']}"
    command, *args = service["ExecStart"].split()
    assert command.startswith("/") and command.endswith("/.venv/bin/livecomments")
    assert args[0] == "serve" and args[args.index("--config") + 1].startswith("/")
    assert int(service["LimitNOFILE"]) >= LimitsSettings().max_connections + 1000
    defaults = ServerSettings()
    stop = defaults.drain_seconds + defaults.shutdown_timeout + STOP_MARGIN
    assert _seconds(service["TimeoutStopSec"]) >= stop
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path):
    # verify checks that ExecStart exists: point it at this checkout's (or any) livecomments.
    here = shutil.which("livecomments", path=str(Path(sys.executable).parent))
    assert here is not None
    text = UNIT.read_text().replace("/opt/livecomments/.venv/bin/livecomments", here)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown or misspelt keys are only warned about: no output at all is the pass.
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_a_body_limit_too_small_for_the_longest_message_is_refused():
    # 2000 emoji are 24,000 bytes of ASCII-escaped JSON or of a form: 16 KiB cannot hold them.
    with pytest.raises(ConfigError, match=r"limits\.body_max_bytes: must be at least 24832"):
        load_settings(None, {"LIVECOMMENTS_LIMITS_BODY_MAX_BYTES": "16384"})
    fits = load_settings(
        None,
        {
            "LIVECOMMENTS_LIMITS_BODY_MAX_BYTES": "16384",
            "LIVECOMMENTS_LIMITS_MESSAGE_MAX_CHARS": "1000",
        },
    )
    assert fits.limits.body_max_bytes == 16384


# -- rate limits and [auth] ---------------------------------------------------------------------

SECRET = "s" * 32
KEY = "k" * 32


def test_rate_limits_are_on_by_default_and_zero_turns_each_off():
    limits = load_settings(None, environ={}).limits
    assert limits.comments_per_minute > 0 and limits.ws_per_ip > 0
    assert limits.ws_connects_per_ip_per_second > 0 and limits.frames_per_second > 0
    off = load_settings(
        None,
        environ={
            "LIVECOMMENTS_LIMITS_COMMENTS_PER_MINUTE": "0",
            "LIVECOMMENTS_LIMITS_WS_PER_IP": "0",
            "LIVECOMMENTS_LIMITS_WS_CONNECTS_PER_IP_PER_SECOND": "0",
            "LIVECOMMENTS_LIMITS_FRAMES_PER_SECOND": "0",
            "LIVECOMMENTS_LIMITS_FRAMES_BURST": "1",  # fine: frames are not limited
        },
    ).limits
    assert (off.comments_per_minute, off.ws_per_ip) == (0, 0)
    assert (off.ws_connects_per_ip_per_second, off.frames_per_second) == (0, 0)


def test_jwt_mode_from_the_environment():
    env = {
        "LIVECOMMENTS_AUTH_MODE": "jwt",
        "LIVECOMMENTS_AUTH_SECRET": SECRET * 2,  # 64 bytes, for HS512
        "LIVECOMMENTS_AUTH_ALGORITHMS": "HS256,HS512",
        "LIVECOMMENTS_AUTH_SERVER_KEYS": f"{KEY}, {KEY}2",
        "LIVECOMMENTS_AUTH_LEEWAY": "5",
    }
    auth = load_settings(None, environ=env).auth
    assert (auth.mode, auth.secret, auth.leeway) == ("jwt", SECRET * 2, 5.0)
    assert auth.algorithms == ["HS256", "HS512"]
    assert auth.server_keys == [KEY, f"{KEY}2"]


def test_secrets_stay_out_of_the_settings_repr():
    env = {"LIVECOMMENTS_AUTH_SECRET": SECRET, "LIVECOMMENTS_AUTH_SERVER_KEYS": KEY}
    text = repr(load_settings(None, environ=env))
    assert SECRET not in text and KEY not in text


def test_a_relative_public_key_is_next_to_the_config_file(tmp_path: Path, elsewhere: Path):
    etc = tmp_path / "etc"
    path = _config_in(etc, '[auth]\nmode = "jwt"\npublic_key = "keys/jwt.pem"\n')
    (etc / "keys").mkdir()
    (etc / "keys" / "jwt.pem").write_text("-----BEGIN PUBLIC KEY-----\n")
    assert load_settings(path, environ={}).auth.public_key == str(etc / "keys" / "jwt.pem")


def test_a_jwks_url_on_localhost_may_be_plain_http():
    for url in ("https://issuer.example/.well-known/jwks.json", "http://127.0.0.1:9999/jwks"):
        env = {"LIVECOMMENTS_AUTH_MODE": "jwt", "LIVECOMMENTS_AUTH_JWKS_URL": url}
        assert load_settings(None, environ=env).auth.jwks_url == url


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[limits]\ncomments_burst = 0\n", "limits.comments_burst"),
        ("[limits]\ncomments_per_minute = -1\n", "limits.comments_per_minute"),
        ("[limits]\nws_per_ip = -1\n", "limits.ws_per_ip"),
        ("[limits]\nframes_burst = 50\n", "limits.frames_burst"),  # < posts_per_socket
        ("[auth]\nmode = 'oauth'\n", "auth.mode"),
        ("[auth]\nread = 'private'\n", "auth.read"),
        ("[auth]\nmode = 'jwt'\n", "auth.mode"),
        (f"[auth]\nsecret = '{SECRET}'\njwks_url = 'https://x/j'\n", "auth.jwks_url"),
        ("[auth]\nread = 'token'\n", "auth.read"),
        ("[auth]\nmode = 'jwt'\nsecret = 'short'\n", "auth.secret"),
        ("[auth]\nserver_keys = ['short']\n", "auth.server_keys"),
        ("[auth]\nserver_keys = 'not a list'\n", "auth.server_keys"),
        (f"[auth]\nsecret = '{SECRET}'\nalgorithms = ['RS256']\n", "auth.algorithms"),
        (f"[auth]\nsecret = '{SECRET}'\nalgorithms = ['HS512']\n", "auth.secret"),  # 64 bytes
        (f"[auth]\nsecret = '{SECRET}'\nalgorithms = ['none']\n", "auth.algorithms"),
        ("[auth]\njwks_url = 'https://x/j'\nalgorithms = ['HS256']\n", "auth.algorithms"),
        ("[auth]\nalgorithms = ['RS256']\n", "auth.algorithms"),
        ("[auth]\nmode = 'jwt'\njwks_url = 'http://idp.example/j'\n", "auth.jwks_url"),
        ("[auth]\nmode = 'jwt'\njwks_url = 'idp.example/j'\n", "auth.jwks_url"),
        ("[auth]\nmode = 'jwt'\npublic_key = 'missing.pem'\n", "auth.public_key"),
        ("[auth]\nleeway = 3600\n", "auth.leeway"),
        ("[auth]\ndelete_window = -1\n", "auth.delete_window"),
        ("[auth]\nscope_claim = ''\n", "auth.scope_claim"),
        ("[auth]\nissuer = 1\n", "auth.issuer"),
    ],
)
def test_bad_limits_and_auth_name_the_key(tmp_path: Path, text: str, key: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(path, environ={})
    assert str(e.value).startswith(key)


def test_the_readme_limits_table_states_the_defaults_and_real_metrics():
    """The README's table of limits is a promise: each default it names is the code's, and
    each series it points to is one /metrics exports."""
    from prometheus_client import REGISTRY  # noqa: PLC0415

    import livecomments.metrics  # noqa: F401, PLC0415 (registers every series)

    readme = (REPO / "README.md").read_text()
    table = readme.split("### Limits\n", 1)[1].split("\n### ", 1)[0]
    rows = {
        re.findall(r"`(\w+)`", line)[0]: line
        for line in table.splitlines()
        if line.startswith("| `")
    }
    limits = Settings().limits
    expected = {
        "comments_per_minute": (
            f"{limits.comments_per_minute:g}/min, bursts of {limits.comments_burst}"
        ),
        "ws_per_ip": f"| {limits.ws_per_ip} |",
        "ws_connects_per_ip_per_second": (
            f"{limits.ws_connects_per_ip_per_second:g}/s, bursts of {limits.ws_connects_burst}"
        ),
        "frames_per_second": f"{limits.frames_per_second:g}/s, bursts of {limits.frames_burst}",
        "max_connections": f"| {limits.max_connections:,} |",
        "body_max_bytes": (
            f"| {limits.body_max_bytes // 1024} KiB, {limits.ws_frame_max_bytes // 1024} KiB, "
            f"{limits.message_max_chars}, {limits.posts_per_socket} |"
        ),
    }
    assert set(rows) == set(expected)
    for key, text in expected.items():
        assert text in rows[key], (key, text, rows[key])
    # A labelled series has no sample until a label is used: a counter's family is enough.
    exported = {m.name + ("_total" if m.type == "counter" else "") for m in REGISTRY.collect()}
    named = set(re.findall(r"`(livecomments_\w+)", table))
    assert named and named <= exported, named - exported

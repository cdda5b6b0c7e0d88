"""Settings: defaults, file, environment overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from livecomments.config import ConfigError, Settings, load_settings
from tests.server import REPO


def test_defaults_match_the_documented_config_toml():
    assert load_settings(REPO / "config.toml", environ={}) == Settings()


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

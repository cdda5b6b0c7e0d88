"""The consistent-hash ring: stable across processes, balanced, and moving little on a change."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from livecomments.live.redis.ring import Ring, stable_hash
from livecomments.urls import redact_url as node_key
from tests.support.server import REPO

URLS = ["redis://10.0.0.1:6379/0", "redis://10.0.0.2:6379/0", "redis://10.0.0.3:6379/0"]
POSTS = [f"post-{i}" for i in range(10_000)]


def test_stable_hash_is_blake2b_64_big_endian():
    # Pinned: changing the hash would move every post between servers on upgrade.
    assert stable_hash("post-1") == 511924171702172733
    digest = hashlib.blake2b(b"abc", digest_size=8).digest()
    assert stable_hash("abc") == int.from_bytes(digest, "big")


def test_same_node_in_another_process_with_another_hash_seed():
    ring = Ring(URLS)
    sample = POSTS[:2000]
    script = (
        "import json, sys\n"
        "from livecomments.live.redis.ring import Ring\n"
        "urls, posts = json.load(sys.stdin)\n"
        "print(json.dumps([Ring(urls).node_for(p) for p in posts]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([list(reversed(URLS)), sample]),  # the list's order must not matter
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=30,
        check=True,
    )
    assert json.loads(out.stdout) == [ring.node_for(p) for p in sample]


def test_posts_are_spread_evenly():
    ring = Ring(URLS)
    counts = Counter(ring.node_for(p) for p in POSTS)
    assert set(counts) == set(URLS)
    for url in URLS:
        assert 0.8 / 3 < counts[url] / len(POSTS) < 1.2 / 3, counts


def test_adding_a_server_moves_about_one_in_n_and_only_to_it():
    before, after = Ring(URLS), Ring([*URLS, "redis://10.0.0.4:6379/0"])
    moved = [p for p in POSTS if before.node_for(p) != after.node_for(p)]
    assert 0.18 < len(moved) / len(POSTS) < 0.32, len(moved)
    assert {after.node_for(p) for p in moved} == {"redis://10.0.0.4:6379/0"}


def test_removing_a_server_moves_only_its_posts():
    before, after = Ring(URLS), Ring(URLS[:2])
    moved = [p for p in POSTS if before.node_for(p) != after.node_for(p)]
    assert {before.node_for(p) for p in moved} == {URLS[2]}
    assert 0.25 < len(moved) / len(POSTS) < 0.42, len(moved)


def test_a_password_is_not_part_of_a_servers_place():
    assert node_key("redis://:s3cret@10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"
    assert node_key("redis://user:pw@host:1/2?x=1") == "redis://host:1/2?x=1"
    assert node_key("unix:///run/redis.sock") == "unix:///run/redis.sock"
    plain = Ring(URLS)
    secret = Ring([u.replace("redis://", "redis://:pw@") for u in URLS])
    assert [node_key(secret.node_for(p)) for p in POSTS[:500]] == [
        plain.node_for(p) for p in POSTS[:500]
    ]


def test_one_server_carries_everything_and_none_is_refused():
    ring = Ring(URLS[:1])
    assert {ring.node_for(p) for p in POSTS[:100]} == {URLS[0]}
    with pytest.raises(ValueError):
        Ring([])

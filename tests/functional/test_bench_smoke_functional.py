"""The benchmark harness works: its parts on known input, and a whole run on a tiny load.

No benchmark runs here (`make bench` does that); the smoke run takes a few sockets and a few
comments per scenario and checks that everything was measured and every process was stopped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench import report, scenarios
from bench.hist import Histogram
from bench.leanws import LcSocket, SioSocket, Tally
from bench.scenarios import SCALES

REPO = Path(__file__).resolve().parents[2]
HAS_SOCKETIO = importlib.util.find_spec("socketio") is not None
HAS_WRK = shutil.which("wrk") is not None


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    head = bytes((0x80 | opcode, n)) if n < 126 else struct.pack("!BBH", 0x80 | opcode, 126, n)
    return head + payload


def comment_event(sent_ns: int) -> dict:
    message = f"~{sent_ns}~" + "x" * 80
    return {"id": "1", "post_id": "p", "uid": "u", "message": message, "created_at": 0}


def test_histogram_percentiles_are_within_one_percent():
    h = Histogram()
    for us in range(1, 100_001):
        h.add(us)
    assert h.percentile_ms(50) == pytest.approx(50.0, rel=0.01)
    assert h.percentile_ms(99) == pytest.approx(99.0, rel=0.01)
    assert h.percentile_ms(99.9) == pytest.approx(99.9, rel=0.01)
    merged = Histogram()
    merged.merge_pairs(h.pairs(), h.max_us)
    assert merged.summary() == h.summary()


async def test_frames_cut_anywhere_are_counted_once_and_pings_answered():
    sent = 1_000_000_000
    stream = (
        frame(orjson.dumps({"type": "comment", "comment": comment_event(sent)}))
        + frame(b"hi", opcode=0x9)  # a ping
        + frame(
            orjson.dumps(
                {"type": "comments", "post_id": "p", "comments": [comment_event(sent)] * 2}
            )
        )
        + frame(orjson.dumps({"type": "comment", "comment": comment_event(sent)}))
    )
    for cut in range(1, len(stream)):
        tally = Tally()
        tally.reset(0)
        sock = LcSocket(1, ["p"], tally, probe=True)
        transport = FakeTransport()
        sock.transport = transport  # type: ignore[assignment]
        sock.open = sock.upgraded = True
        sock.arrived_ns = sent + 2_000_000
        sock.data_received(stream[:cut])
        sock.data_received(stream[cut:])
        assert tally.deliveries == 4, cut
        assert tally.samples == 3, cut  # one latency sample per comment event read
        assert tally.histogram().percentile_ms(50) == pytest.approx(2.0, rel=0.01)
        assert transport.written == [bytes((0x8A, 0x82)) + b"\0\0\0\0hi"], cut  # the pong


async def test_socketio_dialect_handshake_joins_and_pongs():
    tally = Tally()
    sock = SioSocket(1, ["a", "b"], tally)
    transport = FakeTransport()
    sock.transport = transport  # type: ignore[assignment]
    sock.open = True
    sock.data_received(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + frame(b'0{"sid":"x"}'))
    sock.data_received(frame(b'40{"sid":"y"}') + frame(b"2"))
    sent = [w[6:] for w in transport.written]  # 2 header bytes, the mask key 0, the payload
    assert sent == [b"40", b'420["join","a"]', b'421["join","b"]', b"3"]
    sock.data_received(frame(b'430["ok"]') + frame(b'431["ok"]'))
    assert sock.ready.done() and sock.ready.exception() is None
    event = b'42["comment",' + orjson.dumps(comment_event(5)) + b"]"
    sock.data_received(frame(event))
    assert tally.deliveries == 1


def hot_run(sustained: int, peak: int) -> dict:
    latency = {"n": 10, "p50_ms": 1.0, "p99_ms": 2.0, "p99_9_ms": 3.0}
    step = {"target_deliveries_per_s": 2500, "deliveries_per_s": 2000, "latency": latency}
    return {
        "sustained_deliveries_per_s": sustained,
        "peak_throughput_per_s": peak,
        "steps": [step],
        "limited_by": ["server"],
    }


def many_latency(p99_ms: float) -> dict:
    return {"n": 9, "p50_ms": p99_ms / 2, "p99_ms": p99_ms, "p99_9_ms": p99_ms}


def quick_results() -> dict:
    """What `make bench-quick` records, cut to what the report reads."""
    return {
        "scale": "quick",
        "scale_detail": dataclasses.asdict(SCALES["quick"]),
        "scenarios": {
            "hot_post": {
                "livecomments": {"1000": hot_run(5000, 59371)},
                "socketio": {"1000": hot_run(0, 9221)},
            },
            "many_posts": {
                "livecomments": {"step": {"latency": many_latency(6.559)}},
                "socketio": {"step": {"latency": many_latency(1383.75)}},
            },
            "idle": {
                "livecomments": {"rss_per_socket_kib": 15.38, "held_after_hold": 1000},
                "socketio": {"rss_per_socket_kib": 30.24, "held_after_hold": 1000},
            },
        },
    }


def test_quick_mode_says_what_it_did_not_try_instead_of_no():
    results = quick_results()
    met = {t["target"]: t for t in report.targets(results)}
    sockets = met["10,000 concurrent sockets held by one process"]
    assert (sockets["met"], sockets["pass"]) == ("not tried in quick mode", None)
    assert sockets["measured"] == "1,000 of 1,000 held"
    ratio = met[">= 3x python-socketio on the hot post (every size)"]
    assert ratio["met"] == "not tried in quick mode"
    assert "5,000, 10,000: not tried in quick mode" in ratio["measured"]
    ingest = met[">= 5,000 durable comments/s at concurrency 50, ack p99 <= 20 ms"]
    assert ingest["met"] == "not tried in quick mode"  # the ingest scenario was left out
    table = report.targets_table(results)
    assert "| 1,000 of 1,000 held | not tried in quick mode |" in table
    # What was tried and failed is still a NO.
    results["scenarios"]["idle"]["livecomments"]["rss_per_socket_kib"] = 25.0
    assert "| 25.0 KiB (1,000 sockets) | NO |" in report.targets_table(results)


def test_ratios_with_a_zero_or_tiny_denominator_print_something_meaningful():
    text = report.table(quick_results())
    assert "inf" not in text
    sustained = next(line for line in text.splitlines() if "sustained deliveries/s" in line)
    assert sustained.endswith("| 5,000 | 0 | n/a: theirs is 0 |"), sustained
    assert "| 0.0047x (p99) |" in text  # not "0.00x"
    assert "| 6.44x |" in text  # peaks: 59,371 / 9,221


WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080
  1 threads and 50 connections
  36032 requests in 10.01s, 11.41MB read
Requests/sec:   3599.80
wrk-result {"requests":36032,"duration_us":10009500,"status_errors":0,"connect_errors":0,\
"read_errors":0,"write_errors":0,"timeouts":0,"p50_us":13412,"p99_us":24788,"p99_9_us":30001,\
"max_us":41234}
""".replace("\\\n", "")


def test_wrk_result_line_is_read_with_wrk_latencies_in_ms():
    got = scenarios.parse_wrk(WRK_OUTPUT)
    assert got["requests"] == 36032
    assert got["comments_per_s"] == pytest.approx(3599.8, abs=0.1)
    assert got["ack"]["p50_ms"] == 13.412 and got["ack"]["p99_ms"] == 24.788
    assert got["status_errors"] == 0 and got["socket_errors"] == 0
    with pytest.raises(RuntimeError, match="no result line"):
        scenarios.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


async def test_without_wrk_the_ingest_scenario_says_it_skipped_wrk(monkeypatch):
    lines: list[str] = []
    ctx = scenarios.Context(SCALES["smoke"], None, REPO, (), REPO, log=lines.append)  # type: ignore[arg-type]
    monkeypatch.setattr(scenarios.shutil, "which", lambda name: None)
    got = await scenarios._wrk_ingest(ctx, None, None, 50, 1)  # type: ignore[arg-type]
    assert got == {"skipped": "wrk is not installed (apt-get install wrk)"}
    assert lines == [
        "  wrk: skipped: wrk is not installed (apt-get install wrk); harness figures only"
    ]
    results = quick_results()
    results["scenarios"]["ingest"] = {"livecomments": {"wrk": got}}
    assert "| wrk: not measured | wrk is not installed (apt-get install wrk) |" in report.table(
        results
    )


DRAIN_OUTPUT = """drain into PostgreSQL: 26,608 comments/s (0.38 s)
drain-result {"comments": 10000, "batch": 1000, "message_chars": 100, "posts": 1000, \
"enqueue_per_s": 14598, "drain_per_s": 26608, "drain_s": 0.376, "queue_bytes_per_comment": 240, \
"queue_file_bytes_per_comment": 288, "rss_bytes_per_comment": 2273, \
"bytes_per_comment_by_message_chars": {"20": 160, "100": 240}}
""".replace("\\\n", "")


def test_the_drain_result_line_becomes_the_drain_rows():
    drained = scenarios.parse_drain(DRAIN_OUTPUT)
    assert drained["drain_per_s"] == 26608
    results = quick_results()
    results["scenarios"]["drain"] = {"livecomments": {"batch": {"1000": drained}}}
    text = report.table(results)
    assert (
        "| 6. Backlog drain into PostgreSQL: 10,000 comments (100-character messages, 1,000 posts)"
        " queued while it was down | queue.flush_batch 1000 (default): backlog drained, "
        "comments/s | 26,608 |"
    ) in text
    assert "| queue bytes per comment: counted by queue.max_bytes / file on disk | 240 / 288 |" in (
        text
    )
    with pytest.raises(RuntimeError, match="no result line"):
        scenarios.parse_drain("drain_postgres: PostgreSQL server binaries not found")


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a markdown text's headings."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_and_docs_take_their_figures_from_benchmarks_md():
    readme = (REPO / "README.md").read_text()
    texts = {"README.md, Numbers": readme.split("## Numbers\n", 1)[1].split("\n## ", 1)[0]}
    for name in ("running-several-instances.md", "postgresql.md"):
        texts[name] = (REPO / "docs" / name).read_text()
    figure = re.compile(r"\d[\d,.]*\s*(?:ms|comments/s|deliveries/s|KiB)\b|p(?:50|99)\s+\d")
    for name, text in texts.items():
        assert not figure.findall(text), (name, figure.findall(text))
    # Every link to BENCHMARKS.md names a heading that it has now and that `make bench` writes.
    links = set(re.findall(r"BENCHMARKS\.md#([a-z0-9-]+)", "".join(texts.values())))
    assert {"results", "ingest-the-harness-beside-wrk"} <= links
    assert links <= _anchors((REPO / "BENCHMARKS.md").read_text())
    run = json.loads((REPO / "bench" / "results" / "2026-11-27-083539.json").read_text())
    assert links <= _anchors(report.markdown(run, "2026-11-27-083539.json"))


def test_a_second_run_the_same_day_gets_its_own_results_file(tmp_path: Path):
    morning = report.results_path(tmp_path, "2026-11-24T09:05:01+0000", "full")
    morning.write_text("{}")
    evening = report.results_path(tmp_path, "2026-11-24T21:40:00+0000", "full")
    assert morning.name == "2026-11-24-090501.json"
    assert evening.name == "2026-11-24-214000.json"
    # Even two runs started in the same second do not overwrite each other.
    assert report.results_path(tmp_path, "2026-11-24T09:05:01+0000", "full") != morning
    assert report.results_path(tmp_path, "2026-11-24T09:05:01+0000", "quick").name == (
        "2026-11-24-090501-quick.json"
    )


def test_quick_results_are_ignored_by_git_and_full_results_are_not():
    results = REPO / "bench" / "results"

    def ignored(path: Path) -> bool:
        rel = str(path.relative_to(REPO))
        done = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO, check=False)
        assert done.returncode in (0, 1), done
        return done.returncode == 0

    started = "2026-11-24T09:05:01+0000"
    for scale in ("quick", "smoke"):
        path = report.results_path(results, started, scale)
        assert ignored(path), path
        assert ignored(path.with_name(f"profile-livecomments-{path.stem}.txt")), path
    full = report.results_path(results, started, "full")
    assert not ignored(full)
    assert not ignored(full.with_name(f"profile-livecomments-{full.stem}.txt"))


def test_harness_runs_every_scenario_on_a_tiny_load(tmp_path: Path):
    servers = "livecomments,socketio" if HAS_SOCKETIO else "livecomments"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.run", "--scale", "smoke", "--servers", servers),
            *("--out", str(tmp_path), "--no-markdown"),
        ],
        cwd=REPO,
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    (path,) = tmp_path.glob("*-smoke.json")
    results = json.loads(path.read_text())
    measured = results["scenarios"]
    for server in servers.split(","):
        hot = measured["hot_post"][server]["10"]
        assert hot["steps"], hot
        for step in hot["steps"]:
            assert step["arrived"] == 1.0, step
            assert step["latency"]["n"] > 0, step
            assert step["loadgen_cpu"] >= 0
        many = measured["many_posts"][server]["step"]
        assert many["arrived"] == 1.0, many
        assert many["latency"]["n"] > 0, many
        idle = measured["idle"][server]
        assert idle["held_after_hold"] == 20, idle
        assert idle["rss_per_socket_kib"] is not None
    ingest = measured["ingest"]["livecomments"]
    assert ingest["fsync"]["n"] == 10
    for level in ingest["concurrency"].values():
        assert level["ok"] > 0 and level["statuses"] == {"201": level["ok"]}, level
        assert level["cpu_speed"]["unit_ms"] > 0, level
    wrk = ingest["wrk"]
    if HAS_WRK:
        assert wrk["requests"] > 0 and wrk["status_errors"] == wrk["socket_errors"] == 0, wrk
        # Every request wrk completed was a comment the server accepted.
        assert wrk["requests"] <= wrk["accepted_by_server"] <= wrk["requests"] + 4, wrk
        assert wrk["command"].endswith(
            "wrk -t1 -c4 -d1s -s bench/wrk_post.lua http://127.0.0.1:PORT"
        )
    else:
        assert wrk == {"skipped": "wrk is not installed (apt-get install wrk)"}
    assert results["cpu_speed_start"]["unit_ms"] > 0 and results["cpu_speed_end"]["unit_ms"] > 0
    assert measured["drain"]["livecomments"] == {"skipped": "not run in smoke mode"}
    one = measured["latency"]["livecomments"]["one_instance"]
    assert one["to_socket"]["n"] == one["to_ack"]["n"] == 10, one
    assert one["to_ack"]["p50_ms"] <= one["to_socket"]["p50_ms"], one  # the 201 comes first
    assert not [name for name, s in measured.items() if "error" in s]
    # Every process the harness started was stopped, and it knows each one's exit status.
    assert results["processes"]
    assert all(p["exit"] is not None for p in results["processes"]), results["processes"]
    assert "| Scenario |" in done.stdout.decode()


def test_compare_runs_the_base_commit_beside_this_one_on_a_tiny_load(tmp_path: Path):
    """`python -m bench.compare` (the cost of positions): both code versions really ran, each
    delivered everything, and the report section reads what it wrote."""
    out = tmp_path / "positions-cost.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    results = json.loads(out.read_text())
    modes = ["embedded", "redis"] if shutil.which("redis-server") else ["embedded"]
    assert list(results["modes"]) == ["embedded", "redis", "ingest"]
    for side in ("base", "head"):
        (step,) = results["modes"]["ingest"][side]["steps"]
        assert step["ok"] > 0 and step["statuses"] == {"201": step["ok"]}, step
    for mode in modes:
        measured = results["modes"][mode]
        for side in ("base", "head"):
            for step in measured[side]["steps"] + measured[side]["peaks"]:
                assert step["deliveries"] == step["expected"] > 0, (mode, side, step)
                # CPU time is counted in ticks of 10 ms: a tiny step may take none.
                assert step["cpu_us_per_delivery"] >= 0, step
        assert measured["peak_ratio"] > 0, measured
    section = report.positions_cost_section(out)
    assert "| embedded (one process) |" in section and results["base"] in section


def test_the_base_runs_with_only_the_settings_it_knows(tmp_path: Path):
    """The base refuses settings it does not know (its config does): the limits came later."""
    from bench import compare  # noqa: PLC0415

    source = compare.extract(compare.BASE, tmp_path / "src")
    known = compare.settings_known_by(source)
    assert "LIVECOMMENTS_QUEUE_FLUSH_BATCH" in known
    assert "LIVECOMMENTS_LIMITS_WS_PER_IP" not in known
    assert (source / "livecomments" / "live" / "redis" / "pubsub.py").exists()


@pytest.mark.skipif(not scenarios.postgres_installed(), reason="PostgreSQL binaries not found")
def test_the_drain_measurement_runs_to_its_end_on_a_small_backlog():
    """bench/drain_postgres.py really drains (the smoke scale leaves it out, and a change of
    when the queue lets go of a comment once made it wait forever)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.drain_postgres", "--comments", "500", "--batch", "100"],
        cwd=REPO,
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    drained = scenarios.parse_drain(done.stdout.decode())
    assert drained["comments"] == 500 and drained["drain_per_s"] > 0, drained

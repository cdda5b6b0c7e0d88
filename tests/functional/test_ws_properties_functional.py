"""Hostile clients (issue 11): whatever one client sends on its WebSocket, the server answers it
as the README documents, stays healthy, and every other client's live delivery goes on.

Hypothesis writes the hostile side: JSON text frames of every shape (known event types with
wrong fields, unknown types, positions that are not positions, ids that break the id rules, deep
nesting, escaped surrogates and NULs, numbers no double holds, duplicate keys), garbage text,
fragmented messages with control frames between the fragments, pings and pongs, binary and
oversized frames, frames that break RFC 6455 (reserved opcodes and bits, lying lengths, bad close
frames, orphan continuations), connections cut mid-frame, upgrades with bad queries, and
subscribe storms past `limits.posts_per_socket`. The client is tests/support/wire.py: it writes
exactly the bytes asked for and parses every frame that comes back, so nothing answers or tidies
on its behalf.

Per example, the hostile socket's frames are checked against `Oracle`, a model of the protocol:
each client frame, in order, gets its one answer (`pong`, `subscribed` with the `recovered` the
position given earns and the replay it promises, `unsubscribed`, or an `error` with the documented
code), each control ping its pong, and a frame the protocol refuses its documented close code
(1003 binary, 1009 too big, 1002/1007 broken framing; never 1011). Then `Health.check` proves
the rest of the server untouched: a witness viewer subscribed from the start gets a freshly posted
comment at the next offset (no gap, no duplicate) within a deadline, /healthz answers 200, no
socket or followed post is left behind, the process runs and its log has no traceback or ERROR.

One server for the module (SQLite, no Redis, open mode) with every rate limit off, so Hypothesis
explores input shapes rather than the limiter; the frame limit has its own test and server at the
end.
Examples are derandomized, so a run is reproducible and CI sees the same inputs every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import string
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from yarl import URL

from tests.support.metrics import scrape
from tests.support.recording import Socket, post
from tests.support.server import ServerProcess
from tests.support.wait import wait_for
from tests.support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    Refusal,
    WireClient,
    client_frame,
    close_payload,
)

# The server's limits this module relies on (config.toml defaults).
FRAME_MAX = 16 * 1024  # limits.ws_frame_max_bytes
POSTS_PER_SOCKET = 100  # limits.posts_per_socket
ID_MAX = 64  # limits.id_max_chars
EPOCH_MAX = 64  # characters of an epoch a client may send back
OFFSET_END = 1 << 62  # offsets are 0 <= N < 2**62
ID_RE = re.compile(r"[A-Za-z0-9._:-]+")

# Every error code the protocol documents (README, "Watch a post live"; the issue 11 plan).
ERROR_CODES = frozenset(
    {
        "invalid_json",
        "invalid_event",
        "unknown_type",
        "invalid_request",
        "too_many_posts",
        "subscribe_failed",
        "unauthenticated",
        "invalid_token",
        "token_expired",
        "forbidden",
    }
)
# Events that are not the answer to a client frame: a post's stream (a replay, live comments).
STREAM = frozenset({"comment", "comments", "delete"})

# Seconds: for one answer or frame, for the witness to get a comment, for a socket to be gone.
DEADLINE = 5.0

NO_LIMITS = {
    "LIVECOMMENTS_LIMITS_FRAMES_PER_SECOND": "0",
    "LIVECOMMENTS_LIMITS_COMMENTS_PER_MINUTE": "0",
    "LIVECOMMENTS_LIMITS_WS_PER_IP": "0",
    "LIVECOMMENTS_LIMITS_WS_CONNECTS_PER_IP_PER_SECOND": "0",
}

PROPERTIES = settings(
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,  # nothing written under .hypothesis/
    deadline=None,  # each example is bounded by our own deadlines instead
    # No shrinking: the examples share one server, so a failure's aftermath (a leak, a dead
    # stream) fails the examples after it too, and shrinking would chase it for minutes. The
    # failing script is reported whole, with the server's log meanwhile; derandomize replays it.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        # One server, one witness and one HTTP session serve every example, on purpose.
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# -- the fixtures: one server, a witness per test ---------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(tmp_path_factory.mktemp("hostile"), env=NO_LIMITS).start()
    yield s
    assert s.stop() == 0, s.logs()
    assert not bad_lines(s.log_path.read_text(errors="replace")), s.logs()


def bad_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
    ]


@dataclass
class Witness:
    """A viewer subscribed to its own post from the start, and the comments posted to it."""

    socket: Socket
    post_id: str
    epoch: str
    start: int  # the offset it subscribed at
    first: str = field(repr=False)  # the id of the comment at offset 1, posted before it came
    posted: list[str] = field(default_factory=list, repr=False)

    def ids(self) -> dict[int, str]:
        """Offset -> id of every comment of the post, as the witness got them."""
        return {1: self.first, **dict(self.socket.comments())}

    @property
    def offset(self) -> int:
        return self.start + len(self.posted)


_witnesses = iter(range(1, 1 << 30))


async def open_witness(http: aiohttp.ClientSession, server: ServerProcess) -> Witness:
    post_id = f"witness-{next(_witnesses)}"
    first = await post(http, server, post_id, "before the witness came")  # a stream, an epoch
    socket = await Socket.open(http, server, f"post_id={post_id}")
    await socket.wait(lambda: socket.of("subscribed"), "the witness's subscribed")
    subscribed = socket.of("subscribed")[0]
    assert subscribed["offset"] == 1, subscribed
    return Witness(socket, post_id, subscribed["epoch"], 1, first)


@pytest.fixture
async def witness(server: ServerProcess, http: aiohttp.ClientSession) -> AsyncIterator[Witness]:
    w = await open_witness(http, server)
    yield w
    await w.socket.close()


@dataclass
class Health:
    """The server after a hostile client: the witness still gets live comments, nothing leaks."""

    server: ServerProcess = field(repr=False)
    http: aiohttp.ClientSession = field(repr=False)
    witness: Witness
    log_read: int = field(default=0, repr=False)

    async def check(self, why: str) -> None:
        assert self.server.proc is not None and self.server.proc.poll() is None, (
            f"the server died after {why}:\n{self.server.logs()}"
        )
        await self.witness_gets_a_comment(why)
        async with self.http.get(f"{self.server.url}/healthz") as r:
            assert r.status == 200, f"/healthz {r.status} after {why}"
        await self.nothing_left_behind(why)
        self.log_is_clean(why)

    async def witness_gets_a_comment(self, why: str) -> None:
        w = self.witness
        comment_id = await post(self.http, self.server, w.post_id, f"after {len(w.posted)}")
        w.posted.append(comment_id)
        want = [(w.start + i + 1, cid) for i, cid in enumerate(w.posted)]
        await wait_for(
            lambda: len(w.socket.comments()) >= len(want) or w.socket.ws.closed,
            DEADLINE,
            f"the witness to get comment {comment_id} after {why}",
        )
        assert w.socket.comments() == want, f"witness delivery broke after {why}"
        assert {e["type"] for e in w.socket.events} <= {"subscribed", "comment"}, (
            f"the witness got {w.socket.events[-3:]} after {why}"
        )
        assert not w.socket.ws.closed, f"the witness's socket closed after {why}"

    async def nothing_left_behind(self, why: str) -> None:
        """Every hostile socket is gone, with every post it followed: only the witness's stay."""

        async def clean() -> bool:
            values = await scrape(self.http, self.server)
            return values["ws_connections"] == 1 and values["posts_followed"] == 1

        await wait_for(clean, DEADLINE, f"sockets and posts to be released after {why}")

    def log_is_clean(self, why: str) -> None:
        new = self.new_log()
        assert not bad_lines(new), f"the server logged errors after {why}:\n{new[-4000:]}"

    def new_log(self) -> str:
        """What the server logged since the last look."""
        with open(self.server.log_path, "rb") as f:
            f.seek(self.log_read)
            new = f.read().decode(errors="replace")
            self.log_read = f.tell()
        return new


@pytest.fixture
async def health(
    server: ServerProcess, http: aiohttp.ClientSession, witness: Witness
) -> AsyncIterator[Health]:
    h = Health(server, http, witness)
    h.log_is_clean("the last test")
    yield h
    values = await scrape(http, server)
    # An internal error is never the answer to anything a client sends.
    assert values.get('ws_closes_total{code="1011"}', 0) == 0


# -- JSON of every shape ----------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text written as is: numbers no double holds, escapes, nesting, broken documents."""

    text: str


@dataclass(frozen=True)
class Obj:
    """A JSON object whose keys may repeat (the last one wins in orjson)."""

    pairs: tuple[tuple[str, Any], ...]


class Ref(Enum):
    """Filled in when the frame is written: the witness's post and epoch, so that hostile
    subscribes also hit a real stream, recover from it and get its replay."""

    POST = "post"
    EPOCH = "epoch"
    OFFSET = "offset"


@dataclass(frozen=True)
class Near:
    """An offset near the witness's stream's current one: at it, just before, just after."""

    delta: int


def render(value: Any, ctx: dict[Ref, Any], ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Ref):
        return json.dumps(ctx[value])
    if isinstance(value, Near):
        return json.dumps(ctx[Ref.OFFSET] + value.delta)
    if isinstance(value, Obj):
        items = (
            json.dumps(k, ensure_ascii=ascii_only) + ":" + render(v, ctx, ascii_only)
            for k, v in value.pairs
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v, ctx, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)  # NaN and Infinity are not JSON: good


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each `weight` times as likely (st.one_of takes each once)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


ID_CHARS = "abcxyzABZ019._:-"
valid_ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=12) | st.text(
    alphabet=ID_CHARS, min_size=ID_MAX - 1, max_size=ID_MAX
)
bad_ids = st.one_of(
    st.just(""),
    st.text(alphabet=ID_CHARS, min_size=ID_MAX + 1, max_size=ID_MAX + 30),
    st.tuples(
        st.text(alphabet=ID_CHARS, max_size=6),
        st.characters(exclude_characters=string.ascii_letters + string.digits + "._:-"),
        st.text(max_size=6),
    ).map("".join),
    st.sampled_from(["a b", "a/b", "ä", "a\x00", "post\n", "\U0001d4b3", "١٢"]),
)
# Tokens orjson takes, odd as they are: numbers past 64 bits (read as doubles), underflow,
# negative zero, escaped NUL and non-characters, a surrogate pair.
odd_valid = st.sampled_from(
    [
        "1e-400",
        "-0",
        "0.0",
        "5e0",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        "123456789012345678901234567890",
        r'"\ud83d\ude00"',
        r'"\u0000"',
        r'"a\u0000b"',
        r'"\uffff"',
        r'"\/"',
    ]
).map(Raw)
# And tokens it refuses: numbers no double holds, escaped lone surrogates, what JSON is not.
odd_invalid = st.sampled_from(
    [
        "1e309",
        "-1e309",
        "1E400",
        "NaN",
        "-Infinity",
        "01",
        "+1",
        ".5",
        "0x10",
        r'"\ud800"',
        r'"\udc00"',
        r'"\udc00\ud800"',
        r'"\x41"',
        '"tab\tin"',
        '"unterminated',
        "undefined",
        "'single'",
    ]
).map(Raw)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    odd_valid,
)


def objects(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Obj]:
    keys = st.sampled_from(["type", "post_id", "epoch", "offset", "token"]) | st.text(max_size=8)
    return st.lists(st.tuples(keys, values), max_size=4).map(lambda p: Obj(tuple(p)))


json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | objects(kids), max_leaves=12
)
# Documents with one token or more that is not JSON somewhere inside.
invalid_values = st.recursive(
    odd_invalid, lambda kids: st.lists(kids | scalars, max_size=4) | objects(kids), max_leaves=8
)


@st.composite
def deep(draw: st.DrawFn) -> Raw:
    """Nesting deeper and shallower than any parser's limit (orjson stops at 1024)."""
    depth = draw(st.integers(1, 2500) | st.sampled_from([1023, 1024, 1025]))
    if draw(st.booleans()):
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "0" + "}" * depth)


types = weighted(
    (3, st.sampled_from(["subscribe", "unsubscribe", "ping"])),
    (
        1,
        st.sampled_from(["auth", "refresh", "pong", "subscribed", "error", "comment", "reconnect"]),
    ),
    (1, st.sampled_from(["Subscribe", "PING", "ping ", " ping", "", "\x00", "ping\x00"])),
    (1, st.text(max_size=40)),
    (1, json_values),
)
post_ids = st.one_of(valid_ids, st.just(Ref.POST), bad_ids, scalars)
epochs = st.one_of(
    st.just(Ref.EPOCH),
    st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
    st.text(max_size=EPOCH_MAX + 8),
    st.text(min_size=EPOCH_MAX - 1, max_size=EPOCH_MAX + 1),
    scalars,
)
offsets = st.one_of(
    st.integers(0, 8),
    st.integers(-3, 3),
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([OFFSET_END - 1, OFFSET_END, 1 << 63, 1 << 64]),
    st.from_regex(r"[0-9]{1,20}", fullmatch=True),
    st.sampled_from(["-1", " 5", "5 ", "1e3", "٣", "0x1", ""]),
    scalars,
)
_ABSENT = object()


@st.composite
def chaos_events(draw: st.DrawFn) -> Obj:
    """An object shaped like a client event: a type, maybe the fields of one, maybe more."""
    pairs: list[tuple[str, Any]] = []
    if draw(st.integers(0, 9)):
        pairs.append(("type", draw(types)))
    for name, values in (("post_id", post_ids), ("epoch", epochs), ("offset", offsets)):
        value = draw(st.just(_ABSENT) | values)
        if value is not _ABSENT:
            pairs.append((name, value))
    pairs += draw(st.lists(st.tuples(st.text(max_size=8), json_values), max_size=2))
    return Obj(tuple(draw(st.permutations(pairs))))


@st.composite
def good_events(draw: st.DrawFn) -> Obj:
    """A valid subscribe (with or without a position, often the witness's), unsubscribe or
    ping: the baseline the spoiled ones are made from."""
    kind = draw(st.sampled_from(["subscribe", "subscribe", "unsubscribe", "ping"]))
    pairs: list[tuple[str, Any]] = [("type", kind)]
    if kind != "ping":
        pairs.append(("post_id", draw(weighted((2, st.just(Ref.POST)), (1, valid_ids)))))
    if kind == "subscribe" and draw(st.booleans()):
        hex16 = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)
        pairs.append(("epoch", draw(weighted((3, st.just(Ref.EPOCH)), (1, hex16)))))
        near = st.integers(-3, 2).map(Near)
        pairs.append(("offset", draw(weighted((2, near), (1, st.integers(0, OFFSET_END - 1))))))
    return Obj(tuple(pairs))


@st.composite
def recovering_events(draw: st.DrawFn) -> Obj:
    """A subscribe to the witness's post with its epoch and an offset at, before or after the
    stream's: the server replays what it missed, or says it cannot."""
    offset = weighted((3, st.integers(-3, 1).map(Near)), (1, st.integers(0, 3)))
    pairs = [
        ("type", "subscribe"),
        ("post_id", Ref.POST),
        ("epoch", Ref.EPOCH),
        ("offset", draw(offset)),
    ]
    return Obj(tuple(draw(st.permutations(pairs))))


@st.composite
def spoiled_events(draw: st.DrawFn) -> Obj:
    """A good event with one thing wrong: a field of the wrong type or shape, a field missing,
    a key twice (the last one counts), or one more field."""
    pairs = list(draw(good_events()).pairs)
    how = draw(st.sampled_from(["type", "post_id", "epoch", "offset", "drop", "twice", "more"]))
    if how == "drop":
        del pairs[draw(st.integers(0, len(pairs) - 1))]
    elif how == "twice":
        key = draw(st.sampled_from(pairs))[0]
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(json_values | types)))
    elif how == "more":
        pairs.append((draw(st.text(max_size=8)), draw(json_values)))
    else:
        wrong = {"type": types, "post_id": bad_ids | scalars, "epoch": epochs, "offset": offsets}
        pairs = [(k, v) for k, v in pairs if k != how] + [(how, draw(wrong[how]))]
        pairs = draw(st.permutations(pairs))
    return Obj(tuple(pairs))


# -- what the client sends --------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """A JSON text frame: a document (maybe broken), with whitespace around it."""

    value: Any
    ascii_only: bool = True
    before: str = ""
    after: str = ""
    cut: float | None = None  # keep only this fraction of the text (a truncated document)

    def text(self, ctx: dict[Ref, Any]) -> str:
        text = render(self.value, ctx, self.ascii_only)
        if self.cut is not None:
            text = text[: int(len(text) * self.cut)]
        return self.before + text + self.after


@dataclass(frozen=True)
class Padded:
    """A `ping` padded to about `size` bytes of UTF-8: at, under and over the frame limit."""

    size: int
    pad: str

    def text(self, ctx: dict[Ref, Any]) -> str:
        head, tail = '{"type":"ping","pad":"', '"}'
        room = self.size - len(head) - len(tail)
        return head + self.pad * (room // len(self.pad.encode())) + tail


@dataclass(frozen=True)
class Garbage:
    """Any text at all (mostly not JSON)."""

    garbage: str

    def text(self, ctx: dict[Ref, Any]) -> str:
        return self.garbage


@dataclass(frozen=True)
class Control:
    """A ping (answered with a pong of the same payload) or an unsolicited pong (no answer)."""

    opcode: int
    payload: bytes

    def wire(self) -> bytes:
        return client_frame(self.opcode, self.payload)


@dataclass(frozen=True)
class Text:
    """A text message, whole or in fragments with control frames between them (RFC 6455 5.4)."""

    body: Doc | Padded | Garbage
    cuts: tuple[float, ...] = ()  # where fragments end, as fractions of the payload
    between: tuple[Control, ...] = ()  # sent after the first fragments, one after each
    mask: bytes = b"\x00\x00\x00\x00"


Step = Text | Control

whitespace = st.sampled_from(["", "", "", " ", "\n", "\t\r\n "])
documents = weighted(
    (2, good_events()),
    (3, recovering_events()),
    (4, spoiled_events()),
    (2, chaos_events()),
    (1, json_values),
    (1, deep()),
    (1, invalid_values),
)
# Whole documents, with the whitespace JSON allows around them.
docs = st.builds(Doc, documents, ascii_only=st.booleans(), before=whitespace, after=whitespace)
# Broken ones: cut short, something after the document, a byte order mark before it.
broken_docs = st.builds(
    Doc,
    documents,
    ascii_only=st.booleans(),
    before=st.sampled_from(["", "\ufeff", "\x00"]),
    after=st.sampled_from(["", "x", "}", "\x00", ",{}", '{"type":"ping"}']),
    cut=st.floats(0, 1),
)
bodies = weighted(
    (12, docs),
    (2, broken_docs),
    (1, st.builds(Padded, st.integers(FRAME_MAX - 40, FRAME_MAX + 4), st.sampled_from("xé€😀"))),
    (1, st.builds(Garbage, st.text(max_size=60))),
)
controls = st.builds(Control, st.sampled_from([OP_PING, OP_PING, OP_PONG]), st.binary(max_size=125))
texts = st.builds(
    Text,
    bodies,
    cuts=weighted((2, st.just(())), (1, st.lists(st.floats(0, 1), min_size=1, max_size=3))).map(
        lambda c: tuple(sorted(c))
    ),
    between=st.lists(controls, max_size=2).map(tuple),
    mask=st.binary(min_size=4, max_size=4),
)
steps = weighted((4, texts), (1, controls))


def step_wire(step: Step, ctx: dict[Ref, Any]) -> tuple[bytes, str | None, list[Control]]:
    """The bytes of a step, its message's text (None for a control frame), and the control
    frames sent between its fragments (the server answers those before the message)."""
    if isinstance(step, Control):
        return step.wire(), None, []
    text = step.body.text(ctx)
    payload = text.encode()
    ends = sorted({int(len(payload) * c) for c in step.cuts} | {len(payload)})
    frames, start, sent = [], 0, []
    between = list(step.between)
    for i, end in enumerate(ends):
        last = i == len(ends) - 1
        op = OP_TEXT if i == 0 else OP_CONTINUATION
        frames.append(client_frame(op, payload[start:end], fin=last, mask=step.mask))
        if not last and between:
            sent.append(between.pop(0))
            frames.append(sent[-1].wire())
        start = end
    return b"".join(frames), text, sent


@dataclass(frozen=True)
class Ending:
    """How the hostile socket ends, after every step was answered.

    `data` is sent, then (`how`): "read" reads until the server closes (answering its close
    frame, as a client does) and expects one of `codes` (None: no close frame, just EOF);
    "rst" cuts the connection at once; "fin" half-closes and reads like "read". `answer`:
    the frame may be taken rather than refused; then this event comes before a normal close."""

    name: str
    data: bytes
    how: str = "read"
    codes: frozenset[int | None] = frozenset()
    answer: str | None = None


def _e(name: str, data: bytes, *codes: int | None, how: str = "read") -> Ending:
    return Ending(name, data, how, frozenset(codes))


PING = b'{"type":"ping"}'
PING_FRAME = client_frame(OP_TEXT, PING)
CLOSE_1000 = client_frame(OP_CLOSE, close_payload(1000))


def _close(code: int, reason: bytes = b"") -> bytes:
    return client_frame(OP_CLOSE, close_payload(code, reason))


def _partial(pad: int, cut: float) -> bytes:
    frame = client_frame(OP_TEXT, PING + b" " * pad)
    return frame[: max(1, min(len(frame) - 1, int(len(frame) * cut)))]


bad_utf8 = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
small = st.binary(max_size=40)
partials = st.builds(_partial, st.integers(0, 300), st.floats(0, 1))
ENDINGS = {
    # Closes, valid and not.
    "close": st.builds(
        lambda code, reason: _e("close", _close(code, reason.encode()[:123]), 1000),
        st.sampled_from([1000, 1001, 1002, 1003, 1008, 1011, 3000, 4401, 4999]),
        st.text(max_size=40),
    ),
    "close_empty": st.just(_e("close_empty", client_frame(OP_CLOSE, b""), 1000)),
    # Codes RFC 6455 7.4 forbids on the wire but aiohttp takes: either answer is fine.
    "close_odd_code": st.sampled_from([1006, 5000, 65535]).map(
        lambda code: _e("close_odd_code", _close(code), 1000, 1002)
    ),
    "close_bad_code": st.sampled_from([0, 999, 1004, 1005, 1015, 1016, 2000, 2999]).map(
        lambda code: _e("close_bad_code", _close(code), 1002)
    ),
    "close_one_byte": st.just(_e("close_one_byte", client_frame(OP_CLOSE, b"\x03"), 1002)),
    "close_bad_reason": bad_utf8.map(
        lambda bad: _e("close_bad_reason", _close(1000, b"ok" + bad), 1007)
    ),
    # Data the protocol refuses.
    "binary": small.map(lambda data: _e("binary", client_frame(OP_BINARY, data), 1003)),
    "binary_fragmented": small.map(
        lambda data: _e(
            "binary_fragmented",
            client_frame(OP_BINARY, data, fin=False) + client_frame(OP_CONTINUATION, b"x"),
            1003,
        )
    ),
    "too_big": st.integers(FRAME_MAX + 1, FRAME_MAX + 2000).map(
        lambda size: _e("too_big", client_frame(OP_TEXT, b" " * (size - len(PING)) + PING), 1009)
    ),
    # Each fragment fits, the message does not.
    "too_big_fragmented": st.just(
        _e(
            "too_big_fragmented",
            client_frame(OP_TEXT, b" " * (FRAME_MAX // 2), fin=False)
            + client_frame(OP_CONTINUATION, b" " * (FRAME_MAX // 2 - len(PING) + 1) + PING),
            1009,
        )
    ),
    # Declares more than the limit (up to 2**63 - 1 bytes), sends two.
    "lying_length": st.integers(FRAME_MAX + 1, (1 << 63) - 1).map(
        lambda n: _e("lying_length", client_frame(OP_TEXT, b"{}", length=n), 1009)
    ),
    "bad_utf8": bad_utf8.map(
        lambda bad: _e("bad_utf8", client_frame(OP_TEXT, b'{"type":"' + bad + b'"}'), 1007)
    ),
    # Half of a two-byte character in each fragment is valid; a character never completed is not.
    "bad_utf8_fragmented": st.just(
        _e(
            "bad_utf8_fragmented",
            client_frame(OP_TEXT, b'"\xc3', fin=False) + client_frame(OP_CONTINUATION, b'"'),
            1007,
        )
    ),
    # Framing RFC 6455 5 forbids.
    "reserved_opcode": st.builds(
        lambda op, data: _e("reserved_opcode", client_frame(op, data), 1002),
        st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]),
        small,
    ),
    "reserved_bits": st.builds(
        lambda op, rsv: _e("reserved_bits", client_frame(op, PING, rsv=rsv), 1002),
        st.sampled_from([OP_TEXT, OP_PING]),
        st.integers(1, 7),
    ),
    "big_control": st.builds(
        lambda op, n: _e("big_control", client_frame(op, close_payload(1000, b"x" * n)), 1002),
        st.sampled_from([OP_PING, OP_PONG, OP_CLOSE]),
        st.integers(124, 300),
    ),
    "fragmented_control": st.sampled_from([OP_PING, OP_PONG, OP_CLOSE]).map(
        lambda op: _e("fragmented_control", client_frame(op, b"", fin=False), 1002)
    ),
    "orphan_continuation": st.booleans().map(
        lambda fin: _e("orphan_continuation", client_frame(OP_CONTINUATION, PING, fin=fin), 1002)
    ),
    "data_inside_fragments": st.sampled_from([OP_TEXT, OP_BINARY]).map(
        lambda op: _e(
            "data_inside_fragments",
            client_frame(OP_TEXT, b'{"type":', fin=False) + client_frame(op, PING),
            1002,
        )
    ),
    # RFC 6455 5.1 says a server closes on an unmasked frame; aiohttp takes it. Either way
    # the close that follows is answered, and nothing breaks.
    "unmasked": st.just(
        Ending(
            "unmasked",
            client_frame(OP_TEXT, PING, mask=None) + CLOSE_1000,
            codes=frozenset({1000, 1002}),
            answer="pong",
        )
    ),
    # Peers that vanish: mid-frame with an RST, or a FIN (then it still reads), or garbage.
    "rst_mid_frame": partials.map(lambda data: _e("rst_mid_frame", data, how="rst")),
    "fin_mid_frame": partials.map(
        lambda data: _e("fin_mid_frame", data, None, 1000, 1002, how="fin")
    ),
    "rst": st.just(_e("rst", b"", how="rst")),
    "garbage": st.binary(min_size=1, max_size=200).map(lambda data: _e("garbage", data, how="rst")),
}
ENDINGS_CLOSE_NORMAL = _e("close", CLOSE_1000, 1000)


Query = str | tuple[tuple[str, "str | Ref | Near"], ...]


@st.composite
def queries(draw: st.DrawFn) -> Query:
    """The upgrade's query string: none mostly, else a subscribe by query, good or bad."""
    if draw(st.integers(0, 3)):
        return ""
    if draw(st.booleans()):
        return draw(
            st.sampled_from(
                [
                    "post_id=",
                    "post_id",
                    "post_id=%ff",
                    "post_id=a%00",
                    "post_id=a&post_id=b%20c",
                    "post_id=a&epoch=e",
                    "post_id=a&offset=1",
                    "post_id=a&epoch=&offset=1",
                    "post_id=a&epoch=e&offset=-1",
                    "post_id=a&epoch=e&offset=4611686018427387904",
                    "post_id=a&epoch=e&offset=%D9%A3",
                    "post_id=a&epoch=e&offset=1&offset=x",
                    "epoch=e&offset=1",
                ]
            )
        )
    post_id = weighted((2, st.just(Ref.POST)), (2, valid_ids), (1, bad_ids))
    fields: list[tuple[str, str | Ref | Near]] = [("post_id", draw(post_id))]
    if draw(st.booleans()):
        epoch = weighted((3, st.just(Ref.EPOCH)), (1, st.text(max_size=EPOCH_MAX + 2)))
        offset = weighted(
            (3, st.integers(-2, 1).map(Near)),
            (1, st.integers(-2, 10).map(str)),
            (1, st.text(max_size=4)),
        )
        fields += [("epoch", draw(epoch)), ("offset", draw(offset))]
    return tuple(fields)


def query_text(query: Query, ctx: dict[Ref, Any]) -> str:
    if isinstance(query, str):
        return query

    def value(v: str | Ref | Near) -> str:
        if isinstance(v, Near):
            return str(ctx[Ref.OFFSET] + v.delta)
        return str(ctx[v]) if isinstance(v, Ref) else v

    return "&".join(f"{k}={quote(value(v), safe='')}" for k, v in query)


@dataclass(frozen=True)
class Script:
    query: Query
    steps: tuple[Step, ...]
    splits: tuple[float, ...]  # where the bytes are cut into separate writes
    ending: Ending


def scripts(endings: st.SearchStrategy[Ending], max_steps: int = 8) -> st.SearchStrategy[Script]:
    return st.builds(
        Script,
        queries(),
        st.lists(steps, max_size=max_steps).map(tuple),
        st.lists(st.floats(0, 1), max_size=3).map(lambda s: tuple(sorted(s))),
        endings,
    )


# -- the model of the protocol ----------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What one client frame must get back: a control pong, or one event."""

    kind: str  # "pong_frame" | "event"
    payload: bytes = b""  # of the pong frame
    types: frozenset[str] = frozenset()  # the event types that may answer
    code: str | None = None  # an error's code (None: any documented one)
    post_id: str | None = None  # of a subscribed or unsubscribed
    since: tuple[str, int] | None = None  # the position a subscribe gave


def answer(*types: str, **kw: Any) -> Expect:
    return Expect("event", types=frozenset(types), **kw)


def error(code: str) -> Expect:
    return answer("error", code=code)


class Oracle:
    """The README's protocol for one socket, as the client sees it: which answer each text
    message gets, given the posts the socket watches. Parsing is orjson's (the server's): where
    JSON parsers differ (duplicate keys, escaped lone surrogates, huge numbers) it decides."""

    def __init__(self) -> None:
        self.watching: set[str] = set()

    def message(self, text: str) -> Expect | int:
        """The answer to a text message, or the close code that refuses it."""
        if len(text.encode()) > FRAME_MAX:
            return 1009
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            return error("invalid_json")
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return error("invalid_event")
        kind = event["type"]
        if kind == "ping":
            return answer("pong")
        if kind in ("auth", "refresh"):  # open mode: either taken or refused, never fatal
            return answer("authenticated", "error")
        if kind not in ("subscribe", "unsubscribe"):
            return error("unknown_type")
        target = self.target(event)
        if target is None:
            return error("invalid_request")
        if kind == "subscribe":
            return self.subscribe(*target)
        self.watching.discard(target[0])
        return answer("unsubscribed", post_id=target[0])

    def subscribe(self, post_id: str, since: tuple[str, int] | None) -> Expect:
        if post_id not in self.watching and len(self.watching) >= POSTS_PER_SOCKET:
            return error("too_many_posts")
        self.watching.add(post_id)
        return answer("subscribed", post_id=post_id, since=since)

    @staticmethod
    def target(fields: Any) -> tuple[str, tuple[str, int] | None] | None:
        """The post and position of a subscribe (event or query string); None if invalid."""
        post_id = fields.get("post_id")
        if not isinstance(post_id, str) or len(post_id) > ID_MAX or not ID_RE.fullmatch(post_id):
            return None
        epoch, offset = fields.get("epoch"), fields.get("offset")
        if epoch is None and offset is None:
            return post_id, None
        if not isinstance(epoch, str) or not 1 <= len(epoch) <= EPOCH_MAX:
            return None
        if isinstance(offset, str) and offset.isascii() and offset.isdigit() and len(offset) < 19:
            offset = int(offset)  # the query string's form, taken in frames too
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < OFFSET_END:
            return None
        return post_id, (epoch, offset)


class Answers:
    """Checks the frames of one socket against what the oracle expects, as they come."""

    def __init__(self, expects: list[Expect], witness: Witness) -> None:
        self.expects = expects
        self.witness = witness
        self.matched = 0
        self.replays: dict[str, list[int]] = {}  # post -> [next offset, last offset]
        self.seen: list[Any] = []

    @property
    def done(self) -> bool:
        return self.matched == len(self.expects)

    def take(self, frame: Frame) -> None:
        assert not frame.masked and frame.rsv == 0 and frame.fin, f"a bad frame {frame}"
        self.seen.append(frame.payload[:200])
        if frame.opcode == OP_PONG:
            want = self.next(frame)
            assert want.kind == "pong_frame" and frame.payload == want.payload, self.why(frame)
            return
        assert frame.opcode == OP_TEXT, self.why(frame)
        event = json.loads(frame.payload)
        note(event)
        if event["type"] in STREAM:
            return self.replayed(event)
        want = self.next(frame)
        assert want.kind == "event" and event["type"] in want.types, self.why(frame)
        self.replays_complete()
        if event["type"] == "error":
            assert event["code"] in ERROR_CODES and isinstance(event["message"], str), event
            assert event["message"] and (want.code is None or event["code"] == want.code), self.why(
                frame
            )
        elif event["type"] == "unsubscribed":
            assert event == {"type": "unsubscribed", "post_id": want.post_id}, self.why(frame)
        elif event["type"] == "subscribed":
            self.subscribed(event, want)
        elif event["type"] == "pong":
            assert event == {"type": "pong"}, event
        return None

    def subscribed(self, event: dict[str, Any], want: Expect) -> None:
        """`recovered` is earned by the stream's own epoch and an offset it has reached; the
        history (history.size 2000, ttl 600 s) holds every comment a test posts."""
        epoch, offset = event["epoch"], event["offset"]
        assert event["post_id"] == want.post_id and isinstance(epoch, str), event
        assert isinstance(offset, int) and offset >= 0, event
        if want.post_id == self.witness.post_id:
            assert (epoch, offset) == (self.witness.epoch, self.witness.offset), event
        since = want.since
        recovered = since is not None and since[0] == epoch and since[1] <= offset
        assert event["recovered"] is recovered, (since, event)
        if recovered and since is not None and since[1] < offset:
            self.replays[event["post_id"]] = [since[1] + 1, offset]

    def replayed(self, event: dict[str, Any]) -> None:
        """Only a recovered subscribe brings stream events here (nothing is posted meanwhile):
        from the position given + 1 to the answer's offset, in order, once."""
        replay = self.replays.get(event["post_id"])
        assert replay is not None, f"a stream event nobody asked for: {event}"
        assert event["type"] != "delete", event  # nothing is deleted here
        items = event["comments"] if event["type"] == "comments" else [event["comment"]]
        assert event["offset"] == replay[0] and replay[0] + len(items) - 1 <= replay[1], (
            replay,
            event,
        )
        ids = self.witness.ids()  # the witness's post is the only one with a history
        assert [c["id"] for c in items] == [ids.get(replay[0] + i) for i in range(len(items))]
        replay[0] += len(items)

    def replays_complete(self) -> None:
        for post_id, (next_offset, last) in self.replays.items():
            assert next_offset == last + 1, f"{post_id}: the replay stopped at {next_offset - 1}"
        self.replays.clear()

    def next(self, frame: Frame) -> Expect:
        assert not self.done, f"an answer too many: {frame}"
        self.matched += 1
        return self.expects[self.matched - 1]

    def why(self, frame: Frame) -> str:
        want = self.expects[self.matched - 1] if self.matched else None
        return f"frame {frame} for {want} (answer {self.matched} of {len(self.expects)})"


def note(event: dict[str, Any]) -> None:
    """Count what the examples reached (pytest --hypothesis-show-statistics)."""
    detail = event.get("code") or event.get("recovered")
    hypothesis_event(event["type"] + (f" {detail}" if detail is not None else ""))


# -- one hostile socket ---------------------------------------------------------------------


async def send_in_pieces(client: WireClient, data: bytes, splits: tuple[float, ...]) -> None:
    """The bytes in separate writes, cut anywhere (a header, a mask, a UTF-8 character)."""
    start = 0
    for end in sorted({int(len(data) * s) for s in splits} | {len(data)}):
        if end > start:
            await client.send(data[start:end])
        start = end


async def read_until_closed(client: WireClient) -> list[Frame]:
    """Every frame until the connection ends; a close frame is answered as a client does."""
    frames = []
    while (frame := await client.read_frame(DEADLINE)) is not None:
        frames.append(frame)
        if frame.opcode == OP_CLOSE:
            code = frame.close_code or 1000
            # The server may cut the TCP right after its close frame.
            with contextlib.suppress(ConnectionError):
                await client.send(client_frame(OP_CLOSE, close_payload(code)))
    return frames


def check_ending(ending: Ending, frames: list[Frame], witness: Witness) -> None:
    closes = [f for f in frames if f.opcode == OP_CLOSE]
    code = closes[0].close_code if closes else None
    assert code != 1011, f"{ending.name}: an internal error"
    rest = frames[: frames.index(closes[0])] if closes else frames
    if ending.answer is not None and rest:
        answers = Answers([answer(ending.answer)], witness)
        for frame in rest:
            answers.take(frame)
        assert answers.done and code == 1000, f"{ending.name}: {frames}"
    else:
        assert not rest, f"{ending.name}: frames before the close: {rest}"
    assert code in ending.codes, f"{ending.name}: closed with {code}, wanted {ending.codes}"
    assert len(closes) <= 1 and (not closes or frames[-1] is closes[0]), (
        f"{ending.name}: frames after the close: {frames}"
    )


@dataclass
class Plan:
    """A script made concrete for this server: what to send and what must come back."""

    target: str
    refused: bool = False  # the upgrade must get 400 invalid_request
    data: bytes = b""
    expects: list[Expect] = field(default_factory=list)
    ending: Ending = field(default_factory=lambda: _e("rst", b"", how="rst"))


def plan(script: Script, witness: Witness) -> Plan:
    ctx = {Ref.POST: witness.post_id, Ref.EPOCH: witness.epoch, Ref.OFFSET: witness.offset}
    query = query_text(script.query, ctx)
    p = Plan("/v1/ws" + (f"?{query}" if query else ""), ending=script.ending)
    oracle = Oracle()
    fields = URL(f"http://x{p.target}").query  # as the server reads it
    if "post_id" in fields:
        first = oracle.target(fields)
        if first is None:
            p.refused = True
            return p
        p.expects.append(oracle.subscribe(*first))
    data = []
    for step in script.steps:
        wire, text, controls = step_wire(step, ctx)
        pings = [
            c for c in ([step] if isinstance(step, Control) else controls) if c.opcode == OP_PING
        ]
        result = oracle.message(text) if text is not None else None
        if isinstance(result, int):  # refused: it ends the script (alone, no pings inside)
            wire, *_ = step_wire(Text(step.body, step.cuts, (), step.mask), ctx)
            p.ending = _e("refused_step", wire, result)
            break
        p.expects += [Expect("pong_frame", c.payload) for c in pings]
        if result is not None:
            p.expects.append(result)
        data.append(wire)
    data.append(PING_FRAME)  # the last answer: everything before it was answered
    p.expects.append(answer("pong"))
    p.data = b"".join(data)
    return p


async def run_script(script: Script, health: Health) -> None:
    """One hostile socket: upgrade, send every step at once, check each answer in order,
    end as the script says; then the server must be as healthy as before."""
    p = plan(script, health.witness)
    why = f"{script} (target {p.target})"
    client = await WireClient.open(health.server.port, p.target, DEADLINE)
    if p.refused:
        assert isinstance(client, Refusal) and client.status == 400, (p.target, client)
        assert orjson.loads(client.body)["error"]["code"] == "invalid_request", client.body
        hypothesis_event("upgrade refused")
        return await health.check(why)
    assert isinstance(client, WireClient), (p.target, client)
    hypothesis_event(f"ending {p.ending.name}")
    try:
        await send_in_pieces(client, p.data, script.splits)
        answers = Answers(p.expects, health.witness)
        while not answers.done:
            frame = await client.read_frame(DEADLINE)
            assert frame is not None, f"closed after {answers.matched} answers: {answers.seen}"
            answers.take(frame)
        answers.replays_complete()
        await client.send(p.ending.data)
        if p.ending.how == "rst":
            client.abort()
        else:
            if p.ending.how == "fin":
                client.writer.write_eof()
            check_ending(p.ending, await read_until_closed(client), health.witness)
    except BaseException as e:
        # Taken here, so that the next example is not blamed for this one's log.
        e.add_note(f"while running {why}\nthe server's log meanwhile:\n{health.new_log()[-4000:]}")
        raise
    finally:
        client.abort()
    return await health.check(why)


# -- the tests ------------------------------------------------------------------------------


@settings(PROPERTIES, max_examples=200)
@given(script=scripts(ENDINGS["close"]))
async def test_any_text_frames_get_their_documented_answers_and_spoil_nothing(
    health: Health, script: Script
):
    """Text frames of every shape, whole or fragmented around pings and pongs, pipelined and
    written in pieces, after an upgrade with or without a subscribe in its query."""
    await run_script(script, health)


@pytest.mark.parametrize("ending", sorted(ENDINGS))
@settings(PROPERTIES, max_examples=4)
@given(data=st.data())
async def test_each_protocol_violation_closes_with_its_documented_code(
    health: Health, ending: str, data: st.DataObject
):
    """Every way of ending a socket, valid or not, after a few frames: the documented close
    code (1003 binary, 1009 too big, 1002 framing, 1007 invalid UTF-8; 1000 for a close),
    the close after every answer, nothing after the close; or a cut connection."""
    await run_script(data.draw(scripts(ENDINGS[ending], max_steps=3)), health)


def event_text(kind: str, post_id: str) -> Text:
    return Text(Doc(Obj((("type", kind), ("post_id", post_id)))))


@st.composite
def storms(draw: st.DrawFn) -> Script:
    """Subscribes to a hundred posts and more, then subscribes and unsubscribes at random."""
    ops = [("subscribe", i) for i in range(draw(st.integers(POSTS_PER_SOCKET - 5, 130)))]
    ops += draw(
        st.lists(
            st.tuples(
                st.sampled_from(["subscribe", "subscribe", "unsubscribe"]), st.integers(0, 150)
            ),
            max_size=120,
        )
    )
    steps = tuple(event_text(kind, f"storm-{i}") for kind, i in ops)
    splits = draw(st.lists(st.floats(0, 1), max_size=5).map(lambda s: tuple(sorted(s))))
    return Script("", steps, splits, ENDINGS_CLOSE_NORMAL)


@settings(PROPERTIES, max_examples=10)
@given(script=storms())
async def test_subscribe_storms_past_the_per_socket_limit(health: Health, script: Script):
    """Subscribes and unsubscribes pipelined by the hundred, past posts_per_socket: every one
    answered in order, `too_many_posts` exactly when the socket already watches 100 others."""
    await run_script(script, health)


# -- many sockets at once -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChurnOp:
    """One frame of a socket that keeps changing its mind about the witness's post."""

    kind: str  # "subscribe" | "unsubscribe" | "ping"
    position: str = "none"  # subscribe: "none", "near" (the witness's offset - back), "foreign"
    back: int = 0


FOREIGN_EPOCH = "0000000000000000"


class Churner:
    """A socket that sends one frame, waits for its answer, sends the next, while comments are
    posted to the same post; everything it gets is kept for `check`."""

    def __init__(self, client: WireClient, witness: Witness) -> None:
        self.client = client
        self.witness = witness
        self.events: list[dict[str, Any]] = []
        self.positions: list[tuple[str, int] | None] = []  # sent with each subscribe
        self.answered = 0
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while (frame := await self.client.read_frame(60)) is not None:
            if frame.opcode == OP_TEXT:
                event = json.loads(frame.payload)
                self.events.append(event)
                self.answered += event["type"] not in STREAM
            self.changed.set()

    async def run(self, ops: list[ChurnOp]) -> None:
        for op in ops:
            frame: dict[str, Any] = {"type": op.kind}
            if op.kind != "ping":
                frame["post_id"] = self.witness.post_id
            if op.kind == "subscribe":
                position = None
                if op.position == "near":
                    position = (self.witness.epoch, max(0, self.witness.offset - op.back))
                elif op.position == "foreign":
                    position = (FOREIGN_EPOCH, op.back + 2)
                if position is not None:
                    frame["epoch"], frame["offset"] = position
                self.positions.append(position)
            await self.client.send(client_frame(OP_TEXT, orjson.dumps(frame)))
            await self.until(lambda want=self.answered + 1: self.answered >= want, f"{op}")

    async def until(self, check: Any, what: str) -> None:
        async with asyncio.timeout(DEADLINE):
            while not check():
                self.changed.clear()
                await self.changed.wait()

    def check(self) -> int | None:
        """Between a `subscribed` and the next answer about the post, its comments come at
        consecutive offsets: from the position given + 1 if it recovered, else from the
        answer's offset + 1. The same ids at the same offsets as the witness's; none after
        `unsubscribed`. Returns the offset it has now, None if it does not watch the post."""
        ids = self.witness.ids()
        positions = iter(self.positions)
        at: int | None = None
        for event in self.events:
            kind = event["type"]
            assert kind != "error", event
            if kind == "subscribed":
                since, epoch, offset = next(positions), event["epoch"], event["offset"]
                recovered = since is not None and since[0] == epoch and since[1] <= offset
                assert event["recovered"] is recovered, (since, event)
                replayed = recovered and since is not None and since[1] < offset
                hypothesis_event(
                    f"churn: recovered {recovered}" + (", replayed" if replayed else "")
                )
                at = since[1] + 1 if recovered and since is not None else offset + 1
            elif kind == "unsubscribed":
                at = None
            elif kind in STREAM:
                assert at is not None and event["offset"] == at, (at, event, self.events)
                items = event["comments"] if kind == "comments" else [event["comment"]]
                for i, comment in enumerate(items):
                    assert ids.get(at + i) == comment["id"], (at + i, comment, ids)
                at += len(items)
        return None if at is None else at - 1  # the offset it has, if it watches the post

    async def close(self) -> None:
        await self.client.send(CLOSE_1000)
        await self.reader
        self.client.abort()


churn_ops = st.builds(
    ChurnOp,
    st.sampled_from(["subscribe", "subscribe", "unsubscribe", "ping"]),
    st.sampled_from(["none", "near", "near", "foreign"]),
    st.integers(-2, 5),
)


@settings(PROPERTIES, max_examples=30)
@given(
    sockets=st.lists(st.lists(churn_ops, min_size=1, max_size=10), min_size=2, max_size=6),
    comments=st.integers(1, 8),
)
async def test_churning_subscribers_of_a_live_post_each_get_a_gapless_stream(
    health: Health, sockets: list[list[ChurnOp]], comments: int
):
    """Sockets subscribe (with positions at, before, after the stream's or from another
    epoch), unsubscribe and resubscribe the witness's post while comments are posted to it:
    every one of them, and the witness, gets each comment once, in order, at its offset."""
    witness = health.witness
    clients = [await WireClient.open(health.server.port, "/v1/ws", DEADLINE) for _ in sockets]
    churners = [Churner(c, witness) for c in clients if isinstance(c, WireClient)]

    async def write() -> None:
        for i in range(comments):
            witness.posted.append(await post(health.http, health.server, witness.post_id, f"{i}"))

    try:
        await asyncio.gather(
            write(), *(c.run(ops) for c, ops in zip(churners, sockets, strict=True))
        )
        last = witness.offset
        await wait_for(
            lambda: len(witness.socket.comments()) >= last - witness.start, DEADLINE, "witness"
        )
        for churner in churners:  # each that watches the post catches up with the last comment
            await churner.until(lambda c=churner: c.check() in (None, last), "the last comment")
    except BaseException as e:
        e.add_note(f"the server's log meanwhile:\n{health.new_log()[-4000:]}")
        raise
    finally:
        for churner in churners:
            await churner.close()
    await health.check(f"churn {sockets}")


async def test_a_crowd_storming_past_its_limits_at_once_leaves_nothing_behind(health: Health):
    """Twenty sockets pipeline 130 subscribes each to the same 130 posts at once, while the
    witness's post gets comments; then half close and half vanish. Each socket gets 100
    `subscribed` and 30 `too_many_posts`, in order; every socket and post is released."""
    crowd, posts = 20, POSTS_PER_SOCKET + 30
    frames = b"".join(
        client_frame(OP_TEXT, orjson.dumps({"type": "subscribe", "post_id": f"crowd-{i}"}))
        for i in range(posts)
    )
    clients = [await WireClient.open(health.server.port, "/v1/ws", DEADLINE) for _ in range(crowd)]

    async def storm(client: WireClient | Refusal) -> list[str]:
        assert isinstance(client, WireClient), client
        await client.send(frames)
        got = []
        while len(got) < posts:
            frame = await client.read_frame(DEADLINE)
            assert frame is not None and frame.opcode == OP_TEXT, frame
            event = json.loads(frame.payload)
            got.append(event.get("code") or event["type"])
        return got

    async def write() -> None:
        for i in range(10):
            health.witness.posted.append(
                await post(health.http, health.server, health.witness.post_id, f"crowd {i}")
            )

    *answers, _ = await asyncio.gather(*(storm(c) for c in clients), write())
    want = ["subscribed"] * POSTS_PER_SOCKET + ["too_many_posts"] * (posts - POSTS_PER_SOCKET)
    assert all(a == want for a in answers)
    for i, client in enumerate(clients):
        assert isinstance(client, WireClient)
        if i % 2 == 0:
            await client.send(CLOSE_1000)
            assert [f.close_code for f in await read_until_closed(client)] == [1000]
        client.abort()
    await health.check("a crowd of storms")


# -- the frame limit, on --------------------------------------------------------------------

FRAMES_PER_SECOND, FRAMES_BURST = 5, 10


async def test_a_frame_flood_is_closed_with_1008_and_spoils_nothing(
    start_server: Any, http: aiohttp.ClientSession
):
    """With limits.frames_per_second on, a socket that sends 300 frames at once gets the
    answers its burst allows, then close 1008; the witness on the same server is untouched."""
    env = {
        **NO_LIMITS,
        "LIVECOMMENTS_LIMITS_FRAMES_PER_SECOND": str(FRAMES_PER_SECOND),
        "LIVECOMMENTS_LIMITS_FRAMES_BURST": str(FRAMES_BURST),
        "LIVECOMMENTS_LIMITS_POSTS_PER_SOCKET": str(FRAMES_BURST),  # the burst must cover it
    }
    server = start_server("limited", env=env)
    witness = await open_witness(http, server)
    client = await WireClient.open(server.port, "/v1/ws", DEADLINE)
    assert isinstance(client, WireClient)
    flood = 300
    frames = []
    try:
        await client.send(PING_FRAME * flood)
        while (frame := await client.read_frame(DEADLINE)) is not None:
            frames.append(frame)
            if frame.opcode == OP_CLOSE:
                await client.send(CLOSE_1000)
            if len(frames) == flood:
                break  # every frame answered: nothing limited it
        pongs = [f for f in frames if f.opcode == OP_TEXT and f.payload == b'{"type":"pong"}']
        assert frames[-1].close_code == 1008, f"{len(pongs)} pongs, no 1008 after {flood} frames"
        assert len(pongs) <= 2 * FRAMES_BURST and len(frames) == len(pongs) + 1, frames
        await Health(server, http, witness).check("a frame flood")
    finally:
        client.abort()
        await witness.socket.close()

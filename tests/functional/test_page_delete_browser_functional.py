"""Taking a comment down on the page at `/` (issue 11), in Debian's Chromium against real servers.

Open mode: Delete is offered on the viewer's own comments only (by the uid field); a deletion
vanishes live on every page watching the post, is counted in the page's stream position like a
comment (no resubscribe after it), and never comes back: not on a reload, not on a page opened
later, not on a page that recovers across it, not after a server restart (the reload that
follows prunes it). Every refusal (403, 404, 401, 429) is said on the page, as text.

Tokens (`auth.mode = "jwt"`, `auth.read = "token"`): the page takes `#token=<jwt>` from the
address (and out of it), keeps it in sessionStorage, sends it as `Authorization: Bearer` and as
the socket's first frame; a moderator gets Delete on every comment; a refused token stops the
reconnects until a new one comes by `hashchange`; a newer token for the same user is handed to
the open socket (`refresh`). These need the server's auth wiring.

The README's JavaScript client is run here too: it must count `delete` events as positions.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import jwt
import pytest

from tests.conftest import StartServer
from tests.functional.test_page_browser_functional import (
    FAKE_EPOCH_MS,
    browser,
    expect,
    messages,
    post_through_form,
    readme_example,
    watch_button,
)
from tests.support.server import ServerProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Route

__all__ = ["browser"]  # a fixture, imported for pytest

# Drains spread reconnects over 10 s by default; these servers stop at once.
QUICK_STOP = {"LIVECOMMENTS_SERVER_DRAIN_SECONDS": "0"}
SECRET = "page-delete-test-secret-of-more-than-32-bytes"
# Recorded inside the page, so that what a test reads is in step with what the page did: every
# comment ever added to its list, by id ("never shown" is checked, not "gone by now"), every
# WebSocket it opened and every frame it sent.
RECORD = """
window.__shown = [];
window.__sockets = [];
window.WebSocket = class extends window.WebSocket {
  constructor(...args) {
    super(...args);
    window.__sockets.push(this.__record = { url: String(args[0]), sent: [] });
  }
  send(data) { this.__record.sent.push(JSON.parse(data)); return super.send(data); }
};
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) {
    if (n.nodeName === "LI" && n.dataset.id) window.__shown.push(n.dataset.id);
  }
}).observe(document, { childList: true, subtree: true });
"""
# A state the status line settles in: live, or a failure the test can name at once (rather than
# waiting out the deadline for a "live" that will not come).
SETTLED = re.compile(r"^live on |error|sign-in expired|signed-in readers|could not|disconnected")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Open mode; each test watches a post of its own, and posts as uids of its own."""
    shared = ServerProcess(tmp_path_factory.mktemp("page-delete"), env=QUICK_STOP, name="open")
    try:
        yield shared.start()
    finally:
        try:
            shared.stop(timeout=15)
        except Exception:
            shared.kill()


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tokens for everything, reading included: the page must send its token everywhere."""
    env = QUICK_STOP | {
        "LIVECOMMENTS_AUTH_MODE": "jwt",
        "LIVECOMMENTS_AUTH_SECRET": SECRET,
        "LIVECOMMENTS_AUTH_READ": "token",
    }
    shared = ServerProcess(tmp_path_factory.mktemp("page-jwt"), env=env, name="jwt")
    try:
        yield shared.start()
    finally:
        try:
            shared.stop(timeout=15)
        except Exception:
            shared.kill()


def mint(sub: str, *, expires_in: float = 3600, roles: tuple[str, ...] = ()) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + expires_in)}
    if roles:
        claims["roles"] = list(roles)
    return str(jwt.encode(claims, SECRET, algorithm="HS256"))


@dataclass
class Viewer:
    """A page, and what it recorded (RECORD) since it was last loaded."""

    page: Page

    def front(self) -> Page:
        """The page, made the foreground tab: Playwright's click waits for animation frames,
        which Chromium holds back in background tabs (two seconds a click)."""
        self.page.bring_to_front()
        return self.page

    @property
    def sockets(self) -> list[str]:
        return list(self.page.evaluate("window.__sockets.map((s) => s.url)"))

    @property
    def sent_by_socket(self) -> list[list[dict[str, Any]]]:
        return list(self.page.evaluate("window.__sockets.map((s) => s.sent)"))

    @property
    def sent(self) -> list[dict[str, Any]]:
        return [frame for frames in self.sent_by_socket for frame in frames]

    def sent_of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("type") == kind]

    def ever_shown(self) -> list[str]:
        return list(self.page.evaluate("window.__shown"))

    def position(self) -> dict[str, Any] | None:
        return self.page.evaluate("position && { ...position }")  # type: ignore[no-any-return]


OpenViewer = Callable[..., Viewer]


@pytest.fixture
def open_viewer(browser: Browser) -> Iterator[OpenViewer]:
    """Open a server's page in a fresh browser context and watch `post` on it.

    `token` goes in the address's fragment; `uid` fills the user id field; `fake_clock=True`
    freezes the page's timers (its reconnect backoff never fires on its own); `live=False`
    leaves the status line to the test. No page may throw an uncaught error.
    """
    contexts: list[BrowserContext] = []
    errors: list[str] = []
    shared: list[BrowserContext] = []

    def new_context() -> BrowserContext:
        context = browser.new_context()
        context.add_init_script(RECORD)
        contexts.append(context)
        return context

    def open_(
        server: ServerProcess,
        post: str,
        *,
        uid: str | None = None,
        token: str | None = None,
        fake_clock: bool = False,
        clock_at: datetime | None = None,
        live: bool = True,
    ) -> Viewer:
        # Pages of one context are tabs: each has its own sessionStorage, and a new one is
        # quicker than a new context. A page whose clock is faked needs one of its own (the
        # clock is the context's).
        if fake_clock or clock_at is not None:
            context = new_context()
        else:
            if not shared:
                shared.append(new_context())
            context = shared[0]
        page = context.new_page()
        viewer = Viewer(page)
        page.on("pageerror", lambda e: errors.append(str(e)))
        if fake_clock:
            page.clock.install(time=FAKE_EPOCH_MS)
        elif clock_at is not None:
            page.clock.install(time=clock_at)
        page.goto(f"{server.url}/" + (f"#token={token}" if token else ""))
        if uid is not None:
            page.locator("#uid").fill(uid)
        if post != "post-1":  # the page starts on post-1
            page.locator("#post").fill(post)
            watch_button(page).click()
        if live:
            wait_live(page, post)
        if fake_clock:
            page.clock.pause_at(FAKE_EPOCH_MS + 3_600_000)
        return viewer

    yield open_
    for context in contexts:
        context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


def wait_live(page: Page, post: str) -> None:
    status = page.locator("#status")
    expect(status).to_have_text(SETTLED)
    assert status.text_content() == f"live on {post}"


def give_token(page: Page, token: str) -> None:
    """What an embedding site does: set the fragment again. Returns once the page has seen it
    (its own `hashchange` listener came first)."""
    page.evaluate(
        """(t) => new Promise((done) => {
             addEventListener("hashchange", () => done(), { once: true });
             location.hash = "token=" + t;
           })""",
        token,
    )


def delete_buttons(page: Page) -> Any:
    return page.get_by_role("button", name="Delete")


def api(
    server: ServerProcess,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{server.url}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(json.loads(e.read()))


def api_post(
    server: ServerProcess, post: str, message: str, uid: str | None, token: str | None = None
) -> dict[str, Any]:
    body = {"post_id": post, "message": message} | ({"uid": uid} if uid else {})
    status, answer = api(server, "POST", "/v1/comments", body, token)
    assert status == 201, answer
    return dict(answer["comment"])


def listed(server: ServerProcess, post: str, token: str | None = None) -> list[str]:
    status, answer = api(server, "GET", f"/v1/comments?post_id={post}&limit=200", token=token)
    assert status == 200, answer
    return [c["id"] for c in answer["comments"]]


def ids_on(page: Page) -> list[str]:
    return [li.get_attribute("data-id") or "" for li in messages(page).all()]


def test_own_comments_offer_delete_and_a_deletion_vanishes_live_everywhere(
    server: ServerProcess, open_viewer: OpenViewer
) -> None:
    post = "delete-live"
    # Away during all of it (its socket closed, its backoff frozen); it recovers at the end.
    away = open_viewer(server, post, fake_clock=True)
    a = open_viewer(server, post)  # uid "alice", the page's default
    b = open_viewer(server, post, uid="bob")
    away.page.evaluate("socket.close()")
    expect(away.page.locator("#status")).to_contain_text("disconnected")

    for text in ("one", "two", "three"):
        post_through_form(a.front(), text)
        expect(a.page.locator("#message")).to_have_value("")
    for v in (a, b):
        expect(messages(v.page)).to_have_count(3)
    ids = ids_on(a.page)  # newest first
    assert ids_on(b.page) == ids
    # Delete on your own comments only; and the controls follow the uid field.
    expect(delete_buttons(a.page)).to_have_count(3)
    expect(delete_buttons(b.page)).to_have_count(0)
    b.page.locator("#uid").fill("alice")
    expect(delete_buttons(b.page)).to_have_count(3)
    b.page.locator("#uid").fill("bob")
    expect(delete_buttons(b.page)).to_have_count(0)

    doomed = ids[1]
    messages(a.front()).nth(1).get_by_role("button", name="Delete").click()
    for v in (a, b):
        expect(messages(v.page)).to_have_count(2)
        assert ids_on(v.page) == [ids[0], ids[2]]
    # The deletion took offset 4 (three comments before it); the next comment applies at 5,
    # with no resubscribe for a gap that is not one.
    later = api_post(server, post, "after the deletion", uid="carl")
    for v in (a, b):
        expect(messages(v.page)).to_have_count(3)
        expect(messages(v.page).first).to_have_attribute("data-id", later["id"])
        position = v.position()
        assert position is not None and position["offset"] == 5
        assert [f["post_id"] for f in v.sent_of("subscribe")].count(post) == 1, v.sent
    assert listed(server, post) == [ids[2], ids[0], later["id"]]

    # Never back: not on B's reload, not on a page opened now, not on one that recovers across it.
    b.front().reload()
    wait_live(b.page, "post-1")
    b.page.locator("#post").fill(post)
    watch_button(b.page).click()
    wait_live(b.page, post)
    expect(messages(b.page)).to_have_count(3)
    c = open_viewer(server, post)
    expect(messages(c.page)).to_have_count(3)
    away.front().get_by_role("button", name="Retry now").click()
    wait_live(away.page, post)
    expect(messages(away.page)).to_have_count(3)
    assert away.sent_of("subscribe")[-1]["offset"] == 0  # it did recover (it had a position)
    for v in (a, b, c, away):
        assert doomed not in ids_on(v.page)
    for v in (b, c, away):
        assert doomed not in v.ever_shown(), "a deleted comment was shown again"


def test_refusals_are_said_and_nothing_vanishes(
    server: ServerProcess, open_viewer: OpenViewer
) -> None:
    post = "delete-refused"
    author = open_viewer(server, post, uid="frank")
    other = open_viewer(server, post, uid="gina")
    post_through_form(author.front(), "frank's")
    expect(messages(other.page)).to_have_count(1)
    theirs = ids_on(other.page)[0]
    error = other.page.locator("#form-error")

    # 403: the page offers no button, but the server is the one that refuses.
    with other.page.expect_response(lambda r: r.request.method == "DELETE") as answer:
        other.page.evaluate("(id) => deleteComment(id)", theirs)
    assert answer.value.status == 403
    expect(error).to_contain_text(re.compile(r"^Not deleted: .*author.*\.$"))
    with other.page.expect_response(lambda r: r.request.method == "DELETE") as answer:
        other.page.evaluate("deleteComment('12345')")
    assert answer.value.status == 404
    expect(error).to_contain_text(re.compile(r"^Not deleted: .*12345"))

    # 429 and 401, as a server with limits and tokens answers them.
    answers = iter(
        [
            (429, {"Retry-After": "7"}, "rate_limited", "too many deletions"),
            (401, {"WWW-Authenticate": "Bearer"}, "token_expired", "token expired"),
        ]
    )

    def refuse(route: Route) -> None:
        status, headers, code, message = next(answers)
        body = json.dumps({"error": {"code": code, "message": message}})
        route.fulfill(status=status, headers=headers, content_type="application/json", body=body)

    other.page.route(lambda url: "/v1/comments/" in url, refuse)
    other.page.evaluate("(id) => deleteComment(id)", theirs)
    expect(error).to_have_text(
        "Not deleted: too many requests; try again in 7 s (too many deletions)."
    )
    other.page.evaluate("(id) => deleteComment(id)", theirs)
    expect(error).to_have_text("Not deleted: sign-in expired or refused (token expired).")
    # Said as text: the server's words are never markup.
    assert other.page.locator("#form-error *").count() == 0
    for v in (author, other):
        assert ids_on(v.page) == [theirs]
    assert listed(server, post) == [theirs]


def test_a_deletion_missed_across_a_restart_is_dropped_by_the_reload(
    start_server: StartServer, open_viewer: OpenViewer
) -> None:
    """The server restarted (a new epoch: nothing to replay) and a comment was deleted before the
    page came back: the page reloads, and drops what the reload no longer lists."""
    server = start_server(env=QUICK_STOP)
    post = "delete-restart"
    page = open_viewer(server, post, uid="hana", fake_clock=True).page
    for text in ("kept", "taken down while away"):
        post_through_form(page, text)
        expect(page.locator("#message")).to_have_value("")
    expect(messages(page)).to_have_count(2)
    doomed, kept = ids_on(page)
    server.stop()
    expect(page.locator("#status")).to_contain_text("disconnected")
    server.start()  # same port, same data directory
    status, answer = api(server, "DELETE", f"/v1/comments/{doomed}?post_id={post}&uid=hana")
    assert status == 200, answer
    page.get_by_role("button", name="Retry now").click()
    wait_live(page, post)
    expect(messages(page)).to_have_count(1)
    assert ids_on(page) == [kept]


def test_readme_client_counts_deletions_as_stream_positions(
    server: ServerProcess, open_viewer: OpenViewer, browser: Browser
) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        context.add_init_script(RECORD)
        page.goto(f"{server.url}/healthz")  # the server's origin, as for the other README test
        page.set_content(f'<ul id="comments"></ul><script>{readme_example()}</script>')
        shown = page.locator("#comments li")
        first = api_post(server, "post-1", "first", uid="ivy")
        expect(shown).to_have_text(["ivy: first"])
        api_post(server, "post-1", "second", uid="ivy")
        expect(shown).to_have_count(2)
        status, answer = api(server, "DELETE", f"/v1/comments/{first['id']}?post_id=post-1&uid=ivy")
        assert status == 200, answer
        expect(shown).to_have_text(["ivy: second"])
        api_post(server, "post-1", "third", uid="ivy")
        expect(shown).to_have_text(["ivy: second", "ivy: third"])
        # A resubscribe would mean the client took the deletion's offset for a gap.
        assert page.evaluate("window.__sockets.map((s) => s.sent)") == [[]]
    finally:
        context.close()


# -- Tokens -----------------------------------------------------------------------------------


def test_token_from_the_fragment_signs_in_everywhere_and_leaves_the_address(
    jwt_server: ServerProcess, open_viewer: OpenViewer
) -> None:
    post = "token-carol"
    token = mint("carol")
    carol = open_viewer(jwt_server, post, token=token)
    page = carol.page
    requests: list[tuple[str, str, str | None, str | None]] = []
    page.on(
        "request",
        lambda r: requests.append((r.method, r.url, r.headers.get("authorization"), r.post_data)),
    )
    assert page.evaluate("location.href") == f"{jwt_server.url}/"  # no fragment, no token
    assert page.evaluate("sessionStorage.getItem('livecomments.token')") == token
    expect(page.locator("#who")).to_have_text("signed in as carol")
    expect(page.locator("#uid")).to_be_hidden()
    # The token is each socket's first frame, never in its address; subscribing waits for it.
    # (Two sockets: the page opens on post-1, then watches this post.)
    assert set(carol.sockets) == {jwt_server.ws_url}
    *_, (auth, subscribe) = carol.sent_by_socket
    assert auth == {"type": "auth", "token": token}
    assert subscribe == {"type": "subscribe", "post_id": post}

    post_through_form(page, "signed")
    expect(messages(page)).to_have_count(1)
    ((_, _, authorization, body),) = [r for r in requests if r[0] == "POST"]
    assert authorization == f"Bearer {token}"
    assert "uid" not in json.loads(body or "{}"), "with a token the server names the author"
    expect(messages(page).first.locator(".meta")).to_contain_text("carol")
    expect(delete_buttons(page)).to_have_count(1)

    # A reload keeps the token (sessionStorage); the page loads with it (read = "token").
    requests.clear()
    page.reload()
    wait_live(page, "post-1")
    expect(page.locator("#who")).to_have_text("signed in as carol")
    page.locator("#post").fill(post)
    watch_button(page).click()
    wait_live(page, post)
    expect(messages(page)).to_have_count(1)
    gets = [r for r in requests if r[0] == "GET" and "/v1/comments?" in r[1]]
    assert gets and all(r[2] == f"Bearer {token}" for r in gets)

    delete_buttons(page).click()
    expect(messages(page)).to_have_count(0)
    ((_, url, authorization, _),) = [r for r in requests if r[0] == "DELETE"]
    assert authorization == f"Bearer {token}"
    assert "uid=" not in url
    assert listed(jwt_server, post, token) == []


def test_a_moderator_may_delete_every_comment_and_others_only_their_own(
    jwt_server: ServerProcess, open_viewer: OpenViewer
) -> None:
    post = "token-moderated"
    dave = mint("dave")
    api_post(jwt_server, post, "dave's", uid=None, token=dave)
    moderator = open_viewer(jwt_server, post, token=mint("mo", roles=("editor", "moderator")))
    erin = open_viewer(jwt_server, post, token=mint("erin"))
    expect(moderator.page.locator("#who")).to_have_text("signed in as mo (moderator)")
    expect(erin.page.locator("#who")).to_have_text("signed in as erin")
    post_through_form(erin.page, "erin's")
    for v in (moderator, erin):
        expect(messages(v.page)).to_have_count(2)
    daves = ids_on(erin.page)[1]
    expect(delete_buttons(moderator.page)).to_have_count(2)
    expect(delete_buttons(erin.page)).to_have_count(1)  # her own
    expect(messages(erin.page).first.get_by_role("button", name="Delete")).to_have_count(1)

    # Forced from erin's page, the server refuses; the moderator's delete goes through.
    erin.page.evaluate("(id) => deleteComment(id)", daves)
    expect(erin.page.locator("#form-error")).to_contain_text("Not deleted:")
    assert daves in ids_on(erin.page)
    messages(moderator.front()).nth(1).get_by_role("button", name="Delete").click()
    for v in (moderator, erin):
        expect(messages(v.page)).to_have_count(1)
        assert daves not in ids_on(v.page)


def test_a_refused_token_stops_reconnecting_until_a_new_one_is_given(
    jwt_server: ServerProcess, open_viewer: OpenViewer
) -> None:
    viewer = open_viewer(
        jwt_server,
        "post-1",
        token=mint("fay", expires_in=-120),
        clock_at=datetime.now(UTC),
        live=False,
    )
    page = viewer.page
    status = page.locator("#status")
    expect(status).to_have_text(SETTLED)
    assert "sign-in expired or refused" in (status.text_content() or "")
    expect(page.get_by_role("button", name="Retry now")).to_be_hidden()
    page.clock.run_for(120_000)  # two minutes of backoff: no socket is tried again
    assert len(viewer.sockets) == 1
    # The embedding site gives a new token: the page signs in with it at once.
    fresh = mint("fay")
    give_token(page, fresh)
    wait_live(page, "post-1")
    assert len(viewer.sockets) == 2
    assert viewer.sent_by_socket[-1][0] == {"type": "auth", "token": fresh}
    assert page.evaluate("location.hash") == ""


def test_a_newer_token_is_handed_to_the_open_socket_and_another_user_reconnects(
    jwt_server: ServerProcess, open_viewer: OpenViewer
) -> None:
    viewer = open_viewer(
        jwt_server, "post-1", token=mint("gus", expires_in=3600), clock_at=datetime.now(UTC)
    )
    page = viewer.page
    # A minute before it expires, with no newer token: nothing to send; the page says so.
    page.clock.fast_forward((3600 - 59) * 1000)
    expect(page.locator("#who-error")).to_contain_text("no newer token")
    assert viewer.sent_of("refresh") == []
    newer = mint("gus", expires_in=7200)
    give_token(page, newer)
    expect(page.locator("#who-error")).to_have_text("")
    assert viewer.sent_of("refresh") == [{"type": "refresh", "token": newer}]
    assert len(viewer.sockets) == 1
    expect(page.locator("#status")).to_have_text("live on post-1")
    # Someone else's token: a socket of its own.
    other = mint("hal")
    give_token(page, other)
    expect(page.locator("#who")).to_have_text("signed in as hal")
    wait_live(page, "post-1")
    assert len(viewer.sockets) == 2
    assert viewer.sent_of("auth")[-1] == {"type": "auth", "token": other}

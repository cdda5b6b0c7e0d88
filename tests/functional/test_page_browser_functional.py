"""The page at `/` in a real browser: Debian's Chromium driven by Playwright, against real servers.

Two pages on one post see each other's comments, as text; the page reconnects and catches up after a
server restart; and every error a user can meet while posting or choosing a post (a server that is
down, a proxy's HTML error page, an invalid post id, a post id edited without Watch) is said on the
page, with the typed text kept. Also the README's JavaScript example, run in the same browser.

Needs `/usr/bin/chromium` (Debian: `apt-get install chromium`; `.ci/run` installs it) and the
`playwright` package from the dev extras; never a browser downloaded by `playwright install`.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import StartServer
from tests.support.server import REPO, ServerProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Locator, Page, Route

CHROMIUM = "/usr/bin/chromium"
if shutil.which(CHROMIUM) is None:
    pytest.skip(
        f"browser test skipped: no {CHROMIUM}; install it with `apt-get install chromium`",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="browser test skipped: no playwright; `pip install -e '.[dev]'`, "
    "and `apt-get install chromium` for the browser",
)
expect = sync_api.expect

# Without the background-networking flags this machine's closed network refuses Chromium's
# connections; no GPU, no sandbox (CI runs as root).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
expect.set_options(timeout=10_000)
FAKE_EPOCH_MS = 1_800_000_000_000

NGINX_413 = (
    "<html><head><title>413 Request Entity Too Large</title></head><body>"
    "<center><h1>413 Request Entity Too Large</h1></center><hr><center>nginx</center>"
    "</body></html>"
)
NGINX_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body>"
    "<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that need no restart; each test watches a post of its own."""
    shared = ServerProcess(tmp_path_factory.mktemp("page"), name="page")
    try:
        yield shared.start()
    finally:
        try:
            shared.stop(timeout=15)
        except Exception:
            shared.kill()


OpenPage = Callable[..., "Page"]


@pytest.fixture
def open_page(browser: Browser) -> Iterator[OpenPage]:
    """Open the page of a server in a fresh browser context, watching `post` and live on it.

    `fake_clock=True` freezes the page's timers, so its reconnect backoff never fires on its own.
    Every context is closed afterwards, and no page may have thrown an uncaught error.
    """
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def open_(server: ServerProcess, post: str, fake_clock: bool = False) -> Page:
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        if fake_clock:
            page.clock.install(time=FAKE_EPOCH_MS)
        page.goto(f"{server.url}/")
        if post != "post-1":  # the page starts on post-1
            page.locator("#post").fill(post)
            watch_button(page).click()
        expect(page.locator("#status")).to_have_text(f"live on {post}")
        if fake_clock:
            # Time stops here (an hour on, nothing is pending while live): timers never fire.
            page.clock.pause_at(FAKE_EPOCH_MS + 3_600_000)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


# Located by role and name, so that the same test also runs against the page before its fixes.
def watch_button(page: Page) -> Locator:
    return page.get_by_role("button", name="Watch")


def comment_button(page: Page) -> Locator:
    return page.get_by_role("button", name="Comment")


def post_through_form(page: Page, text: str) -> None:
    page.locator("#message").fill(text)
    comment_button(page).click()


def messages(page: Page) -> Locator:
    return page.locator("#comments li")


def api_post(server: ServerProcess, post_id: str, message: str, uid: str = "api") -> dict[str, Any]:
    body = json.dumps({"post_id": post_id, "uid": uid, "message": message}).encode()
    request = urllib.request.Request(
        f"{server.url}/v1/comments", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return dict(json.loads(r.read())["comment"])


def api_list(server: ServerProcess, post_id: str) -> list[dict[str, Any]]:
    url = f"{server.url}/v1/comments?post_id={post_id}&limit=200"
    with urllib.request.urlopen(url, timeout=10) as r:
        return list(json.loads(r.read())["comments"])


def test_comment_from_one_page_appears_in_the_other_as_text(
    server: ServerProcess, open_page: OpenPage
) -> None:
    writer, reader = open_page(server, "two-pages"), open_page(server, "two-pages")
    script = "<script>window.__pwned = 1</script>"
    img = '<img src="x" onerror="window.__pwned = 2">'
    for text in (script, img, "line one\nline two"):
        post_through_form(writer, text)
        expect(writer.locator("#message")).to_have_value("")
    for page in (writer, reader):
        expect(messages(page)).to_have_count(3)
        # Newest first; what users wrote is text, never HTML.
        expect(messages(page).nth(2).locator("div").last).to_have_text(script)
        expect(messages(page).nth(1).locator("div").last).to_have_text(img)
        assert page.locator("#comments script, #comments img").count() == 0
        assert page.evaluate("window.__pwned") is None
        # 17: line breaks survive display (white-space: pre-wrap; innerText follows the CSS).
        assert messages(page).nth(0).locator("div").last.inner_text() == "line one\nline two"


def test_restart_reconnects_catches_up_and_keeps_unsent_text(
    start_server: StartServer, open_page: OpenPage
) -> None:
    server = start_server()
    # `manual` never reconnects on its own (frozen timers): only its "Retry now" button can.
    manual, auto = open_page(server, "post-1", fake_clock=True), open_page(server, "post-1")
    post_through_form(auto, "before the restart")
    expect(messages(manual)).to_have_count(1)

    server.stop()
    for page in (manual, auto):
        expect(page.locator("#status")).to_contain_text("disconnected")
    # 14: posting while the server is down says so, and keeps the text.
    post_through_form(auto, "written while it was down")
    expect(auto.locator("#form-error")).to_contain_text("could not reach the server")
    expect(auto.locator("#message")).to_have_value("written while it was down")

    server.start()  # same port, same data directory
    missed = api_post(server, "post-1", "posted before the pages came back")
    # The page with real timers reconnects by itself and catches up.
    expect(auto.locator("#status")).to_have_text("live on post-1", timeout=20_000)
    expect(auto.locator("#comments li[data-id]").first).to_have_attribute("data-id", missed["id"])
    # 17: the frozen page waits for its backoff, which "Retry now" skips.
    expect(manual.locator("#status")).to_contain_text("disconnected")
    expect(messages(manual)).to_have_count(1)
    manual.get_by_role("button", name="Retry now").click()
    expect(manual.locator("#status")).to_have_text("live on post-1")
    expect(messages(manual)).to_have_count(2)
    expect(messages(manual).first.locator("div").last).to_have_text(missed["message"])

    comment_button(auto).click()  # the kept text, sent now that the server is back
    expect(auto.locator("#message")).to_have_value("")
    expect(auto.locator("#form-error")).to_have_text("")
    for page in (manual, auto):
        expect(messages(page)).to_have_count(3)
        expect(messages(page).first.locator("div").last).to_have_text("written while it was down")
    assert len(api_list(server, "post-1")) == 3


def test_a_reload_the_server_cannot_answer_is_retried_until_it_can(
    server: ServerProcess, browser: Browser
) -> None:
    """Issue 10, mechanism 4: a catch-up that failed (a 503 while the database is down, an
    instance that died) used to be dropped, and its gap stayed. The page retries, with backoff."""
    api_post(server, "reload-retry", "there before the page came")
    refused: list[str] = []

    def refuse_twice(route: Route) -> None:
        if len(refused) < 2:
            refused.append(route.request.url)
            body = '{"error":{"code":"store_unavailable","message":"the database is down"}}'
            route.fulfill(status=503, content_type="application/json", body=body)
        else:
            route.continue_()

    context = browser.new_context()
    try:
        page = context.new_page()
        page.route("**/v1/comments?*post_id=reload-retry*", refuse_twice)
        page.goto(f"{server.url}/")
        page.locator("#post").fill("reload-retry")
        watch_button(page).click()
        expect(messages(page)).to_have_count(1, timeout=15_000)
        assert len(refused) == 2
        expect(page.locator("#status")).to_have_text("live on reload-retry")
    finally:
        context.close()


def test_proxy_error_pages_are_said_and_a_retry_is_the_same_comment(
    server: ServerProcess, open_page: OpenPage
) -> None:
    page = open_page(server, "proxied")
    sent: list[dict[str, Any]] = []

    def proxy(route: Route) -> None:
        # An nginx in front: a 413 of its own, then a 502 after the server did store the comment
        # (the answer is lost on the way back), then out of the way.
        if route.request.method != "POST":
            route.continue_()
            return
        sent.append(json.loads(route.request.post_data or "{}"))
        if len(sent) == 1:
            route.fulfill(status=413, content_type="text/html", body=NGINX_413)
        elif len(sent) == 2:
            assert route.fetch().status == 201
            route.fulfill(status=502, content_type="text/html", body=NGINX_502)
        else:
            route.continue_()

    page.route("**/v1/comments", proxy)
    post_through_form(page, "kept through errors")
    expect(page.locator("#form-error")).to_contain_text("413")
    expect(page.locator("#form-error")).to_contain_text("too large")
    expect(page.locator("#message")).to_have_value("kept through errors")
    comment_button(page).click()
    expect(page.locator("#form-error")).to_contain_text("502")
    expect(page.locator("#message")).to_have_value("kept through errors")
    comment_button(page).click()
    expect(page.locator("#message")).to_have_value("")
    expect(page.locator("#form-error")).to_have_text("")
    # 17: the retry carried the same client_msg_id, so the server gave back what it had stored.
    assert [c["message"] for c in api_list(server, "proxied")] == ["kept through errors"]
    assert sent[1]["client_msg_id"] == sent[2]["client_msg_id"]
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", sent[2]["client_msg_id"])
    # After a success the same words are a new comment, with a new client_msg_id.
    post_through_form(page, "kept through errors")
    expect(messages(page)).to_have_count(2)
    assert sent[3]["client_msg_id"] != sent[2]["client_msg_id"]
    assert len(api_list(server, "proxied")) == 2


def test_server_error_is_said_and_cleared_by_watch(
    server: ServerProcess, open_page: OpenPage
) -> None:
    page = open_page(server, "refused")
    post_through_form(page, "   ")  # passes the textarea's `required`; the server refuses it
    expect(page.locator("#form-error")).to_contain_text("message: must not be empty")
    expect(page.locator("#message")).to_have_value("   ")
    # 17: a form error does not survive Watch.
    watch_button(page).click()
    expect(page.locator("#status")).to_have_text("live on refused")
    expect(page.locator("#form-error")).to_have_text("")


def test_double_click_on_comment_stores_one_comment(
    server: ServerProcess, open_page: OpenPage
) -> None:
    page = open_page(server, "double-click")
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.locator("#message").fill("only once")
    comment_button(page).dblclick()
    expect(page.locator("#message")).to_have_value("")
    expect(comment_button(page)).to_be_enabled()
    expect(messages(page)).to_have_count(1)
    assert len(posts) == 1
    assert len(api_list(server, "double-click")) == 1


def test_invalid_post_id_is_refused_before_connecting(
    server: ServerProcess, open_page: OpenPage
) -> None:
    page = open_page(server, "valid-post")
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.locator("#post").fill("my post")
    watch_button(page).click()
    expect(page.locator("#watch-error")).to_contain_text("post id")
    expect(page.locator("#watch-error")).to_contain_text("no spaces")
    # Still live on the post it watched; no socket was tried with the bad id.
    expect(page.locator("#status")).to_have_text("live on valid-post")
    # Nor is a comment sent to it, nor with a user id the server would refuse.
    post_through_form(page, "to nowhere")
    expect(page.locator("#form-error")).to_contain_text("fix the post id")
    page.locator("#post").fill("valid-post")
    page.locator("#uid").fill("bad uid")
    comment_button(page).click()
    expect(page.locator("#form-error")).to_contain_text("user id")
    expect(page.locator("#message")).to_have_value("to nowhere")
    assert sockets == []
    assert api_list(server, "valid-post") == []


def test_edited_post_id_posts_where_the_field_says(
    server: ServerProcess, open_page: OpenPage
) -> None:
    page = open_page(server, post="post-a")
    page.locator("#post").fill("post-b")  # and no Watch
    post_through_form(page, "meant for b")
    expect(page.locator("#message")).to_have_value("")
    expect(page.locator("#status")).to_have_text("live on post-b")
    expect(messages(page)).to_have_count(1)
    assert [c["message"] for c in api_list(server, "post-b")] == ["meant for b"]
    assert api_list(server, "post-a") == []


def test_load_older_sits_below_the_list_where_it_adds(
    server: ServerProcess, open_page: OpenPage
) -> None:
    for i in range(53):
        api_post(server, "long", f"comment {i:02}")
    page = open_page(server, post="long")
    expect(messages(page)).to_have_count(50)
    older = page.get_by_role("button", name="Load older comments")
    expect(older).to_be_visible()
    button, oldest_shown = older.bounding_box(), messages(page).last.bounding_box()
    assert button is not None and oldest_shown is not None
    assert button["y"] > oldest_shown["y"], "the button must sit where older comments are added"
    older.click()
    expect(messages(page)).to_have_count(53)
    expect(messages(page).last.locator("div").last).to_have_text("comment 00")
    expect(older).to_be_hidden()


def test_favicon_is_served(server: ServerProcess, open_page: OpenPage) -> None:
    with urllib.request.urlopen(f"{server.url}/favicon.ico", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "image/svg+xml"
    page = open_page(server, "favicon")
    width = page.evaluate(
        """() => new Promise((done) => {
             const img = new Image();
             img.onload = () => done(img.naturalWidth);
             img.onerror = () => done(-1);
             img.src = "/favicon.ico";
           })"""
    )
    assert width > 0


def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Watch a post live", 1)[1]
    match = re.search(r"```js\n(.*?)```", section, re.S)
    assert match is not None, "README: no ```js example under 'Watch a post live'"
    return match.group(1)


def test_readme_example_works_and_uses_wss_on_https(
    server: ServerProcess, browser: Browser
) -> None:
    code = readme_example()
    context = browser.new_context()
    try:
        page = context.new_page()
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        # On a document of the server's origin, as a user's page behind the same host would be.
        # (Not a document made up by page.route: Chromium's local-network checks would block its
        # socket to 127.0.0.1.)
        page.goto(f"{server.url}/healthz")
        page.set_content(f'<ul id="comments"></ul><script>{code}</script>')
        api_post(server, "post-1", "hello", uid="bob")
        expect(page.locator("#comments li")).to_have_text(["bob: hello"])
        assert sockets == [f"ws://127.0.0.1:{server.port}/v1/ws?post_id=post-1"]
        # 18: on an https page the example must open wss:// (browsers block ws:// there).
        opened = page.evaluate(
            """(code) => {
                 const urls = [];
                 class FakeSocket { constructor(url) { urls.push(url); } }
                 new Function("location", "WebSocket", code)(
                   { protocol: "https:", host: "comments.example" }, FakeSocket);
                 return urls;
               }""",
            code,
        )
        assert opened == ["wss://comments.example/v1/ws?post_id=post-1"]
    finally:
        context.close()

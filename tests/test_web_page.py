"""The web chat page (CONTRACT section 8) in a real browser against a real server.

Playwright for Python drives Debian's Chromium (``/usr/bin/chromium``, installed by
``.ci/setup`` from ``.ci/apt/web.txt``; no browser is downloaded). The server runs in the
test's trio loop (``open_server``); the browser, whose sync API is bound to one thread,
runs in one worker thread per test (``trio.to_thread.run_sync``), and reaches back into
the loop with ``trio.from_thread.run`` when a test must act on the server mid-way.

Nothing waits a fixed time: every wait is Playwright's auto-waiting ``expect`` on the
page's test hooks (``form#composer``, ``textarea[name=content]``, ``#stop``,
``[data-role]`` with ``data-status``, ``.content``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio
from playwright.sync_api import Browser, Page, expect, sync_playwright

from navi_trio.auth import User, hash_token, new_token
from navi_trio.store.base import utc_now

from .helpers import Server, open_server, script

CHROMIUM = "/usr/bin/chromium"
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
#: Bounds, not sleeps: how long an expectation may take on a loaded 2-core machine.
WAIT_MS = 20_000

T = TypeVar("T")


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


async def in_browser(work: Callable[[Browser], T]) -> T:
    """Run ``work`` with a fresh browser in a worker thread while the server serves."""

    def run() -> T:
        expect.set_options(timeout=WAIT_MS)
        with chromium() as browser:
            return work(browser)

    return await trio.to_thread.run_sync(run)


def open_page(browser: Browser, url: str, errors: list[str] | None = None) -> Page:
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    if errors is not None:
        page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    expect(page.locator("form#composer textarea[name=content]")).to_be_visible()
    return page


def send(page: Page, text: str) -> None:
    box = page.locator("form#composer textarea[name=content]")
    box.fill(text)
    box.press("Enter")


def answers(page: Page) -> Any:
    return page.locator("[data-role=assistant]")


def words(n: int, delay: float = 0.0) -> tuple[str, list[dict[str, Any]]]:
    """A script of ``n`` distinct word deltas (so a lost or doubled one shows), and its text."""
    steps: list[dict[str, Any]] = []
    for i in range(n):
        steps.append({"text": f"w{i} "})
        if delay:
            steps.append({"sleep": delay})
    return "".join(f"w{i} " for i in range(n)), steps


def session_of(page: Page) -> str:
    m = re.search(r"#/s/([A-Za-z0-9_-]+)$", page.url)
    assert m, page.url
    return m[1]


# -- the page itself -----------------------------------------------------------------------


async def test_page_and_assets_are_served_from_the_package(server: Server) -> None:
    r = await server.http.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert '<form id="composer"' in html and 'name="content"' in html and 'id="stop"' in html
    for asset in re.findall(r'(?:src|href)="(/assets/[^"]+)"', html):
        a = await server.http.get(asset)
        assert a.status_code == 200, asset
    # Nothing from another host: every reference in the page is local.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html)
    js = (await server.http.get("/assets/app.js")).text
    assert not re.search(r'from\s+"(?:https?:)?//', js)
    assert (await server.http.get("/assets/nope.js")).status_code == 404
    assert (await server.http.post("/")).status_code == 405
    assert (await server.http.get("/sessions")).status_code == 200  # the API is untouched


# -- send, stream, stop --------------------------------------------------------------------


async def test_send_streams_thinking_tools_and_markdown(server: Server) -> None:
    content = script(
        {"think": "pondering the question"},
        {"tool": "calculator", "args": {"expression": "6*7"}, "result": "42", "delay": 0.3},
        {"text": "The answer is **42**"},
        {"sleep": 0.3},
        {"text": " and `code`."},
    )

    def work(browser: Browser) -> dict[str, Any]:
        errors: list[str] = []
        page = open_page(browser, server.base, errors)
        send(page, content)
        answer = answers(page).last
        expect(answer).to_have_attribute("data-status", "running")
        expect(page.locator("#stop")).to_be_visible()
        expect(answer).to_have_attribute("data-status", "complete")
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator("[data-role=user] .content")).to_have_text(content)
        out = {
            "text": answer.locator(".content").inner_text(),
            "strong": answer.locator(".content strong").inner_text(),
            "code": answer.locator(".content code").inner_text(),
            "thinking": answer.locator("details.thinking").text_content(),
            "thinking_open": answer.locator("details.thinking").evaluate("d => d.open"),
            "tool": answer.locator(".tool").text_content(),
            "sid": session_of(page),
            "sessions": page.locator("#sessions a.session").all_inner_texts(),
            "errors": errors,
        }
        page.close()
        return out

    got = await in_browser(work)
    assert got["text"] == "The answer is 42 and code."
    assert got["strong"] == "42"
    assert got["code"] == "code"
    assert "pondering the question" in got["thinking"]
    assert got["thinking_open"] is False  # collapsible, and collapsed once the answer is in
    assert "calculator" in got["tool"] and "42" in got["tool"] and "6*7" in got["tool"]
    assert got["errors"] == []
    # The session was created for the first message, titled after it, and listed.
    r = await server.http.get(f"/sessions/{got['sid']}")
    assert r.status_code == 200
    assert got["sessions"] == [r.json()["title"]]
    msgs = (await server.http.get(f"/sessions/{got['sid']}/messages")).json()
    assert [m["status"] for m in msgs if m["role"] == "assistant"] == ["complete"]
    await server.no_run_left()


async def test_stop_button_stops_the_run(server: Server) -> None:
    content = script({"text": "tick ", "repeat": 2000, "delay": 0.01})

    def work(browser: Browser) -> tuple[str, str]:
        page = open_page(browser, server.base)
        send(page, content)
        answer = answers(page).last
        expect(answer.locator(".content")).to_contain_text("tick tick")
        page.locator("#stop").click()
        expect(answer).to_have_attribute("data-status", "stopped")
        expect(page.locator("#stop")).to_be_hidden()
        expect(answer.locator(".status")).to_contain_text("Stopped")
        text = answer.locator(".content").inner_text()
        sid = session_of(page)
        page.close()
        return sid, text

    sid, text = await in_browser(work)
    msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    assert msgs[-1]["status"] == "stopped"
    assert msgs[-1]["content"].strip() == text.strip()
    assert 0 < text.count("tick") < 2000
    await server.no_run_left()


async def test_a_failed_answer_says_why(server: Server) -> None:
    def work(browser: Browser) -> str:
        page = open_page(browser, server.base)
        send(page, script({"text": "partial "}, {"error": "the model went away"}))
        answer = answers(page).last
        expect(answer).to_have_attribute("data-status", "error")
        expect(answer.locator(".status")).to_contain_text("the model went away")
        return answer.locator(".content").inner_text()

    assert (await in_browser(work)).strip() == "partial"


# -- reattach and resume -------------------------------------------------------------------


async def test_reload_mid_run_resumes_by_seq_with_nothing_lost_or_doubled(server: Server) -> None:
    expected, steps = words(150, delay=0.02)
    content = script(*steps)

    def work(browser: Browser) -> tuple[str, list[str], str]:
        page = open_page(browser, server.base)
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        send(page, content)
        answer = answers(page).last
        expect(answer.locator(".content")).to_contain_text("w20 ")
        page.reload()
        expect(answers(page).last.locator(".content")).to_contain_text("w60 ")
        page.reload()
        answer = answers(page).last
        expect(answer).to_have_attribute("data-status", "complete")
        expect(answers(page)).to_have_count(1)
        return answer.locator(".content").inner_text(), sockets, session_of(page)

    text, sockets, sid = await in_browser(work)
    assert text.split() == expected.split()
    # Both reloads resumed the run by seq rather than replaying it from the start.
    resumed = [u for u in sockets if "run_id=" in u and re.search(r"after=[1-9]", u)]
    assert len(resumed) >= 2, sockets
    msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    assert msgs[-1]["content"] == expected
    await server.no_run_left()


async def test_a_dropped_connection_reconnects_and_resumes(server: Server) -> None:
    """The server closes every socket of the session mid-run (as a restart of a proxy
    would); the page shows that it is reconnecting, comes back by seq, and the answer is
    exact."""
    expected, steps = words(120, delay=0.02)
    content = script(*steps)

    def work(browser: Browser) -> tuple[str, list[str]]:
        page = open_page(browser, server.base)
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        send(page, content)
        answer = answers(page).last
        expect(answer.locator(".content")).to_contain_text("w10 ")
        sid = session_of(page)
        trio.from_thread.run_sync(server.registry.close_followers, sid, 1011, "dropped")
        expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
        expect(answer).to_have_attribute("data-status", "complete")
        return answer.locator(".content").inner_text(), sockets

    text, sockets = await in_browser(work)
    assert text.split() == expected.split()
    assert any("run_id=" in u and re.search(r"after=[1-9]", u) for u in sockets), sockets
    await server.no_run_left()


async def test_two_tabs_follow_each_others_runs(server: Server) -> None:
    expected, steps = words(40, delay=0.01)
    content = script(*steps)

    def work(browser: Browser) -> tuple[str, str, list[str]]:
        context = browser.new_context()
        a = context.new_page()
        a.set_default_timeout(WAIT_MS)
        a.goto(server.base)
        send(a, "hello from tab A")
        expect(answers(a).last).to_have_attribute("data-status", "complete")
        b = context.new_page()
        b.set_default_timeout(WAIT_MS)
        b.goto(a.url)
        expect(answers(b)).to_have_count(1)
        send(b, content)  # started in tab B, followed live in tab A
        expect(answers(a)).to_have_count(2)
        expect(answers(a).last).to_have_attribute("data-status", "complete")
        expect(answers(b).last).to_have_attribute("data-status", "complete")
        expect(a.locator("[data-role=user]")).to_have_count(2)
        return (
            answers(a).last.locator(".content").inner_text(),
            answers(b).last.locator(".content").inner_text(),
            a.locator("[data-role=user] .content").all_inner_texts(),
        )

    in_a, in_b, users_in_a = await in_browser(work)
    assert in_a.split() == expected.split()
    assert in_b == in_a
    assert users_in_a == ["hello from tab A", content]
    await server.no_run_left()


# -- uploads and images --------------------------------------------------------------------


async def test_upload_a_file_and_name_it_in_the_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    notes = tmp_path / "notes.txt"
    notes.write_text("the secret word is pineapple\n")
    async with open_server(data_dir=data) as server:

        def work(browser: Browser) -> tuple[str, str]:
            page = open_page(browser, server.base)
            page.locator("#file-input").set_input_files(str(notes))
            expect(page.locator("#attachments .chip.file")).to_have_text(re.compile("notes.txt"))
            send(page, "what is in the file?")
            answer = answers(page).last
            expect(answer).to_have_attribute("data-status", "complete")
            expect(page.locator("#attachments .chip")).to_have_count(0)
            return session_of(page), answer.locator(".content").inner_text()

        sid, text = await in_browser(work)
        assert "notes.txt" in text  # the demo agent echoes what it was told, files included
        saved = list((data / "uploads").rglob("notes.txt"))
        assert len(saved) == 1 and sid in str(saved[0])
        assert saved[0].read_text() == "the secret word is pineapple\n"
        await server.no_run_left()


PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c"
    "63f8cfc0f01f0005000201a5b1d5a00000000049454e44ae426082"
)


async def test_images_are_sent_as_data_urls(server: Server, tmp_path: Path) -> None:
    png = tmp_path / "dot.png"
    png.write_bytes(PNG_1PX)

    def work(browser: Browser) -> tuple[str, int]:
        page = open_page(browser, server.base)
        page.locator("#image-input").set_input_files([str(png)] * 2)
        expect(page.locator("#attachments .chip.image")).to_have_count(2)
        send(page, "look at these")
        answer = answers(page).last
        expect(answer).to_have_attribute("data-status", "complete")
        expect(page.locator("#attachments .chip")).to_have_count(0)
        return answer.locator(".content").inner_text(), session_of(page)

    text, sid = await in_browser(work)
    assert "2 images attached" in text  # the server took both, as valid base64 data: URLs
    msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    assert msgs[0]["content"] == "look at these"


# -- auth ----------------------------------------------------------------------------------


async def test_token_prompt_on_401_kept_in_storage_and_again_on_revocation(tmp_path: Path) -> None:
    async with open_server(auth="required", data_dir=tmp_path) as server:
        store = server.registry.store
        token = new_token()
        await store.add_user(User("u-alice", "alice", "user", utc_now()), hash_token(token))
        assert (await server.http.get("/")).status_code == 200  # the page needs no token

        def work(browser: Browser) -> tuple[str, bool]:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(server.base)
            dialog = page.locator("#token-dialog")
            expect(dialog).to_be_visible()
            page.locator("#token-input").fill("not-a-token")
            page.locator("#token-submit").click()
            expect(dialog).to_be_visible()  # refused: asked again
            expect(page.locator("#token-reason")).to_contain_text("not accepted")
            page.locator("#token-input").fill(token)
            page.locator("#token-submit").click()
            expect(dialog).to_be_hidden()
            send(page, "hello with a token")
            expect(answers(page).last).to_have_attribute("data-status", "complete")
            page.reload()  # kept in the browser's storage: no prompt
            expect(answers(page)).to_have_count(1)
            hidden_after_reload = not dialog.is_visible()
            sid = session_of(page)
            trio.from_thread.run(store.revoke_user, "alice", utc_now())
            expect(dialog).to_be_visible()  # the socket closed with 4003: back to the prompt
            return sid, hidden_after_reload

        sid, hidden_after_reload = await in_browser(work)
        assert hidden_after_reload
        session = await store.get_session(sid)
        assert session is not None and session.user_id == "u-alice"


# -- safety --------------------------------------------------------------------------------


async def test_html_and_script_in_an_answer_are_shown_not_run(server: Server) -> None:
    evil = (
        '<img src=x onerror="window.__pwned = 1"> <script>window.__pwned = 2</script> '
        "[click](javascript:window.__pwned=3) <b>bold?</b>"
    )
    content = script({"text": evil})

    def work(browser: Browser) -> dict[str, Any]:
        errors: list[str] = []
        page = open_page(browser, server.base, errors)
        send(page, content)
        answer = answers(page).last
        expect(answer).to_have_attribute("data-status", "complete")
        page.reload()  # and again from the history
        answer = answers(page).last
        expect(answer).to_have_attribute("data-status", "complete")
        body = answer.locator(".content")
        links = body.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
        if links:
            body.locator("a").first.click()
        return {
            "pwned": page.evaluate("window.__pwned === undefined ? null : window.__pwned"),
            "elements": body.evaluate("c => [...c.querySelectorAll('*')].map(e => e.tagName)"),
            "text": body.inner_text(),
            "links": links,
            "user": page.locator("[data-role=user] .content").inner_text(),
            "errors": errors,
        }

    got = await in_browser(work)
    assert got["pwned"] is None
    assert not {"IMG", "SCRIPT", "B"} & set(got["elements"])
    assert "<script>window.__pwned = 2</script>" in got["text"]
    assert "<img src=x" in got["text"]
    assert got["links"] == []
    assert json.loads(got["user"]) == json.loads(content)
    assert got["errors"] == []


async def test_markdown_renderer_builds_only_safe_elements(server: Server) -> None:
    cases = {
        "# Title\n\nsome *em* and **strong** and `co<de>`": (
            "<h1>Title</h1><p>some <em>em</em> and <strong>strong</strong> and <code>co&lt;de&gt;</code></p>"
        ),
        "- one\n- two\n\n1. first\n2. second": (
            "<ul><li>one</li><li>two</li></ul><ol><li>first</li><li>second</li></ol>"
        ),
        "```js\nlet a = '<b>';\n```": "<pre><code data-lang=\"js\">let a = '&lt;b&gt;';</code></pre>",
        "> quoted\n\n---": "<blockquote><p>quoted</p></blockquote><hr>",
        "[ok](https://example.org/a_b) [bad](javascript:alert(1)) ![img](https://x.org/i.png)": (
            '<p><a href="https://example.org/a_b" rel="noopener noreferrer nofollow" target="_blank">ok</a> bad'
            ' <a href="https://x.org/i.png" rel="noopener noreferrer nofollow" target="_blank">img</a></p>'
        ),
        "snake_case_name and a__b__c stay": "<p>snake_case_name and a__b__c stay</p>",
        "line one\nline two": "<p>line one<br>line two</p>",
        "unclosed ```\nfence": "<p>unclosed ```<br>fence</p>",
    }

    def work(browser: Browser) -> dict[str, str]:
        page = open_page(browser, server.base)
        rendered: dict[str, str] = page.evaluate(
            """async (cases) => {
                const { renderMarkdown } = await import("/assets/markdown.js");
                const out = {};
                for (const src of cases) {
                    const div = document.createElement("div");
                    div.append(renderMarkdown(src));
                    out[src] = div.innerHTML;
                }
                return out;
            }""",
            list(cases),
        )
        return rendered

    got = await in_browser(work)
    wrong = {src: html for src, html in got.items() if html != cases[src]}
    assert not wrong, "\n".join(f"{s!r} -> {h!r}" for s, h in wrong.items())


async def test_sessions_list_new_chat_and_switching(server: Server) -> None:
    def work(browser: Browser) -> tuple[list[str], str, list[str], str]:
        page = open_page(browser, server.base)
        send(page, "first chat")
        expect(answers(page).last).to_have_attribute("data-status", "complete")
        first = page.url
        page.locator("#new-chat").click()
        expect(page.locator("[data-role]")).to_have_count(0)
        send(page, "second chat")
        expect(answers(page).last).to_have_attribute("data-status", "complete")
        expect(page.locator("#sessions a.session")).to_have_count(2)
        titles = page.locator("#sessions a.session").all_inner_texts()
        page.locator("#sessions a.session", has_text="first chat").click()
        expect(page.locator("[data-role=user] .content")).to_have_text(["first chat"])
        return titles, page.url, page.locator("#title").all_inner_texts(), first

    titles, url, header, first_url = await in_browser(work)
    assert sorted(titles) == ["first chat", "second chat"]
    assert url == first_url
    assert header == ["first chat"]


async def test_image_limits_are_kept_before_sending(server: Server, tmp_path: Path) -> None:
    png = tmp_path / "dot.png"
    png.write_bytes(PNG_1PX)

    def work(browser: Browser) -> tuple[int, str]:
        page = open_page(browser, server.base)
        page.locator("#image-input").set_input_files([str(png)] * 9)
        expect(page.locator("#notice")).to_be_visible()
        return page.locator("#attachments .chip.image").count(), page.locator("#notice").inner_text()

    count, notice = await in_browser(work)
    assert count == 8
    assert "8 images" in notice


async def test_reconnecting_is_shown_while_the_server_cannot_be_reached(server: Server) -> None:
    expected, steps = words(100, delay=0.02)
    content = script(*steps)

    def work(browser: Browser) -> str:
        page = open_page(browser, server.base)
        blocked = [False]

        def route(ws: Any) -> None:
            if blocked[0]:
                ws.close(code=1011)
            else:
                ws.connect_to_server()

        page.route_web_socket(re.compile(r".*/ws/sessions/.*"), route)
        send(page, content)
        answer = answers(page).last
        expect(answer.locator(".content")).to_contain_text("w5 ")
        blocked[0] = True
        trio.from_thread.run_sync(server.registry.close_followers, session_of(page), 1011, "dropped")
        expect(page.locator("#connection")).to_have_text("Reconnecting…")
        expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
        blocked[0] = False
        expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
        expect(answer).to_have_attribute("data-status", "complete")
        return answer.locator(".content").inner_text()

    assert (await in_browser(work)).split() == expected.split()
    await server.no_run_left()


async def test_heartbeats_keep_the_connection_and_silence_ends_it() -> None:
    """The page learns the heartbeat period (0.5 s here) and takes a connection that goes
    silent, heartbeats and all, for dead (a half-open TCP connection looks like this):
    it reconnects on its own."""
    async with open_server(heartbeat_s=0.5) as server:

        def work(browser: Browser) -> tuple[int, int, int]:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            routes: list[Any] = []
            heartbeats = [0]
            muted: set[int] = set()

            def route(ws: Any) -> None:
                index = len(routes)
                routes.append(ws)
                upstream = ws.connect_to_server()

                def to_page(message: str | bytes) -> None:
                    if index in muted:
                        return
                    if isinstance(message, str) and '"heartbeat"' in message:
                        heartbeats[0] += 1
                    ws.send(message)

                upstream.on_message(to_page)

            page.route_web_socket(re.compile(r".*/ws/sessions/.*"), route)
            page.goto(server.base)
            send(page, "hello")
            expect(answers(page).last).to_have_attribute("data-status", "complete")
            for _ in range(200):  # bounded: 12 heartbeats are 6 s, twice the shortest watchdog
                if heartbeats[0] >= 12:
                    break
                page.wait_for_timeout(100)
            kept = len(routes)
            muted.add(len(routes) - 1)  # the connection goes silent
            for _ in range(600):  # bounded: the watchdog fires after three heartbeat periods
                if len(routes) > kept:
                    break
                page.wait_for_timeout(50)
            expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
            send(page, "still here")
            expect(answers(page)).to_have_count(2)
            expect(answers(page).last).to_have_attribute("data-status", "complete")
            return heartbeats[0], kept, len(routes)

        beats, kept, total = await in_browser(work)
        assert beats >= 12
        assert kept == 1  # heartbeats kept the one connection alive
        assert total == 2  # silence: one reconnection

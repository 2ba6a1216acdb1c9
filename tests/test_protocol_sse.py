"""The SSE routes of CONTRACT section 10 at the wire: keep-alives, slow readers, the same
runs as the WebSocket (followers, DELETE, shutdown), and the contract's errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from navi_trio.protocol_routes import SseStream

from .helpers import Server, open_server, script, task_names


def chat_body(sid: str, text: str, *parts: dict[str, Any]) -> dict[str, Any]:
    return {"id": sid, "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": text}, *parts]}]}


def ag_body(thread: str, text: str) -> dict[str, Any]:
    return {"threadId": thread, "runId": "r", "messages": [{"id": "u", "role": "user", "content": text}]}


@asynccontextmanager
async def sse(server: Server, method: str, path: str, body: Any = None) -> AsyncIterator[httpx.Response]:
    async with server.http.stream(method, path, json=body) as r:
        yield r


async def read_sse(r: httpx.Response) -> tuple[list[dict[str, Any]], list[str]]:
    """Every ``data:`` object (``[DONE]`` as ``{"done": True}``) and every comment line."""
    data: list[dict[str, Any]] = []
    comments: list[str] = []
    async for line in r.aiter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            data.append({"done": True} if payload == "[DONE]" else json.loads(payload))
        elif line.startswith(":"):
            comments.append(line)
    return data, comments


@asynccontextmanager
async def raw_post(server: Server, path: str, body: bytes) -> AsyncIterator[trio.SocketStream]:
    """A POST over a raw socket the test closes when it likes (a client that goes away,
    or one the server answers before reading the whole body)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream, trio.open_nursery() as nursery:

        async def send_all() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(head + body)

        nursery.start_soon(send_all)
        yield stream
        nursery.cancel_scope.cancel()


async def read_until(stream: trio.SocketStream, marker: bytes) -> bytes:
    raw = b""
    while marker not in raw:
        chunk = await stream.receive_some()
        assert chunk, raw
        raw += chunk
    return raw


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks if c.get("type") == "text-delta")


async def test_keep_alive_comments_during_silence() -> None:
    async with open_server(heartbeat_s=0.1) as server:
        steps = script({"text": "a"}, {"sleep": 0.5}, {"text": "b"})
        async with sse(server, "POST", "/api/chat", chat_body("quiet", steps)) as r:
            assert r.status_code == 200
            assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
            assert r.headers["content-type"] == "text/event-stream"
            lines = [line async for line in r.aiter_lines() if line]
    deltas = [i for i, line in enumerate(lines) if '"text-delta"' in line]
    between = lines[deltas[0] : deltas[1]]
    assert ": keep-alive" in between
    assert lines[-1] == "data: [DONE]"


async def test_a_slow_reader_never_slows_the_run_and_gets_merged_text() -> None:
    """The reader reads nothing until the run is over and saved: the run does not wait
    for it, its outbox never holds more than its bound, and what it then reads is the
    whole answer, caught up from the run's log in fewer, merged deltas."""
    chunk, repeat = "x" * 4096, 3000  # 12 MB: more than the sockets' buffers hold
    async with open_server(script_max_chars=len(chunk) * repeat) as server:
        size = server.app.settings.outbox_size
        async with sse(server, "POST", "/api/chat", chat_body("slow", script({"text": chunk, "repeat": repeat}))) as r:
            assert r.status_code == 200
            with trio.fail_after(30):
                await server.registry.wait_idle()  # while the reader has read nothing
            assert task_names("sse-")  # the response is still open
            with trio.fail_after(30):
                data, _ = await read_sse(r)
        assert text_of(data) == chunk * repeat
        deltas = [c for c in data if c.get("type") == "text-delta"]
        assert len(deltas) < repeat
        assert data[-2:] == [{"type": "finish", "finishReason": "stop"}, {"done": True}]
        assert size >= 1
        saved = (await server.http.get("/sessions/slow/messages")).json()
        assert saved[1]["content"] == chunk * repeat


async def test_outbox_is_bounded() -> None:
    """An SseStream's outbox refuses past its bound (the run then marks it lagging)."""

    async def never(_: Any) -> None:
        raise AssertionError("not sent")

    async def nothing() -> Any:
        raise AssertionError("not received")

    class Nop:
        done = False

        def feed(self, event: Any) -> list[dict[str, Any]]:
            return []

    stream = SseStream(never, nothing, Nop(), heartbeat_s=1, outbox_size=2, end=b"")
    assert [stream.offer("x") for _ in range(3)] == [True, True, False]


async def test_the_same_runs_a_websocket_follower_sees_them(server: Server) -> None:
    sid = await server.new_session()
    async with server.connect(sid) as ws:
        assert (await ws.recv())["type"] == "session_sync"
        async with sse(server, "POST", "/api/chat", chat_body(sid, "hello you")) as r:
            data, _ = await read_sse(r)
        got = await ws.until("stream_end")
        assert got[0]["type"] == "stream_start"
        assert got[-1]["content"] == "hello you"
    assert text_of(data) == "hello you"


async def test_delete_during_a_stream_is_an_abort(server: Server) -> None:
    doomed = chat_body("doomed", script({"text": "a"}, {"sleep": 60}))
    async with sse(server, "POST", "/api/chat", doomed) as r, aclosing(r.aiter_lines()) as lines:
        async for line in lines:
            if '"text-delta"' in line:
                break
        assert (await server.http.delete("/sessions/doomed")).status_code == 204
        rest = [line async for line in lines if line.startswith("data: ")]
    assert rest[-2:] == ['data: {"type":"abort","reason":"deleted"}', "data: [DONE]"]


async def test_shutdown_during_a_stream_ends_it_and_saves_the_answer() -> None:
    async with open_server(grace_s=0.2) as server:
        late = ag_body("late", script({"text": "part"}, {"sleep": 60}))
        async with sse(server, "POST", "/ag-ui", late) as r, aclosing(r.aiter_lines()) as lines:
            async for line in lines:
                if "TEXT_MESSAGE_CONTENT" in line:
                    break
            server.shutdown()
            rest = [json.loads(line[6:]) async for line in lines if line.startswith("data: ")]
        assert rest[-1]["type"] == "RUN_FINISHED"
        assert rest[-1]["outcome"] == {"type": "cancelled"}
        assert rest[-1]["rawEvent"]["reason"] == "shutdown"
        saved = await server.registry.store.list_messages("late")
        assert (saved[1].status, saved[1].content) == ("interrupted", "part")


async def test_a_client_that_leaves_leaves_no_task_and_the_run_goes_on(server: Server) -> None:
    left = chat_body("left", script({"text": "a"}, {"sleep": 0.3}, {"text": "b"}))
    async with raw_post(server, "/api/chat", json.dumps(left).encode()) as stream:
        with trio.fail_after(10):
            await read_until(stream, b'"text-delta"')
        assert server.registry.runs
    # The client closed its socket before the run ended.
    with trio.fail_after(10):
        await server.registry.wait_idle()  # 0.3 s after the client left: its stream is gone
    assert task_names("sse-") == []
    saved = (await server.http.get("/sessions/left/messages")).json()
    assert (saved[1]["status"], saved[1]["content"]) == ("complete", "ab")


async def test_resume(server: Server) -> None:
    assert (await server.http.get("/api/chat/nosuch/stream")).status_code == 404
    sid = await server.new_session()
    r = await server.http.get(f"/api/chat/{sid}/stream")
    assert (r.status_code, r.content) == (204, b"")
    steps = script({"text": "a"}, {"sleep": 0.2}, {"text": "b"})
    async with sse(server, "POST", "/api/chat", chat_body(sid, steps)) as r1, aclosing(r1.aiter_lines()) as lines:
        async for line in lines:
            if '"text-delta"' in line:
                break
        async with sse(server, "GET", f"/api/chat/{sid}/stream") as r2:
            assert r2.headers["x-vercel-ai-ui-message-stream"] == "v1"
            resumed, _ = await read_sse(r2)
        [_ async for _ in lines]
    assert resumed[0]["type"] == "start"
    assert text_of(resumed) == "ab"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "detail"),
    [
        ("GET", "/api/chat", None, 405, "Method Not Allowed"),
        ("POST", "/api/chat/x/stream", None, 405, "Method Not Allowed"),
        ("GET", "/ag-ui", None, 405, "Method Not Allowed"),
        ("POST", "/api/chat", b"{", 400, "Invalid JSON"),
        ("POST", "/ag-ui", b"[]", 422, "RunAgentInput"),
        ("POST", "/api/chat", {"id": "c", "messages": []}, 422, "non-empty"),
        ("POST", "/api/chat", chat_body("c", ""), 422, "Expected {type: 'message', content: '...'}"),
        (
            "POST",
            "/api/chat",
            chat_body("c", "x", *[{"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,aGk="}] * 9),
            422,
            "Too many images (9). Max 8 allowed.",
        ),
        (
            "POST",
            "/api/chat",
            chat_body("c", "x", {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,@@"}),
            422,
            "Image 1 is not valid base64.",
        ),
        (
            "POST",
            "/api/chat",
            chat_body("c", "x", {"type": "file", "mediaType": "text/plain", "filename": "..", "url": "data:,x"}),
            422,
            "not a base64 data: URL",
        ),
        (
            "POST",
            "/ag-ui",
            ag_body("c", "y" * 100_001),
            422,
            "Message too long (100001 characters). Max 100000 allowed.",
        ),
        ("POST", "/ag-ui", ag_body("c", script({"text": "x", "repeat": 10**9})), 422, "NAVI_SCRIPT_MAX_EVENTS"),
    ],
)
async def test_errors(server: Server, method: str, path: str, body: Any, status: int, detail: str) -> None:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    r = await server.http.request(method, path, content=content)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"]
    assert server.registry.runs == []


async def test_a_body_over_the_limit_is_413() -> None:
    async with open_server(max_upload_mb=0.001, max_message_chars=10) as server:
        big = b'{"id": "c", "messages": [' + b" " * (60 * 1024 * 1024) + b"]}"
        async with raw_post(server, "/api/chat", big) as stream:
            with trio.fail_after(10):
                raw = await read_until(stream, b"}")
        assert raw.startswith(b"HTTP/1.1 413")
        assert b"Request body too large (max 51 MB)" in raw
        assert server.registry.runs == []


async def test_an_attachment_over_the_upload_limit_is_413() -> None:
    async with open_server(max_upload_mb=0.001) as server:
        blob = "data:text/plain;base64," + "QUFB" * 1000  # 3000 bytes > 1048 bytes
        part = {"type": "file", "mediaType": "text/plain", "filename": "big.txt", "url": blob}
        r = await server.http.post("/api/chat", json=chat_body("c", "x", part))
        assert r.status_code == 413
        assert r.json()["detail"] == "Upload too large (max 0.001 MB)"


async def test_two_first_requests_for_one_new_id_make_one_session(tmp_path: Path) -> None:
    """Both find no session and both create it: the database refuses the second, which
    then finds the first one's session and is refused with 409 while its run is active."""
    async with open_server(store="sqlite", data_dir=tmp_path) as server:
        await _two_first_requests(server)


async def _two_first_requests(server: Server) -> None:
    statuses: list[int] = []

    async def post(text: str) -> None:
        async with sse(server, "POST", "/api/chat", chat_body("twin", text)) as r:
            statuses.append(r.status_code)
            if r.status_code == 200:
                async for line in r.aiter_lines():
                    if '"text-delta"' in line:
                        await server.http.post("/sessions/twin/stop")
            else:
                await r.aread()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, script({"text": "one"}, {"sleep": 60}))
            nursery.start_soon(post, script({"text": "two"}, {"sleep": 60}))
    assert sorted(statuses) == [200, 409]
    sessions = [s for s in (await server.http.get("/sessions")).json() if s["id"] == "twin"]
    assert len(sessions) == 1
    saved = (await server.http.get("/sessions/twin/messages")).json()
    assert [m["role"] for m in saved] == ["user", "assistant"]
    assert saved[1]["status"] == "stopped"

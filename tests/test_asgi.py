"""The ASGI app without a real server (STYLE 4.2, layers 2 and 3).

Layer 2, ASGI-direct: ``NaviApp`` is called with memory channels standing in for
``receive`` and ``send``: the lifespan task, HTTP scopes and WebSocket scopes, exactly as
a server would call them, and nothing else.

Layer 3, in-memory protocol: hypercorn's own ``Lifespan`` and ``TCPServer`` (hypercorn
0.18 internals, hence the pin) over ``trio.testing.memory_stream_pair``, with
trio-websocket and h11 as the clients, all in one trio run under ``autojump_clock``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from trio_websocket import ConnectionClosed, wrap_client_stream

from navi_trio.app import STATE_KEY, NaviApp
from navi_trio.events import TERMINAL_TYPES
from navi_trio.runs import RunRegistry
from navi_trio.settings import Settings

from .helpers import Client, assert_grammar, message, run_events, script, text_of

ASGI = {"version": "3.0", "spec_version": "2.3"}


def make_app(**overrides: Any) -> NaviApp:
    values: dict[str, Any] = {"store": "memory", "port": 0, **overrides}
    return NaviApp(Settings.from_env({}, **values))


def registry_of(app: NaviApp) -> RunRegistry:
    assert app.services is not None
    return app.services.registry


def wire(event: Any) -> dict[str, Any]:
    """A run-log ``Event`` as the client would see it."""
    decoded: dict[str, Any] = json.loads(event.wire)
    return decoded


# =====================================================================================
# Layer 2: ASGI-direct
# =====================================================================================


class AsgiServer:
    """The app's lifespan task, driven over memory channels; HTTP and WebSocket scopes."""

    def __init__(self, app: NaviApp, nursery: trio.Nursery) -> None:
        self.app = app
        self.nursery = nursery
        self.state: dict[str, Any] = {}
        self._to_app, self._to_app_recv = trio.open_memory_channel[dict[str, Any]](1)
        self._from_app_send, self._from_app = trio.open_memory_channel[dict[str, Any]](1)
        self.shut_down = False

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI, "state": self.state}
        self.nursery.start_soon(self.app, scope, self._to_app_recv.receive, self._from_app_send.send)
        await self._to_app.send({"type": "lifespan.startup"})
        assert (await self._from_app.receive())["type"] == "lifespan.startup.complete"
        assert STATE_KEY in self.state

    async def shutdown(self) -> None:
        self.shut_down = True
        await self._to_app.send({"type": "lifespan.shutdown"})
        assert (await self._from_app.receive())["type"] == "lifespan.shutdown.complete"

    @property
    def registry(self) -> RunRegistry:
        return registry_of(self.app)

    async def http(self, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
        scope = {
            "type": "http",
            "asgi": ASGI,
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": dict(self.state),
        }
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        await self.app(scope, receive, send)
        assert sent[0]["type"] == "http.response.start"
        payload = b"".join(m.get("body", b"") for m in sent[1:])
        return sent[0]["status"], json.loads(payload) if payload else None

    async def new_session(self) -> str:
        status, body = await self.http("POST", "/sessions", b"{}")
        assert status == 201, body
        sid: str = body["id"]
        return sid


@asynccontextmanager
async def asgi_server(app: NaviApp) -> AsyncIterator[AsgiServer]:
    """Lifespan startup on entry; lifespan shutdown on exit (unless the test did it)."""
    async with trio.open_nursery() as nursery:
        server = AsgiServer(app, nursery)
        await server.startup()
        try:
            yield server
        except BaseException:
            nursery.cancel_scope.cancel()
            raise
        if not server.shut_down:
            await server.shutdown()


class AsgiWs:
    """One WebSocket scope driven directly (the prototype's helper, for ``NaviApp``)."""

    def __init__(self, nursery: trio.Nursery, server: AsgiServer, path: str, query: bytes = b"") -> None:
        self._to_app, to_app_recv = trio.open_memory_channel[dict[str, Any]](0)
        from_app_send, self._from_app = trio.open_memory_channel[dict[str, Any]](1000)
        scope = {
            "type": "websocket",
            "asgi": ASGI,
            "http_version": "1.1",
            "scheme": "ws",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 50001),
            "server": ("127.0.0.1", 8000),
            "subprotocols": [],
            "state": dict(server.state),
        }
        self.received: list[dict[str, Any]] = []
        nursery.start_soon(server.app, scope, to_app_recv.receive, from_app_send.send)

    async def connect(self) -> None:
        await self._to_app.send({"type": "websocket.connect"})
        assert (await self._from_app.receive())["type"] == "websocket.accept"

    async def send_text(self, text: str) -> None:
        await self._to_app.send({"type": "websocket.receive", "text": text})

    async def send_message(self, content: str, **extra: Any) -> None:
        await self.send_text(message(content, **extra))

    async def next(self) -> dict[str, Any]:
        """The next ASGI message from the app (``websocket.send`` or ``websocket.close``)."""
        return await self._from_app.receive()

    async def receive_json(self) -> dict[str, Any]:
        msg = await self._from_app.receive()
        assert msg["type"] == "websocket.send", msg
        event: dict[str, Any] = json.loads(msg["text"])
        self.received.append(event)
        return event

    async def until(self, *types: str) -> list[dict[str, Any]]:
        got = [await self.receive_json()]
        while got[-1]["type"] not in types:
            got.append(await self.receive_json())
        return got

    async def until_terminal(self) -> list[dict[str, Any]]:
        return await self.until(*TERMINAL_TYPES)

    async def receive_close(self) -> int:
        """Skip frames up to the app's ``websocket.close``; return its code."""
        while True:
            msg = await self._from_app.receive()
            if msg["type"] == "websocket.close":
                code: int = msg["code"]
                return code
            assert msg["type"] == "websocket.send", msg
            self.received.append(json.loads(msg["text"]))

    async def disconnect(self, code: int = 1000) -> None:
        await self._to_app.send({"type": "websocket.disconnect", "code": code})


async def test_http_scope_routes() -> None:
    with trio.fail_after(10):
        async with asgi_server(make_app()) as server:
            assert await server.http("GET", "/healthz") == (200, {"status": "ok"})
            status, created = await server.http("POST", "/sessions", b'{"title": "Hello"}')
            assert status == 201
            assert created["title"] == "Hello"
            assert created["user_id"] is None
            status, got = await server.http("GET", f"/sessions/{created['id']}")
            assert (status, got) == (200, {**created, "running": False})
            assert await server.http("GET", f"/sessions/{created['id']}/messages") == (200, [])
            assert await server.http("GET", "/sessions/nope/messages") == (404, {"detail": "Session not found"})
            # The session really is in the store the lifespan opened.
            assert await server.registry.store.get_session(created["id"]) is not None


async def test_ws_unknown_session_closes_4004() -> None:
    with trio.fail_after(10):
        async with asgi_server(make_app()) as server, trio.open_nursery() as conns:
            ws = AsgiWs(conns, server, "/ws/sessions/nope")
            await ws.connect()
            assert await ws.receive_close() == 4004
            assert ws.received == []
            await trio.testing.wait_all_tasks_blocked()
            assert not conns.child_tasks


async def test_ws_session_sync_then_scripted_run(autojump_clock: trio.testing.MockClock) -> None:
    steps: list[dict[str, Any]] = [
        {"think": "a b"},
        {"text": "x", "repeat": 3, "delay": 1},
        {"tool": "calc", "args": {"e": 1}, "result": "2"},
        {"compress": True},
        {"text": "done"},
    ]
    with trio.fail_after(60):
        async with asgi_server(make_app()) as server, trio.open_nursery() as conns:
            sid = await server.new_session()
            ws = AsgiWs(conns, server, f"/ws/sessions/{sid}")
            await ws.connect()
            assert await ws.receive_json() == {"type": "session_sync"}
            await ws.send_message(script(*steps))
            start = await ws.receive_json()
            t0 = trio.current_time()
            assert start["type"] == "stream_start"
            assert start["seq"] == 1
            run = server.registry.active(sid)
            assert run is not None
            assert start["run_id"] == run.id
            assert (await server.http("GET", f"/sessions/{sid}"))[1]["running"] is True
            got = [start]
            times = []
            while got[-1]["type"] not in TERMINAL_TYPES:
                got.append(await ws.receive_json())
                if got[-1]["type"] == "stream_delta":
                    times.append(trio.current_time() - t0)
            assert [e["type"] for e in got] == [
                "stream_start",
                "thinking_delta",
                "thinking_delta",
                "thinking_end",
                "stream_delta",
                "stream_delta",
                "stream_delta",
                "tool_started",
                "tool_call",
                "context_compressed",
                "stream_delta",
                "stream_end",
            ]
            assert_grammar(got, merged=False)
            assert times == [0.0, 1.0, 2.0, 2.0]  # delta pacing, exact in virtual time
            assert got[-1]["content"] == "xxxdone" == text_of(got)
            assert got[8] == {
                "type": "tool_call",
                "seq": 9,
                "tool": "calc",
                "args": {"e": 1},
                "result": "2",
                "success": True,
                "is_subagent": False,
            }
            await run.done.wait()
            status, msgs = await server.http("GET", f"/sessions/{sid}/messages")
            assert status == 200
            assert [(m["role"], m["status"]) for m in msgs] == [("user", "complete"), ("assistant", "complete")]
            assert msgs[0]["content"] == script(*steps)
            assert msgs[1]["content"] == "xxxdone"
            assert msgs[1]["thinking"] == "a b"
            assert msgs[1]["tool_calls"] == [{"tool": "calc", "args": {"e": 1}, "result": "2", "success": True}]
            assert (await server.http("GET", f"/sessions/{sid}"))[1]["running"] is False
            await ws.disconnect()


async def test_ws_bad_messages_answer_errors_and_stay_usable(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with asgi_server(make_app()) as server, trio.open_nursery() as conns:
            sid = await server.new_session()
            ws = AsgiWs(conns, server, f"/ws/sessions/{sid}")
            await ws.connect()
            assert (await ws.receive_json())["type"] == "session_sync"
            await ws.send_text("not json")
            assert await ws.receive_json() == {"type": "error", "message": "Invalid JSON"}
            await ws.send_text(json.dumps({"type": "message", "content": ""}))
            assert await ws.receive_json() == {"type": "error", "message": "Expected {type: 'message', content: '...'}"}
            await ws.send_message(script({"text": "a", "repeat": 3, "delay": 1}))
            assert (await ws.receive_json())["type"] == "stream_start"
            await ws.send_message("second")
            got = await ws.until("error")
            assert got[-1] == {"type": "error", "message": "Agent is already running for this session."}
            got = await ws.until_terminal()
            assert got[-1]["type"] == "stream_end"
            assert got[-1]["content"] == "aaa"
            await ws.disconnect()


async def test_ws_disconnect_mid_run_leaves_no_connection_task(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with asgi_server(make_app()) as server:
            sid = await server.new_session()
            async with trio.open_nursery() as conns:
                ws = AsgiWs(conns, server, f"/ws/sessions/{sid}")
                await ws.connect()
                assert (await ws.receive_json())["type"] == "session_sync"
                await ws.send_message(script({"text": "w ", "repeat": 5, "delay": 1}))
                assert (await ws.receive_json())["type"] == "stream_start"
                t0 = trio.current_time()
                assert (await ws.receive_json())["type"] == "stream_delta"
                run = server.registry.active(sid)
                assert run is not None
                assert len(conns.child_tasks) == 1  # the connection is up
                assert server.registry.local.follower_count == 1
                assert len(run.subscribers) == 1
                await ws.disconnect()
                await trio.testing.wait_all_tasks_blocked()
                # The connection's app call and every task it had are gone ...
                assert len(conns.child_tasks) == 0
                assert server.registry.local.follower_count == 0
                assert run.subscribers == []
                # ... while the run goes on (a disconnect is never a stop).
                assert server.registry.active(sid) is run
                assert not run.log.finished
            await run.done.wait()
            assert trio.current_time() - t0 == 4.0
            assert run.log.terminal is not None
            assert wire(run.log.terminal) == {"type": "stream_end", "seq": 7, "content": "w " * 5}
            assert server.registry.active(sid) is None
            _, msgs = await server.http("GET", f"/sessions/{sid}/messages")
            assert (msgs[1]["status"], msgs[1]["content"]) == ("complete", "w " * 5)


async def start_run(server: AsgiServer, nursery: trio.Nursery, sid: str, content: str) -> AsgiWs:
    ws = AsgiWs(nursery, server, f"/ws/sessions/{sid}")
    await ws.connect()
    assert (await ws.receive_json())["type"] == "session_sync"
    await ws.send_message(content)
    assert (await ws.receive_json())["type"] == "stream_start"
    return ws


async def test_lifespan_shutdown_ends_every_run(autojump_clock: trio.testing.MockClock) -> None:
    """``lifespan.shutdown`` (after hypercorn has ended the connections): runs get the
    grace period, then each stops with ``shutdown``, its partial answer saved."""
    with trio.fail_after(120):
        app = make_app(grace_s=2.5)
        async with asgi_server(app) as server, trio.open_nursery() as conns:
            long_text = await server.new_session()
            long_tool = await server.new_session()
            short = await server.new_session()
            watcher = await start_run(server, conns, long_text, script({"text": "a", "repeat": 100, "delay": 1}))
            ws2 = await start_run(server, conns, long_tool, script({"text": "b"}, {"tool": "t", "delay": 60}))
            ws3 = await start_run(server, conns, short, script({"text": "c", "repeat": 2, "delay": 1}))
            await ws2.disconnect()
            await ws3.disconnect()
            runs = {sid: server.registry.active(sid) for sid in (long_text, long_tool, short)}
            assert all(runs.values())
            t0 = trio.current_time()
            await server.shutdown()
            assert trio.current_time() - t0 == 2.5  # exactly the grace period
            assert server.registry.runs == []
            assert server.registry.closed.is_set()
            for run in runs.values():
                assert run is not None
                assert run.done.is_set()
                assert run.log.terminal is not None
                assert_grammar([wire(e) for e in run.log.events], merged=False)
            term = {sid: wire(run.log.terminal) for sid, run in runs.items() if run and run.log.terminal}
            assert term[short] == {"type": "stream_end", "seq": 4, "content": "cc"}
            assert term[long_text]["type"] == "stream_stopped"
            assert term[long_text]["reason"] == "shutdown"
            assert term[long_text]["content"] == "a" * 3
            assert term[long_tool] == {"type": "stream_stopped", "seq": 5, "content": "b", "reason": "shutdown"}
            tool_call = runs[long_tool].log.events[-2]  # type: ignore[union-attr]
            assert wire(tool_call)["result"] == "cancelled"
            assert wire(tool_call)["success"] is False
            # The client still connected saw the terminal event.
            got = await watcher.until_terminal()
            assert got[-1] == term[long_text]
            assert_grammar([{"type": "stream_start", "seq": 1}, *got], merged=False)
            await watcher.disconnect()
            store = server.registry.store
            saved = {sid: (await store.list_messages(sid))[-1] for sid in runs}
            assert (saved[short].status, saved[short].content) == ("complete", "cc")
            assert (saved[long_text].status, saved[long_text].content) == ("interrupted", "aaa")
            assert (saved[long_tool].status, saved[long_tool].content) == ("interrupted", "b")
            assert saved[long_tool].tool_calls == [{"tool": "t", "args": {}, "result": "cancelled", "success": False}]


class FirstStep(trio.abc.Instrument):
    """Calls ``check`` once, right after the first step of the task named ``name``."""

    def __init__(self, name: str, check: Any) -> None:
        self.name = name
        self.check = check
        self.seen: list[Any] = []

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == self.name and not self.seen:
            self.seen.append(self.check())


async def test_http_stop_cancels_the_run_before_its_first_checkpoint(autojump_clock: trio.testing.MockClock) -> None:
    """Under load a scheduler pass waits for a round of every busy connection, so the stop
    route cancels the run in the request's first step: the session comes from the store's
    cache, with no checkpoint before ``scope.cancel()``."""
    with trio.fail_after(60):
        async with asgi_server(make_app()) as server, trio.open_nursery() as conns:
            sid = await server.new_session()
            ws = await start_run(server, conns, sid, script({"tool": "t", "delay": 30}))
            run = server.registry.active(sid)
            assert run is not None
            probe = FirstStep("stop-request", lambda: run.cancel_scope.cancel_called)
            trio.lowlevel.add_instrument(probe)
            try:
                conns.start_soon(server.http, "POST", f"/sessions/{sid}/stop", name="stop-request")
                await run.done.wait()
            finally:
                trio.lowlevel.remove_instrument(probe)
            assert probe.seen == [True]
            assert wire(run.log.terminal)["type"] == "stream_stopped"
            await ws.disconnect()


async def test_begin_shutdown_drains_then_closes_1012(autojump_clock: trio.testing.MockClock) -> None:
    """The shutdown trigger's notice: events flow during the grace, then ``shutdown``,
    then close code 1012; no new run starts meanwhile."""
    with trio.fail_after(120):
        app = make_app(grace_s=2.5)
        async with asgi_server(app) as server, trio.open_nursery() as conns:
            sid = await server.new_session()
            other = await server.new_session()
            ws = await start_run(server, conns, sid, script({"text": "t", "repeat": 100, "delay": 1}))
            idle = AsgiWs(conns, server, f"/ws/sessions/{other}")
            await idle.connect()
            assert (await idle.receive_json())["type"] == "session_sync"
            assert (await ws.receive_json())["type"] == "stream_delta"
            t0 = trio.current_time()
            app.begin_shutdown()
            await server.registry.closing.wait()  # the drain task has begun
            await idle.send_message("hello")
            assert (await idle.receive_json())["message"] == "The server is shutting down; try again shortly."
            got = await ws.until_terminal()
            assert trio.current_time() - t0 == 2.5
            assert [e["type"] for e in got] == ["stream_delta"] * 2 + ["stream_stopped"]
            assert got[-1]["reason"] == "shutdown"
            assert got[-1]["content"] == "t" * 3
            assert await ws.receive_close() == 1012
            assert await idle.receive_close() == 1012
            assert ws.received[-1] == got[-1]  # nothing of the run after its terminal event
            # A connection arriving during the drain is closed with 1012 too.
            late = AsgiWs(conns, server, f"/ws/sessions/{other}")
            await late.connect()
            assert await late.receive_close() == 1012
            await trio.testing.wait_all_tasks_blocked()
            assert not conns.child_tasks  # every connection task ended by itself
            _, msgs = await server.http("GET", f"/sessions/{sid}/messages")
            assert (msgs[-1]["status"], msgs[-1]["content"]) == ("interrupted", "ttt")
            _, msgs = await server.http("GET", f"/sessions/{other}/messages")
            assert msgs == []  # the refused message started nothing
            t1 = trio.current_time()
            await server.shutdown()
            assert trio.current_time() == t1  # runs already drained: no second grace


# =====================================================================================
# Layer 3: hypercorn's Lifespan and TCPServer over in-memory streams
# =====================================================================================


class MockSocket:
    """What TCPServer asks of its stream's socket (hypercorn's tests do the same)."""

    family = socket.AF_INET

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 8000)

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 50000)


class InMemoryServer:
    def __init__(self, app: NaviApp, nursery: trio.Nursery, config: Config, state: dict[str, Any]) -> None:
        self.app = app
        self.nursery = nursery
        self.config = config
        self.state = state
        self.context = WorkerContext(None)

    @property
    def registry(self) -> RunRegistry:
        return registry_of(self.app)

    def connect(self) -> trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        server_stream.socket = MockSocket()  # type: ignore[attr-defined]
        server = TCPServer(
            ASGIWrapper(self.app),  # type: ignore[arg-type]
            self.config,
            self.context,
            ConnectionState(self.state.copy()),
            server_stream,  # type: ignore[arg-type]
        )
        self.nursery.start_soon(server.run)
        return client_stream

    async def http(self, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
        """One HTTP/1.1 request over a fresh in-memory connection (h11 as the client)."""
        stream = self.connect()
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            headers = [("Host", "localhost"), ("Content-Length", str(len(body))), ("Connection", "close")]
            data = conn.send(h11.Request(method=method, target=path, headers=headers))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            status = 0
            chunks: list[bytes] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some()))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
        payload = b"".join(chunks)
        return status, json.loads(payload) if payload else None

    @asynccontextmanager
    async def ws(self, path: str) -> AsyncIterator[Client]:
        """A trio-websocket client over an in-memory stream the test owns."""
        stream = self.connect()
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "localhost", path)
            try:
                yield Client(ws)
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()


@asynccontextmanager
async def inmemory_server(app: NaviApp) -> AsyncIterator[InMemoryServer]:
    """hypercorn's Lifespan around our app; connections in their own nursery. On exit:
    connections are cancelled (as past hypercorn's graceful timeout), then
    ``lifespan.shutdown``, as hypercorn's ``worker_serve`` orders it."""
    config = Config()
    config.accesslog = None
    state: dict[str, Any] = {}
    lifespan = Lifespan(ASGIWrapper(app), config, state)  # type: ignore[arg-type]
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        assert lifespan.supported, "the app's lifespan failed"
        assert STATE_KEY in state
        async with trio.open_nursery() as conn_nursery:
            yield InMemoryServer(app, conn_nursery, config, state)
            conn_nursery.cancel_scope.cancel()
        await lifespan.wait_for_shutdown()
        assert lifespan.supported, "the app's lifespan failed at shutdown"
        lifespan_nursery.cancel_scope.cancel()


async def test_inmemory_http_session_sync_and_run(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with inmemory_server(make_app()) as server:
            assert await server.http("GET", "/healthz") == (200, {"status": "ok"})
            status, created = await server.http("POST", "/sessions", b"{}")
            assert status == 201
            sid = created["id"]
            async with server.ws(f"/ws/sessions/{sid}") as c:
                assert await c.recv() == {"type": "session_sync"}
                await c.send_message(script({"think": "hm"}, {"text": "ab ", "repeat": 3, "delay": 0.5}))
                got = await c.until_terminal()
            assert_grammar(got, merged=False)
            assert [e["type"] for e in got] == ["stream_start", "thinking_delta", "thinking_end"] + [
                "stream_delta"
            ] * 3 + ["stream_end"]
            assert got[-1]["content"] == "ab ab ab "
            status, msgs = await server.http("GET", f"/sessions/{sid}/messages")
            assert status == 200
            assert [(m["role"], m["status"], m["content"]) for m in msgs][1] == ("assistant", "complete", "ab ab ab ")
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.nursery.child_tasks) == 0  # every TCPServer task ended


async def test_inmemory_disconnect_mid_run(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with inmemory_server(make_app()) as server:
            session = await server.registry.store.create_session("s1", "t", None)
            stream = server.connect()
            async with stream, trio.open_nursery() as client:
                ws = await wrap_client_stream(client, stream, "localhost", f"/ws/sessions/{session.id}")
                assert json.loads(await ws.get_message()) == {"type": "session_sync"}
                await ws.send_message(message(script({"text": "x", "repeat": 10, "delay": 1})))
                assert json.loads(await ws.get_message())["type"] == "stream_start"
                assert json.loads(await ws.get_message())["type"] == "stream_delta"
                assert len(server.nursery.child_tasks) == 1
                client.cancel_scope.cancel()  # abrupt: no close handshake
            # The TCP stream is gone too (closed by ``async with stream``).
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.nursery.child_tasks) == 0  # no connection task left
            run = server.registry.active("s1")
            assert run is not None
            assert not run.log.finished
            assert run.subscribers == []
            assert server.registry.local.follower_count == 0
            await run.done.wait()
            assert run.log.terminal is not None
            assert wire(run.log.terminal) == {"type": "stream_end", "seq": 12, "content": "x" * 10}
            msgs = await server.registry.store.list_messages("s1")
            assert (msgs[-1].status, msgs[-1].content) == ("complete", "x" * 10)


async def test_inmemory_drain_then_1012(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        app = make_app(grace_s=2.5)
        async with inmemory_server(app) as server:
            await server.registry.store.create_session("s1", "t", None)
            async with server.ws("/ws/sessions/s1") as c:
                assert (await c.recv())["type"] == "session_sync"
                await c.send_message(script({"text": "y", "repeat": 50, "delay": 1}))
                assert (await c.recv())["type"] == "stream_start"
                t0 = trio.current_time()
                app.begin_shutdown()
                got = await c.until_terminal()
                assert trio.current_time() - t0 == 2.5
                assert got[-1]["type"] == "stream_stopped"
                assert got[-1]["reason"] == "shutdown"
                assert got[-1]["content"] == "yyy"
                with pytest.raises(ConnectionClosed) as closed:
                    await c.recv()
                assert closed.value.reason.code == 1012
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.nursery.child_tasks) == 0
            msgs = await server.registry.store.list_messages("s1")
            assert (msgs[-1].status, msgs[-1].content) == ("interrupted", "yyy")


async def test_inmemory_lifespan_shutdown_ends_runs(autojump_clock: trio.testing.MockClock) -> None:
    """hypercorn's own order: connections end first (a connection still open past the
    graceful timeout is cancelled, and must still get close code 1012), then
    ``lifespan.shutdown`` gives the runs their grace and stops the rest with a terminal
    event and an ``interrupted`` answer."""
    with trio.fail_after(120):
        app = make_app(grace_s=1.5)
        async with trio.open_nursery() as client_nursery:
            async with inmemory_server(app) as server:
                for sid in ("s1", "s2"):
                    await server.registry.store.create_session(sid, "t", None)
                    async with server.ws(f"/ws/sessions/{sid}") as c:
                        assert (await c.recv())["type"] == "session_sync"
                        await c.send_message(script({"text": sid, "repeat": 100, "delay": 1}))
                        assert (await c.recv())["type"] == "stream_start"
                # One more client is still connected when the server goes away.
                stream = server.connect()
                still = Client(await wrap_client_stream(client_nursery, stream, "localhost", "/ws/sessions/s1"))
                assert (await still.recv())["type"] == "stream_start"
                runs = list(server.registry.runs)
                assert len(runs) == 2
                t0 = trio.current_time()
            registry = registry_of(app)
            assert trio.current_time() - t0 == 1.5
            assert registry.runs == []
            close_code = await still.until_closed()
            await stream.aclose()
        for run in runs:
            assert run.done.is_set()
            assert run.log.terminal is not None
            assert_grammar([wire(e) for e in run.log.events], merged=False)
            end = wire(run.log.terminal)
            assert (end["type"], end["reason"]) == ("stream_stopped", "shutdown")
            saved = (await registry.store.list_messages(run.session_id))[-1]
            assert saved.status == "interrupted"
            assert saved.content == end["content"] == text_of(run_events([wire(e) for e in run.log.events]))
            assert saved.content.startswith(run.session_id)
        # The connection hypercorn cancelled (past its graceful timeout) was closed with
        # 1012 "Server restarting" (CONTRACT 7), not dropped (1006).
        assert close_code == 1012

"""Test helpers: a real in-process hypercorn server and real clients.

The server is ``hypercorn.trio.serve`` on 127.0.0.1:0 running our app, in the test's
own trio run (so ``autojump_clock`` works, STYLE 4.5). Clients are trio-websocket over a
TCP stream the test owns (trio-websocket leaks its socket when the server closes first,
STYLE 1.2) and httpx.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio
from hypercorn.trio import serve
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from navi_trio.app import NaviApp
from navi_trio.events import TERMINAL_TYPES, check_grammar
from navi_trio.runs import RunRegistry
from navi_trio.server import hypercorn_config
from navi_trio.settings import Settings


def script(*steps: dict[str, Any]) -> str:
    """Message content that makes the scripted agent play ``steps``."""
    return json.dumps({"script": list(steps)})


def message(content: str, **extra: Any) -> str:
    return json.dumps({"type": "message", "content": content, **extra})


def all_tasks() -> list[trio.lowlevel.Task]:
    """Every task of this trio run (STYLE 4.4)."""
    out: list[trio.lowlevel.Task] = []
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        out.append(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return out


def task_names(prefix: str) -> list[str]:
    return [t.name for t in all_tasks() if t.name.startswith(prefix)]


@attrs.define(eq=False)
class Client:
    """One WebSocket client: collects everything it receives, in order."""

    ws: WebSocketConnection
    received: list[dict[str, Any]] = attrs.Factory(list)

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(obj if isinstance(obj, str) else json.dumps(obj))

    async def send_message(self, content: str, **extra: Any) -> None:
        await self.ws.send_message(message(content, **extra))

    async def recv(self) -> dict[str, Any]:
        raw = await self.ws.get_message()
        event: dict[str, Any] = json.loads(raw)
        self.received.append(event)
        return event

    async def until(self, type_: str) -> list[dict[str, Any]]:
        """Receive up to and including the first event of ``type_``."""
        got = [await self.recv()]
        while got[-1]["type"] != type_:
            got.append(await self.recv())
        return got

    async def until_terminal(self) -> list[dict[str, Any]]:
        got = [await self.recv()]
        while got[-1]["type"] not in TERMINAL_TYPES:
            got.append(await self.recv())
        return got

    async def until_closed(self) -> int | None:
        """Read until the server closes; return the close code."""
        try:
            while True:
                await self.recv()
        except ConnectionClosed as exc:
            return exc.reason.code


def run_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run events (with seq) among everything a client received."""
    return [e for e in events if "seq" in e]


def assert_grammar(events: list[dict[str, Any]], *, merged: bool = True) -> None:
    """One run's events as a client saw them: stream_start first, seq increasing (1..n
    without gaps unless ``merged``), exactly one terminal event, nothing after it."""
    evs = run_events(events)
    check_grammar([(e["type"], e["seq"]) for e in evs])
    if not merged:
        assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "stream_delta")


@attrs.define(eq=False)
class Server:
    app: NaviApp
    base: str
    host: str
    port: int
    http: httpx.AsyncClient
    nursery: trio.Nursery

    @property
    def registry(self) -> RunRegistry:
        assert self.app.services is not None
        return self.app.services.registry

    async def new_session(self, title: str | None = None) -> str:
        r = await self.http.post("/sessions", json={} if title is None else {"title": title})
        assert r.status_code == 201, r.text
        sid: str = r.json()["id"]
        return sid

    @asynccontextmanager
    async def connect(self, session_id: str, query: str = "") -> AsyncIterator[Client]:
        """A WebSocket client on ``/ws/sessions/{id}``; closed (and its TCP stream) on exit."""
        path = f"/ws/sessions/{session_id}" + (f"?{query}" if query else "")
        stream = await trio.open_tcp_stream(self.host, self.port)
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, self.host, path)
            try:
                yield Client(ws)
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()

    async def no_run_left(self) -> None:
        """Every run has ended and saved its answer (bounded wait: the save happens a few
        scheduler passes after the terminal event a client sees)."""
        with trio.fail_after(10):
            await self.registry.wait_idle()
        assert self.registry.runs == []

    def shutdown(self) -> None:
        """Ask for a graceful shutdown, as SIGTERM would."""
        self.app.begin_shutdown()


@asynccontextmanager
async def open_server(settings: Settings | None = None, **overrides: Any) -> AsyncIterator[Server]:
    """A real hypercorn server with our app on 127.0.0.1:0 for the duration of the block.

    Default settings: memory store (no worker threads, so virtual time stays exact),
    a small grace period. On exit the server shuts down gracefully and every run must
    have ended.
    """
    if settings is None:
        values: dict[str, Any] = {
            "store": "memory",
            "grace_s": 1.0,
            "save_timeout_s": 2.0,
            "port": 0,
            "host": "127.0.0.1",
        }
        values.update(overrides)
        settings = Settings.from_env({}, **values)
    app = NaviApp(settings)
    config = hypercorn_config(settings)  # the same socket and limits as `navi-trio serve`
    config.errorlog = None
    stop = trio.Event()

    async def trigger() -> None:
        await stop.wait()
        app.begin_shutdown()

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, app, config, shutdown_trigger=trigger))  # type: ignore[arg-type]
        url = urlsplit(binds[0])
        assert url.hostname is not None and url.port is not None
        async with httpx.AsyncClient(base_url=binds[0], trust_env=False, timeout=30) as http:
            server = Server(app, binds[0], url.hostname, url.port, http, nursery)
            try:
                yield server
            finally:
                stop.set()
    assert app.services is not None
    assert not app.services.registry.runs, "a run outlived the server"

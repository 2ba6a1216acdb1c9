"""The floor of the stack: the least an ASGI app on hypercorn's trio worker must do to
serve the benchmark's streaming scenarios, with none of navi-trio's work (no store, no
event log, no seq, no grammar, no subscribers, no heartbeat, no auth).

    python bench/compare.py --only 6_c200_paced \\
        --server-cmd '{python} -m hypercorn --worker-class trio --bind 127.0.0.1:{port} bench.floor_app:app'

It implements just what ``bench/harness/loadgen.py`` uses in stream and stop-latency
modes: ``POST /sessions``, and on ``/ws/sessions/{id}``: ``session_sync``, then for a
scripted message ``stream_start``, the deltas (paced with ``trio.sleep_until`` on a fixed
schedule, stamped with the wall clock when asked) and ``stream_end``; or for a tool step,
``tool_started`` and a wait that ``POST /sessions/{id}/stop`` cuts short (a cancelled
``tool_call``, then ``stream_stopped``, as the contract wants). If navi-trio's figure is close to this
app's, the gap to the asyncio seed is the stack's, not navi-trio's.

``bench.floor_app:handoff_app`` is the same with the one thing navi-trio's architecture
adds on the way from agent to socket: the run is a task in a server-lifetime nursery (so a
disconnect cannot cancel it) that hands each frame to the connection's writer task through
a bounded memory channel, instead of sending it inline.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

_runs: trio.Nursery | None = None  # handoff_app: the server-lifetime nursery of runs

_ids = itertools.count(1)
_tools: dict[str, trio.CancelScope] = {}  # session id -> its running tool step, for a stop


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "http":
        if scope["path"].endswith("/stop"):  # POST /sessions/{id}/stop: cancel its tool
            stop = _tools.pop(scope["path"].split("/")[2], None)
            if stop is not None:
                stop.cancel()
            status, body = 200, json.dumps({"ok": stop is not None}).encode()
        else:  # POST /sessions
            status, body = 201, json.dumps({"id": str(next(_ids))}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": '{"type":"session_sync"}'})
    sid = scope["path"].rsplit("/", 1)[-1]
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        step = json.loads(json.loads(message["text"])["content"])["script"][0]
        emit = partial(_send_text, send)
        if "tool" in step:
            await _tool(sid, step, emit)
        else:
            await _play(step, emit)


async def _send_text(send: Any, frame: str) -> None:
    await send({"type": "websocket.send", "text": frame})


async def _tool(sid: str, step: dict[str, Any], emit: Callable[[str], Awaitable[None]]) -> None:
    """A tool step that ``POST /sessions/{id}/stop`` can cut short (bench scenario 4): the
    least a stop must do on the wire, a cancelled ``tool_call`` then ``stream_stopped``."""
    tool = {"tool": step["tool"], "args": step.get("args", {}), "is_subagent": False}
    await emit('{"type":"stream_start"}')
    await emit(json.dumps({"type": "tool_started", **tool}))
    with trio.CancelScope() as scope:
        _tools[sid] = scope
        await trio.sleep(step.get("delay", 0))
    _tools.pop(sid, None)
    if scope.cancelled_caught:
        await emit(json.dumps({"type": "tool_call", **tool, "result": "cancelled", "success": False}))
        await emit(json.dumps({"type": "stream_stopped", "content": "", "reason": "user"}))
    else:
        await emit(json.dumps({"type": "tool_call", **tool, "result": step.get("result", ""), "success": True}))
        await emit(json.dumps({"type": "stream_end", "content": ""}))


async def _play(step: dict[str, Any], emit: Callable[[str], Awaitable[None]]) -> None:
    """One run: ``stream_start``, the deltas (paced on a fixed schedule, stamped when
    asked), ``stream_end``; each frame goes to ``emit``."""
    await emit('{"type":"stream_start"}')
    chunk, delay, stamp = step["text"], step.get("delay", 0), step.get("stamp", False)
    start = trio.current_time()
    parts = []
    for i in range(step.get("repeat", 1)):
        if delay and i:
            await trio.sleep_until(start + i * delay)
        delta = f"[t={time.time():.6f}]{chunk}" if stamp else chunk
        parts.append(delta)
        await emit(json.dumps({"type": "stream_delta", "delta": delta}))
    await emit(json.dumps({"type": "stream_end", "content": "".join(parts)}))


async def _handoff_run(step: dict[str, Any], out: trio.MemorySendChannel[str]) -> None:
    """One run of handoff_app, in the server nursery: frames go to the connection's writer."""

    async def emit(frame: str) -> None:
        out.send_nowait(frame)

    with out:
        await _play(step, emit)


async def handoff_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _runs
    if scope["type"] == "lifespan":
        async with trio.open_nursery() as nursery:
            _runs = nursery
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    nursery.cancel_scope.cancel()
                    return
    if scope["type"] == "http":
        await app(scope, receive, send)
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": '{"type":"session_sync"}'})
    out, frames = trio.open_memory_channel[str](100_000)

    async def writer() -> None:
        with frames:
            async for frame in frames:
                await send({"type": "websocket.send", "text": frame})

    with out:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    nursery.cancel_scope.cancel()
                    return
                step = json.loads(json.loads(message["text"])["content"])["script"][0]
                assert _runs is not None
                _runs.start_soon(_handoff_run, step, out.clone())

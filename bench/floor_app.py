"""The floor of the stack: the least an ASGI app on hypercorn's trio worker must do to
serve the benchmark's streaming scenarios, with none of navi-trio's work (no store, no
event log, no seq, no grammar, no subscribers, no heartbeat, no auth).

    python bench/compare.py --only 6_c200_paced \\
        --server-cmd '{python} -m hypercorn --worker-class trio --bind 127.0.0.1:{port} bench.floor_app:app'

It implements just what ``../shared/bench/loadgen.py`` uses in stream mode: ``POST
/sessions``, and on ``/ws/sessions/{id}``: ``session_sync``, then for a scripted message
``stream_start``, the deltas (paced with ``trio.sleep_until`` on a fixed schedule, stamped
with the wall clock when asked) and ``stream_end``. If navi-trio's figure is close to this
app's, the gap to the asyncio seed is the stack's, not navi-trio's.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import trio

_ids = itertools.count(1)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "http":
        body = json.dumps({"id": str(next(_ids))}).encode()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": '{"type":"session_sync"}'})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        step = json.loads(json.loads(message["text"])["content"])["script"][0]
        await send({"type": "websocket.send", "text": '{"type":"stream_start"}'})
        chunk, delay, stamp = step["text"], step.get("delay", 0), step.get("stamp", False)
        start = trio.current_time()
        parts = []
        for i in range(step.get("repeat", 1)):
            if delay and i:
                await trio.sleep_until(start + i * delay)
            delta = f"[t={time.time():.6f}]{chunk}" if stamp else chunk
            parts.append(delta)
            await send({"type": "websocket.send", "text": json.dumps({"type": "stream_delta", "delta": delta})})
        await send({"type": "websocket.send", "text": json.dumps({"type": "stream_end", "content": "".join(parts)})})

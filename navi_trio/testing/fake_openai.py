"""A fake OpenAI-compatible chat-completions server to script, for testing agents that call a model.

Used by navi-trio's own tests of the ``openai`` agent, and by anyone testing an agent of
their own with :func:`navi_trio.testing.check_agent` (pass ``model=fake``: the kit then
checks that every model stream the agent opened is closed within the stop budget).

A real HTTP/1.1 server on 127.0.0.1:0 (``trio.serve_tcp`` + h11, so the test sees every
TCP connection open and close), in the test's own trio run. Each request to
``POST .../chat/completions`` is recorded and answered by the next scripted
:class:`Reply`: a stream of server-sent events (with optional delays between chunks),
a plain status + body, or nothing at all. A stream can end with ``[DONE]``, end its body
without ``[DONE]``, drop the TCP connection in the middle of the body, or hang.

While a response is being written the server also reads from the socket, so a client that
goes away mid-stream is noticed at once (:attr:`Recorded.client_gone`), and
:meth:`FakeOpenAI.wait_no_connections` tells when the client has closed everything.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal

import attrs
import h11
import trio

MODEL = "test-model"

Item = dict[str, Any] | str | bytes
Ending = Literal["done", "end", "drop", "hang"]


# -- building replies ------------------------------------------------------------------
def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a single choice."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }


def content(text: str) -> dict[str, Any]:
    return chunk({"content": text})


def reasoning(text: str, field: str = "reasoning_content") -> dict[str, Any]:
    return chunk({field: text})


def tool_fragment(
    index: int, *, id: str | None = None, name: str | None = None, arguments: str | None = None
) -> dict[str, Any]:
    frag: dict[str, Any] = {"index": index}
    if id is not None:
        frag["id"] = id
        frag["type"] = "function"
    fn: dict[str, Any] = {}
    if name is not None:
        fn["name"] = name
    if arguments is not None:
        fn["arguments"] = arguments
    if fn:
        frag["function"] = fn
    return chunk({"tool_calls": [frag]})


def finish(reason: str = "stop") -> dict[str, Any]:
    return chunk({}, finish=reason)


@attrs.frozen
class Reply:
    """How the fake answers one request.

    - ``status`` / ``body`` / ``headers``: a plain response (used when ``items`` is None).
    - ``items``: a 200 ``text/event-stream``; a dict is sent as ``data: <json>``, a str or
      bytes verbatim (for malformed streams). ``delay`` seconds pass before each item after
      the first (``first_delay`` before the first). Then ``ending``: ``done`` sends
      ``data: [DONE]`` and ends the body, ``end`` ends the body without ``[DONE]``, ``drop``
      closes the TCP connection in the middle of the (chunked) body, ``hang`` sends nothing
      more until the client goes away.
    - ``never``: read the request and never answer at all.
    """

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    items: tuple[Item, ...] | None = None
    delay: float = 0.0
    first_delay: float = 0.0
    ending: Ending = "done"
    never: bool = False


def stream(*items: Item, delay: float = 0.0, first_delay: float = 0.0, ending: Ending = "done") -> Reply:
    return Reply(items=items, delay=delay, first_delay=first_delay, ending=ending)


def text_reply(*pieces: str, delay: float = 0.0, ending: Ending = "done") -> Reply:
    """A streamed answer: one content chunk per piece, then ``finish_reason: stop``."""
    return stream(*(content(p) for p in pieces), finish("stop"), delay=delay, ending=ending)


def tool_reply(*calls: tuple[str, str, str]) -> Reply:
    """A streamed turn asking for tools: ``(id, name, arguments)`` each, in index order."""
    items: list[Item] = []
    for i, (call_id, name, arguments) in enumerate(calls):
        items.append(tool_fragment(i, id=call_id, name=name, arguments=""))
        items.append(tool_fragment(i, arguments=arguments))
    items.append(finish("tool_calls"))
    return stream(*items)


def json_reply(obj: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status=status, body=json.dumps(obj).encode(), headers=(("content-type", "application/json"), *headers))


def error_reply(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """An OpenAI-style error body."""
    return json_reply({"error": {"message": message, "type": "error", "code": status}}, status, headers)


def summary_reply(text: str) -> Reply:
    """A non-streamed chat completion (what the agent asks for when summarising)."""
    return json_reply(
        {
            "id": "chatcmpl-summary",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }
    )


NEVER: Reply = Reply(never=True)


# -- what the fake saw -----------------------------------------------------------------
@attrs.define(eq=False)
class Recorded:
    """One request the fake received, and what became of its response."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    #: The response headers were sent.
    responded: bool = False
    #: The whole response was sent (and the body ended properly, or dropped on purpose).
    finished: bool = False
    #: The client closed the connection before the response was complete.
    client_gone: bool = False

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def messages(self) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = self.json["messages"]
        return msgs

    @property
    def streaming(self) -> bool:
        return bool(self.json.get("stream"))

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.json.get("tools") or []]


Responder = Callable[[Recorded], Reply]


class FakeOpenAI:
    """The server's state: scripted replies, recorded requests, open connections."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[Recorded] = []
        self._script: deque[Reply | Responder] = deque()
        #: Used when the script is empty (a Reply, or a function of the request).
        self.fallback: Reply | Responder | None = None
        self.open_connections = 0
        self.connections_total = 0
        self._changed = trio.Event()
        #: The nursery serving the fake (its connection tasks are not the agent's).
        self.nursery: trio.Nursery | None = None

    def owns(self, task: trio.lowlevel.Task) -> bool:
        """Whether ``task`` is one of the fake's own (its listener or a connection)."""
        nursery = task.parent_nursery
        while nursery is not None:
            if nursery is self.nursery:
                return True
            nursery = nursery.parent_task.parent_nursery
        return False

    @property
    def base_url(self) -> str:
        """What ``NAVI_OPENAI_BASE_URL`` should be."""
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply | Responder) -> None:
        """Answer the next requests with these, in order (a function gets the request)."""
        self._script.extend(replies)

    @property
    def open_streams(self) -> int:
        """Responses the fake has begun and neither finished nor seen the client leave:
        a model stream the agent still holds open."""
        return sum(r.responded and not r.finished and not r.client_gone for r in self.requests)

    @property
    def disconnects(self) -> int:
        """Requests whose client went away before their response was complete."""
        return sum(r.client_gone for r in self.requests)

    # -- waiting (no sleeps: each change of state wakes the waiters) -------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def wait_requests(self, n: int) -> None:
        await self.wait_for(lambda: len(self.requests) >= n)

    async def wait_no_connections(self) -> None:
        await self.wait_for(lambda: self.open_connections == 0)

    # -- the server --------------------------------------------------------------------
    def _reply_for(self, req: Recorded) -> Reply:
        item: Reply | Responder | None = self._script.popleft() if self._script else self.fallback
        if item is None:
            return error_reply(500, "the fake has no scripted reply for this request")
        return item if isinstance(item, Reply) else item(req)

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        self.open_connections += 1
        self.connections_total += 1
        self._notify()
        try:
            while True:
                req = await self._read_request(stream, conn)
                if req is None:
                    return
                self.requests.append(req)
                self._notify()
                keep = await self._respond(stream, conn, req, self._reply_for(req))
                if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self.open_connections -= 1
            self._notify()

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection) -> Recorded | None:
        req: Recorded | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)  # b"" marks EOF: h11 then says ConnectionClosed
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                req = Recorded(event.method.decode(), event.target.decode(), headers, b"")
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert req is not None
                req.body = bytes(body)
                return req

    async def _respond(self, stream: trio.SocketStream, conn: h11.Connection, req: Recorded, reply: Reply) -> bool:
        """Write ``reply`` while watching for the client going away. Returns whether the
        connection can serve another request."""
        outcome = {"keep": True}

        async def watch(cancel: trio.CancelScope) -> None:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    req.client_gone = True
                    outcome["keep"] = False
                    self._notify()
                    cancel.cancel()
                    return
                conn.receive_data(data)  # a next request, kept for the next cycle

        async def write() -> None:
            try:
                await self._write(stream, conn, req, reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                req.client_gone = True
                outcome["keep"] = False
                self._notify()
            if reply.ending == "drop" and reply.items is not None:
                outcome["keep"] = False

        async with trio.open_nursery() as nursery:
            writer_scope = trio.CancelScope()
            nursery.start_soon(watch, writer_scope)
            with writer_scope:
                await write()
            nursery.cancel_scope.cancel()
        return outcome["keep"] and not req.client_gone

    async def _write(self, stream: trio.SocketStream, conn: h11.Connection, req: Recorded, reply: Reply) -> None:
        async def send(event: Any) -> None:
            data = conn.send(event)
            if data:
                await stream.send_all(data)

        if reply.never:
            await trio.sleep_forever()
        if reply.items is None:
            headers = [*reply.headers, ("content-length", str(len(reply.body)))]
            await send(h11.Response(status_code=reply.status, headers=headers))
            req.responded = True
            self._notify()
            await send(h11.Data(data=reply.body))
            await send(h11.EndOfMessage())
            req.finished = True
            self._notify()
            return
        headers = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked"), *reply.headers]
        await send(h11.Response(status_code=200, headers=headers))
        req.responded = True
        self._notify()
        for i, item in enumerate(reply.items):
            wait = reply.first_delay if i == 0 else reply.delay
            if wait:
                await trio.sleep(wait)
            await send(h11.Data(data=_encode(item)))
        if reply.delay and reply.ending in ("done", "end"):
            await trio.sleep(reply.delay)
        if reply.ending == "done":
            await send(h11.Data(data=b"data: [DONE]\n\n"))
        if reply.ending in ("done", "end"):
            await send(h11.EndOfMessage())
        elif reply.ending == "hang":
            await trio.sleep_forever()
        # "drop": the caller closes the TCP connection without the body's last chunk
        req.finished = True
        self._notify()


def _encode(item: Item) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return b"data: " + json.dumps(item).encode() + b"\n\n"


@asynccontextmanager
async def open_fake_openai() -> AsyncIterator[FakeOpenAI]:
    """Serve a :class:`FakeOpenAI` on 127.0.0.1:0 for the duration of the block."""
    fake = FakeOpenAI()
    async with trio.open_nursery() as nursery:
        fake.nursery = nursery
        listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1"))
        fake.port = listeners[0].socket.getsockname()[1]
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()

"""Answering an HTTP request on plain ASGI without breaking a pooled client's connection.

An answer sent before the request body was read (401, 403, 404 or 413 of an upload)
leaves hypercorn's HTTP/1.1 connection unable to take another request: it closes it, and
without ``Connection: close`` a client's pool reuses the dead connection and its next
request fails. So before answering, what is left of the body is read and dropped, up to
:data:`DRAIN_BYTES` and :data:`DRAIN_S`; if more remains, the answer says
``Connection: close`` and the client opens a new connection for its next request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson
import trio

if TYPE_CHECKING:
    from .asgi_types import Message, Receive, Scope, Send

#: Body bytes read and dropped to keep a connection (a refused upload up to this size).
DRAIN_BYTES: Final = 32 * 1024 * 1024
#: And for at most this long (a client that sends slowly gets ``Connection: close``).
DRAIN_S: Final = 5.0


@attrs.frozen
class RawBody:
    """A body that is not JSON (the metrics exposition)."""

    content: bytes
    content_type: str


class RequestBody:
    """The request's ``receive``, remembering whether the body has been read to its end."""

    __slots__ = ("_receive", "declared", "done", "received")

    def __init__(self, receive: Receive, scope: Scope | None = None) -> None:
        self._receive = receive
        self.done = False
        self.received = 0
        #: The ``Content-Length`` the client declared, if any.
        self.declared: int | None = None
        for name, value in scope.get("headers", ()) if scope is not None else ():
            if name == b"content-length" and value.isdigit():
                self.declared = int(value)

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self.done = True
        self.received += len(message.get("body", b""))
        return message

    async def drain(self, limit: int = DRAIN_BYTES, timeout_s: float = DRAIN_S) -> bool:
        """Read and drop the rest of the body; True if it has all been read.

        Bounded by ``limit`` bytes and ``timeout_s`` seconds; a declared length over the
        limit is not read at all. Cancellation: a cancel only ends the reading.
        """
        if self.declared is not None and self.declared - self.received > limit:
            return self.done
        start = self.received
        with trio.move_on_after(timeout_s):
            while not self.done and self.received - start <= limit:
                await self()
        return self.done


async def send_json(
    send: Send,
    status: int,
    body: Any,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    request_body: RequestBody | None = None,
) -> None:
    """Answer ``status`` with ``body`` as JSON (None: no body; a :class:`RawBody` as it is).
    With ``request_body``, the request's unread body is drained first, or the answer closes
    the connection."""
    close = request_body is not None and not await request_body.drain()
    if isinstance(body, RawBody):
        payload, content_type = body.content, body.content_type.encode()
    else:
        payload, content_type = b"" if body is None else orjson.dumps(body), b"application/json"
    out = [(b"content-length", str(len(payload)).encode()), *headers]
    if body is not None:
        out.append((b"content-type", content_type))
    if status == 401:
        out.append((b"www-authenticate", b"Bearer"))
    if close:
        out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": payload})

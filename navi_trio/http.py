"""The HTTP routes of CONTRACT section 2, as plain ASGI.

A handful of routes does not need a framework: each handler returns ``(status, body)``
or raises :class:`HTTPError`, which becomes ``{"detail": ...}``. Nothing else escapes as
a 500 with a stack trace: unexpected errors are logged and answered with a generic 500.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog

from .errors import StoreError

if TYPE_CHECKING:
    from .asgi_types import Receive, Scope, Send
    from .runs import RunRegistry
    from .store.base import SessionRecord, Store

log = structlog.get_logger("navi_trio.http")

MAX_JSON_BODY: Final = 1024 * 1024
MAX_TITLE: Final = 500
_SESSION_ID = r"(?P<sid>[A-Za-z0-9_-]{1,64})"
ROUTES: Final = [
    (re.compile(r"^/healthz$"), "healthz"),
    (re.compile(r"^/sessions$"), "sessions"),
    (re.compile(rf"^/sessions/{_SESSION_ID}$"), "session"),
    (re.compile(rf"^/sessions/{_SESSION_ID}/messages$"), "messages"),
    (re.compile(rf"^/sessions/{_SESSION_ID}/stop$"), "stop"),
]


class HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def _send_json(send: Send, status: int, body: Any) -> None:
    payload = b"" if body is None else orjson.dumps(body)
    headers = [(b"content-length", str(len(payload)).encode())]
    if body is not None:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes with 413."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "Client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"Request body too large (max {limit} bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class HttpApi:
    def __init__(self, registry: RunRegistry, store: Store) -> None:
        self.registry = registry
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            for pattern, name in ROUTES:
                m = pattern.match(path)
                if m:
                    status, body = await self._dispatch(name, method, m.groupdict().get("sid"), receive)
                    break
            else:
                raise HTTPError(404, "Not Found")
        except HTTPError as exc:
            status, body = exc.status, {"detail": exc.detail}
        except StoreError as exc:
            log.error("http.store_error", path=path, error=str(exc))
            status, body = 503, {"detail": "Storage is unavailable; try again shortly."}
        except Exception:
            log.exception("http.unexpected_error", path=path, method=method)
            status, body = 500, {"detail": "Internal server error"}
        await _send_json(send, status, body)

    async def _dispatch(self, name: str, method: str, sid: str | None, receive: Receive) -> tuple[int, Any]:
        if name == "healthz":
            if method == "GET":
                return 200, {"status": "ok"}
        elif name == "sessions":
            if method == "POST":
                return await self.create_session(receive)
            if method == "GET":
                sessions = await self.store.list_sessions(None)
                return 200, [s.as_dict() for s in sessions]
        elif sid is not None:
            if name == "session" and method == "GET":
                session = await self._session(sid)
                return 200, {**session.as_dict(), "running": self.registry.active(sid) is not None}
            if name == "session" and method == "DELETE":
                return await self.delete_session(sid)
            if name == "messages" and method == "GET":
                await self._session(sid)
                return 200, [m.as_dict() for m in await self.store.list_messages(sid)]
            if name == "stop" and method == "POST":
                return await self.stop(sid)
        raise HTTPError(405, "Method Not Allowed")

    async def _session(self, sid: str) -> SessionRecord:
        session = await self.store.get_session(sid)
        if session is None:
            raise HTTPError(404, "Session not found")
        return session

    async def create_session(self, receive: Receive) -> tuple[int, Any]:
        raw = await read_body(receive, MAX_JSON_BODY)
        title = "New session"
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise HTTPError(400, "Invalid JSON") from None
            if not isinstance(body, dict):
                raise HTTPError(422, "Expected a JSON object")
            if "title" in body and body["title"] is not None:
                if not isinstance(body["title"], str):
                    raise HTTPError(422, "title must be a string")
                if len(body["title"]) > MAX_TITLE:
                    raise HTTPError(422, f"title is longer than {MAX_TITLE} characters")
                title = body["title"]
        session = await self.store.create_session(uuid.uuid4().hex, title, None)
        log.info("session.created", session_id=session.id)
        return 201, session.as_dict()

    async def stop(self, sid: str) -> tuple[int, Any]:
        """Stop the session's run and answer once it has really ended: its terminal event
        is in the log and its answer saved (``run.done``)."""
        await self._session(sid)
        run = self.registry.stop(sid, "user")
        if run is None:
            return 200, {"ok": False, "reason": "no active run"}
        await run.done.wait()
        return 200, {"ok": True, "last_seq": run.log.last_seq}

    async def delete_session(self, sid: str) -> tuple[int, Any]:
        await self._session(sid)
        self.registry.forget_session(sid)
        run = self.registry.stop(sid, "deleted")
        if run is not None:
            await run.done.wait()
        await self.store.delete_session(sid)
        self.registry.close_followers(sid, 4004, "Session deleted")
        log.info("session.deleted", session_id=sid)
        return 204, None

"""The HTTP routes of CONTRACT section 2, as plain ASGI.

A handful of routes does not need a framework: each handler returns ``(status, body)``
or raises :class:`HTTPError`, which becomes ``{"detail": ...}``. Nothing else escapes as
a 500 with a stack trace: unexpected errors are logged and answered with a generic 500.
"""

from __future__ import annotations

import hmac
import re
import uuid
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import orjson
import structlog
import trio

from . import uploads
from .auth import AccessDenied, AuthError, authenticate, bearer_token, check_access
from .errors import SessionGone, StoreError
from .responses import RawBody, RequestBody, send_json
from .store import find_session

if TYPE_CHECKING:
    from collections.abc import Callable

    from .asgi_types import Receive, Scope, Send
    from .protocol_routes import ProtocolRoutes
    from .runs import RunRegistry
    from .settings import Settings
    from .store.base import SessionRecord, Store, User

log = structlog.get_logger("navi_trio.http")

MAX_JSON_BODY: Final = 1024 * 1024
MAX_TITLE: Final = 500
_SESSION_ID = r"(?P<sid>[A-Za-z0-9_-]{1,64})"
ROUTES: Final = [
    (re.compile(r"^/healthz$"), "healthz"),
    (re.compile(r"^/metrics$"), "metrics"),
    (re.compile(r"^/sessions$"), "sessions"),
    (re.compile(rf"^/sessions/{_SESSION_ID}$"), "session"),
    (re.compile(rf"^/sessions/{_SESSION_ID}/messages$"), "messages"),
    (re.compile(rf"^/sessions/{_SESSION_ID}/stop$"), "stop"),
    (re.compile(rf"^/sessions/{_SESSION_ID}/files$"), "files"),
    # CONTRACT section 10, served by protocol_routes.ProtocolRoutes
    (re.compile(r"^/api/chat$"), "ai_chat"),
    (re.compile(rf"^/api/chat/{_SESSION_ID}/stream$"), "ai_chat_stream"),
    (re.compile(r"^/ag-ui$"), "ag_ui"),
]
#: The status a route returns when it has sent its own (streamed) response.
STREAMED: Final = 0


class HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def read_body(receive: Receive, limit: int, too_large: str | None = None) -> bytes:
    """The request body, refusing more than ``limit`` bytes with 413 (``too_large`` says why)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "Client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, too_large or f"Request body too large (max {limit} bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class HttpApi:
    def __init__(
        self,
        registry: RunRegistry,
        store: Store,
        settings: Settings,
        *,
        health: Callable[[], str | None] = lambda: None,
        protocols: ProtocolRoutes | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.settings = settings
        #: Why the server cannot serve (``/healthz`` answers 503 with it), or None.
        self.health = health
        #: CONTRACT section 10's routes (``protocol_routes``), when served.
        self.protocols = protocols

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        # What is left unread of the body when the answer is ready is drained, or the
        # answer closes the connection (``responses``): a pooled client's next request works.
        receive = body = RequestBody(receive, scope)
        try:
            for pattern, name in ROUTES:
                m = pattern.match(path)
                if m:
                    status, answer = await self._dispatch(name, method, m.groupdict().get("sid"), scope, receive, send)
                    break
            else:
                raise HTTPError(404, "Not Found")
        except HTTPError as exc:
            status, answer = exc.status, {"detail": exc.detail}
        except AuthError as exc:
            status, answer = 401, {"detail": str(exc)}
        except AccessDenied as exc:
            status, answer = 403, {"detail": str(exc)}
        except StoreError as exc:
            log.error("http.store_error", path=path, error=str(exc))
            status, answer = 503, {"detail": "Storage is unavailable; try again shortly."}
        except Exception:
            log.exception("http.unexpected_error", path=path, method=method)
            status, answer = 500, {"detail": "Internal server error"}
        if status != STREAMED:  # a streamed answer was sent by its route
            await send_json(send, status, answer, request_body=body)

    async def _caller(self, scope: Scope) -> User | None:
        user = await authenticate(self.store, self.settings.auth, bearer_token(scope["headers"]))
        if user is not None:
            structlog.contextvars.bind_contextvars(user_id=user.id)
        return user

    async def _dispatch(
        self, name: str, method: str, sid: str | None, scope: Scope, receive: Receive, send: Send
    ) -> tuple[int, Any]:
        if name == "healthz":
            if method == "GET":
                problem = self.health()
                if problem is not None:
                    raise HTTPError(503, problem)
                # The store's own state (PostgreSQL gone): why goes to the log, not to an
                # unauthenticated caller (it names the database's host).
                store_problem = await self.store.health()
                if store_problem is not None:
                    log.warning("http.healthz_unavailable", problem=store_problem)
                    return 503, {"detail": "Storage is unavailable"}
                return 200, {"status": "ok"}
            raise HTTPError(405, "Method Not Allowed")
        if name == "metrics":
            return self.metrics(method, scope)
        user = await self._caller(scope)
        if self.protocols is not None and name in ("ai_chat", "ai_chat_stream", "ag_ui"):
            return await self.protocols.serve(name, method, sid, scope, receive, send, user)
        if name == "sessions":
            if method == "POST":
                return await self.create_session(receive, user)
            if method == "GET":
                if user is None:
                    sessions = await self.store.list_sessions(None)
                else:
                    sessions = await self.store.list_sessions(user.id, everyone=user.is_admin)
                return 200, [s.as_dict() for s in sessions]
        elif sid is not None:
            if name == "session" and method == "GET":
                session = await self._session(sid, user)
                return 200, {**session.as_dict(), "running": await self.registry.current(sid) is not None}
            if name == "session" and method == "DELETE":
                return await self.delete_session(await self._session(sid, user))
            if name == "messages" and method == "GET":
                await self._session(sid, user)
                await self.registry.current(sid)  # an answer already ended is saved first
                return 200, [m.as_dict() for m in await self.store.list_messages(sid)]
            if name == "stop" and method == "POST":
                return await self.stop(await self._session(sid, user))
            if name == "files" and method == "POST":
                return await self.upload(await self._session(sid, user), scope, receive)
        raise HTTPError(405, "Method Not Allowed")

    async def _session(self, sid: str, user: User | None) -> SessionRecord:
        """The session, if it exists and the caller may reach it (the one access rule);
        a cached record with no scheduler pass (``find_session``)."""
        session = await find_session(self.store, sid)
        if session is None:
            raise HTTPError(404, "Session not found")
        check_access(session, user)
        return session

    def metrics(self, method: str, scope: Scope) -> tuple[int, Any]:
        """``GET /metrics`` (CONTRACT section 12): no user token; with ``NAVI_METRICS_TOKEN``
        set, that token and no other."""
        if method != "GET":
            raise HTTPError(405, "Method Not Allowed")
        expected = self.settings.metrics_token
        if expected:
            given = bearer_token(scope["headers"]) or ""
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise AuthError("A valid metrics token is required")
        accept = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"accept"), "")
        content, content_type = self.registry.metrics.render(self.registry, accept)
        return 200, RawBody(content, content_type)

    async def create_session(self, receive: Receive, user: User | None) -> tuple[int, Any]:
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
        session = await self.store.create_session(uuid.uuid4().hex, title, user.id if user else None)
        log.info("session.created", session_id=session.id)
        return 201, session.as_dict()

    async def stop(self, session: SessionRecord) -> tuple[int, Any]:
        """Stop the session's run and answer once it has really ended: its terminal event
        is in the log and its answer saved (``run.done``)."""
        run = await self.registry.stop_current(session.id)
        if run is None:
            return 200, {"ok": False, "reason": "no active run"}
        return 200, {"ok": True, "last_seq": run.log.last_seq}

    async def delete_session(self, session: SessionRecord) -> tuple[int, Any]:
        sid = session.id
        self.registry.forget_session(sid)
        run = await self.registry.stop_anywhere(sid, "deleted")
        if run is not None:
            await run.done.wait()
        await self.store.delete_session(sid)  # and the store's copies of its uploads
        # A message that came while the delete was written started a run: stop that too
        # (one that comes later finds the session gone and ends as deleted, runs.py).
        run = await self.registry.stop_anywhere(sid, "deleted")
        if run is not None:
            await run.done.wait()
        await trio.to_thread.run_sync(uploads.delete_session_uploads, self.settings.data_dir, session.user_id, sid)
        self.registry.close_followers(sid, 4004, "Session deleted")
        log.info("session.deleted", session_id=sid)
        return 204, None

    async def upload(self, session: SessionRecord, scope: Scope, receive: Receive) -> tuple[int, Any]:
        """``POST /sessions/{id}/files?name=NAME`` with the raw bytes (CONTRACT section 6)."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        names = query.get("name") or [""]
        try:
            name = uploads.safe_name(names[0])
        except uploads.BadUpload as exc:
            raise HTTPError(422, str(exc)) from None
        limit = int(self.settings.max_upload_mb * 1024 * 1024)
        too_large = f"Upload too large (max {self.settings.max_upload_mb:g} MB)"
        for header, value in scope["headers"]:
            if header == b"content-length" and value.isdigit() and int(value) > limit:
                raise HTTPError(413, too_large)
        body = await read_body(receive, limit, too_large)
        folder = uploads.session_dir(self.settings.data_dir, session.user_id, session.id)
        try:
            saved = await uploads.save(self.store, self.settings.data_dir, session.user_id, session.id, name, body)
        except SessionGone:  # the store keeps uploads and the session was deleted meanwhile
            raise HTTPError(404, "Session not found") from None
        except OSError as exc:  # full, read-only, or not a directory: the store's answer
            log.warning("upload.not_saved", session_id=session.id, error=str(exc))
            raise HTTPError(503, "Storage cannot take this upload; try again later.") from None
        # DELETE may have come while the body arrived (it removes the session, then its
        # folder): if the session is gone now, what was just written is removed too. If it
        # still exists, a DELETE that follows removes the folder after this point.
        if await self.store.get_session(session.id) is None:
            await trio.to_thread.run_sync(uploads.discard_upload, folder, name)
            raise HTTPError(404, "Session not found")
        log.info("upload.saved", session_id=session.id, name=name, size=len(body))
        return 201, saved

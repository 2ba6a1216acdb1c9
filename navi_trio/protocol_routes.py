"""The HTTP side of CONTRACT section 10: ``POST /api/chat``, ``GET /api/chat/{id}/stream``
and ``POST /ag-ui``, each an SSE response that follows one run.

Thin on purpose: the protocols are translated by the sans-IO modules in
:mod:`navi_trio.protocols`; this module checks the caller, starts the run through the
registry as a WebSocket message would, and moves bytes. An :class:`SseStream` is an
:class:`~navi_trio.fanout.Outbox` like a WebSocket connection: the run offers it events
without ever waiting; when its bounded outbox is full it falls behind and is caught up
from the run's log, deltas merged, so a slow reader never slows the run and nothing
beyond the log is held for it. A client that goes away is a disconnect, never a stop:
the run goes on and saves its answer.
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import attrs
import orjson
import structlog
import trio

from . import uploads
from .auth import check_access
from .catchup import CatchUp
from .connection import ALREADY_RUNNING
from .errors import BadClientMessage, QueueFull, RunAlreadyActive, SessionGone, ShuttingDown, StoreError
from .events import Event
from .http import STREAMED, HTTPError, read_body
from .messages import MAX_IMAGE_BYTES, check_base64, parse_message
from .metrics import Tally
from .protocols import ag_ui, ai_sdk, sse
from .store import find_session
from .uploads import BadUpload

if TYPE_CHECKING:
    from .agents.pacing import Pacer
    from .asgi_types import Receive, Scope, Send
    from .fanout import Subscriber
    from .lifecycle import Run, RunRequest
    from .local import LocalRuns
    from .runs import RunRegistry
    from .settings import Settings
    from .store.base import SessionRecord, User

log = structlog.get_logger("navi_trio.protocol_routes")

#: The route names :class:`~navi_trio.http.HttpApi` hands to :meth:`ProtocolRoutes.serve`.
ROUTE_NAMES: Final = frozenset({"ai_chat", "ai_chat_stream", "ag_ui"})
MB: Final = 1024 * 1024
T = TypeVar("T")


class Translator(Protocol):
    """One protocol's sans-IO translator (:mod:`navi_trio.protocols`)."""

    done: bool

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]: ...


#: What an SSE stream's outbox carries: a run event (shared with every subscriber), a
#: catch-up or replay frame (JSON text), a keep-alive comment, or None to wake the writer.
SseItem = Event | str | bytes | None


def _decoded(item: Event | str) -> dict[str, Any]:
    """A run event as the dict a WebSocket client sees. A live delta is built from its
    fields (no JSON to parse on the hot path); anything else is parsed once, here."""
    if isinstance(item, Event):
        if item.delta is not None:
            return {"type": item.type, "seq": item.seq, "delta": item.delta}
        item = item.wire
    event: dict[str, Any] = orjson.loads(item)
    return event


class SseStream:
    """One SSE response following one run: the run's :class:`~navi_trio.fanout.Outbox`.

    Three tasks in one nursery, as for a WebSocket connection: the writer (the only one
    that calls ``send``), the keep-alive, and the disconnect watch (``receive`` until
    ``http.disconnect``). Whichever ends first ends the others.
    """

    def __init__(
        self,
        send: Send,
        receive: Receive,
        translator: Translator,
        *,
        heartbeat_s: float,
        outbox_size: int,
        end: bytes,
        tally: Tally | None = None,
    ) -> None:
        #: Where the events written are counted (``navi_events_sent_total``), as a
        #: WebSocket's writer counts its frames: a plain int on the hot path.
        self._tally = tally if tally is not None else Tally()
        self._send = send
        self._receive = receive
        self._translator = translator
        self._end = end
        self.heartbeat_s = heartbeat_s
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[SseItem](outbox_size)
        self.lagging: CatchUp[Subscriber] = CatchUp()
        self.last_send = trio.current_time()
        #: True once the client went away (nothing more is written then).
        self.disconnected = False
        self._sub: Subscriber | None = None

    # -- Outbox ------------------------------------------------------------------------
    def offer(self, frame: SseItem) -> bool:
        try:
            self._outbox_send.send_nowait(frame)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def wake(self) -> None:
        self.offer(None)

    def fall_behind(self, sub: Subscriber) -> None:
        self.lagging.append(sub)

    @property
    def behind(self) -> bool:
        return bool(self.lagging)

    # -- lifecycle ---------------------------------------------------------------------
    async def serve(self, run: Run, local: LocalRuns, headers: list[tuple[bytes, bytes]], pacer: Pacer) -> None:
        """Answer ``200`` with the run translated, from its first event to its terminal
        one, then end the response.

        Cancellation: a cancel (server shutdown past hypercorn's graceful timeout) ends
        the response where it is; the run is not touched. Resource handling: owns the
        outbox; unsubscribes from the run on the way out, whatever ends it.
        """
        # A replay from the start: the run's events so far from its log, then the live
        # ones, with no gap or duplicate between them (``LocalRuns.subscribe`` is synchronous).
        sub = local.subscribe(run, self, replay=True)
        sub.reports_wire = True  # the writer says when the run's terminal part is sent
        self._sub = sub
        try:
            with self._outbox_send, self._outbox_recv:
                await self._send({"type": "http.response.start", "status": 200, "headers": headers})
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_alive, pacer, name="sse-keep-alive")
                    nursery.start_soon(self._watch_disconnect, nursery.cancel_scope, name="sse-disconnect")
                    await self._writer()
                    nursery.cancel_scope.cancel(reason="run translated to its end")
                if not self.disconnected:
                    await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            local.unsubscribe(sub)
            if self.disconnected and not run.log.finished:
                log.info("sse.client_left", run_id=run.id)

    async def _watch_disconnect(self, scope: trio.CancelScope) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                scope.cancel(reason="client disconnected")
                return

    async def _keep_alive(self, pacer: Pacer) -> None:
        hb = self.heartbeat_s
        while True:
            now = trio.current_time()
            due = self.last_send + hb
            if now >= due:
                self.offer(sse.KEEP_ALIVE)  # a full outbox means we are sending anyway
                self.last_send = now
                due = now + hb
            await pacer.sleep_until(due)

    async def _next(self) -> SseItem:
        """The next item: queued live events first, then catch-up from the log for a
        subscription that fell behind (merged deltas), else wait for the run."""
        lagging = self.lagging
        while True:
            empty = False
            try:
                return self._outbox_recv.receive_nowait()
            except trio.WouldBlock:
                empty = True
            if empty and lagging:
                caught = lagging.next_frame()
                if caught is not None:
                    await trio.lowlevel.checkpoint()
                    return caught[0]
                continue
            return await self._outbox_recv.receive()

    async def _writer(self) -> None:
        """Write translated parts until the terminal event's, then the protocol's end."""
        translator = self._translator
        while True:
            item = await self._next()
            if item is None:
                continue
            if isinstance(item, bytes):
                chunk = item
            else:
                parts = translator.feed(_decoded(item))
                if not parts:
                    continue
                chunk = sse.encode_all(parts)
                if translator.done:
                    chunk += self._end
            await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.last_send = trio.current_time()
            if not isinstance(item, bytes):  # a run's event (maybe merged), not a keep-alive
                self._tally.frames_sent += 1
            if translator.done:
                if self._sub is not None:
                    self._sub.on_wire()
                return


def _parsed(parse: Callable[[Any], T], body: Any) -> T:
    """A protocol's request parsed; what it refuses is a ``422`` naming why."""
    try:
        return parse(body)
    except BadClientMessage as exc:
        raise HTTPError(422, str(exc)) from None


@attrs.frozen
class _Attachment:
    name: str
    body: bytes


class ProtocolRoutes:
    """The three routes; :meth:`serve` is called by :class:`~navi_trio.http.HttpApi`
    after it has authenticated the caller, so every check of the HTTP routes applies."""

    def __init__(self, registry: RunRegistry, settings: Settings, pacer: Pacer) -> None:
        self.registry = registry
        self.settings = settings
        self.pacer = pacer

    def body_limit(self) -> int:
        """The largest request body taken: the message, 50 MB of images and one upload's
        worth of files, as base64 (the body carries the whole conversation: a longer one
        is refused with 413)."""
        files = math.ceil(self.settings.max_upload_mb * MB * 4 / 3)
        return MAX_IMAGE_BYTES + files + 4 * self.settings.max_message_chars + MB

    async def serve(
        self, name: str, method: str, sid: str | None, scope: Scope, receive: Receive, send: Send, user: User | None
    ) -> tuple[int, Any]:
        """Answer one of :data:`ROUTE_NAMES`: ``(STREAMED, None)`` once a stream was
        served, or ``(status, body)`` for HttpApi to send; raises :class:`HTTPError`
        (and the auth errors) before anything is sent."""
        if name == "ai_chat" and method == "POST":
            req = _parsed(ai_sdk.parse_chat_body, await self._json(receive))
            session = await self._session(req.session_id, user, create=True)
            run = await self._start(session, user, req.text, req.images, await self._attachments(req.files))
            chunks = ai_sdk.UIMessageStream(run.answer_id)
            return await self._stream(run, chunks, sse.DONE, ai_sdk.HEADERS, send, receive)
        if name == "ai_chat_stream" and method == "GET" and sid is not None:
            await self._session(sid, user, create=False)
            active = await self.registry.current(sid)
            if active is None:
                return 204, None
            resumed = ai_sdk.UIMessageStream(active.answer_id)
            return await self._stream(active, resumed, sse.DONE, ai_sdk.HEADERS, send, receive)
        if name == "ag_ui" and method == "POST":
            inp = _parsed(ag_ui.parse_run_input, await self._json(receive))
            session = await self._session(inp.thread_id, user, create=True)
            run = await self._start(session, user, inp.text, inp.images, [])
            events = ag_ui.AgUiStream(inp.thread_id, inp.run_id)
            return await self._stream(run, events, b"", ag_ui.HEADERS, send, receive)
        raise HTTPError(405, "Method Not Allowed")

    async def _stream(
        self,
        run: Run,
        translator: Translator,
        end: bytes,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        receive: Receive,
    ) -> tuple[int, Any]:
        """Serve ``run`` as an SSE response. Once the response has started nothing can be
        turned into an error answer, so an unexpected error is logged and ends it there
        (the run is not touched: it goes on and saves its answer)."""
        settings = self.settings
        stream = SseStream(
            send,
            receive,
            translator,
            heartbeat_s=settings.heartbeat_s,
            outbox_size=settings.outbox_size,
            end=end,
            tally=self.registry.metrics.tally,
        )
        try:
            await stream.serve(run, self.registry.local, headers, self.pacer)
        except Exception:
            log.exception("sse.failed", run_id=run.id)
        return STREAMED, None

    async def _json(self, receive: Receive) -> Any:
        limit = self.body_limit()
        raw = await read_body(receive, limit, f"Request body too large (max {limit // MB} MB)")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise HTTPError(400, "Invalid JSON") from None

    async def _session(self, sid: str, user: User | None, *, create: bool) -> SessionRecord:
        """The session if the caller may reach it (the one access rule: 403 for another
        user's); with ``create``, a session that does not exist is made for the caller."""
        store = self.registry.store
        session = await find_session(store, sid)
        if session is None and create:
            failure: StoreError | None = None
            try:
                session = await store.create_session(sid, "New session", user.id if user else None)
                log.info("session.created", session_id=sid, via="protocol")
            except StoreError as exc:
                failure = exc
            if failure is not None:
                session = await find_session(store, sid)  # made by a request at the same time
                if session is None:
                    raise failure
        if session is None:
            raise HTTPError(404, "Session not found")
        check_access(session, user)
        return session

    async def _attachments(self, files: list[ai_sdk.FilePart]) -> list[_Attachment]:
        """Decode the ``data:`` URLs of non-image file parts (in a worker thread), each
        within the upload limit. Raises :class:`HTTPError` 422 / 413."""
        if not files:
            return []
        limit = int(self.settings.max_upload_mb * MB)

        def decode() -> list[_Attachment]:
            out = []
            for f in files:
                head, _, payload = f.url.partition(",")
                if not head.endswith(";base64"):
                    raise HTTPError(422, f"File {f.name!r} is not a base64 data: URL.")
                try:
                    body = binascii.a2b_base64(payload, strict_mode=True)
                except (binascii.Error, ValueError):
                    raise HTTPError(422, f"File {f.name!r} is not valid base64.") from None
                if len(body) > limit:
                    raise HTTPError(413, f"Upload too large (max {self.settings.max_upload_mb:g} MB)")
                out.append(_Attachment(uploads.safe_name(f.name), body))
            return out

        try:
            return await trio.to_thread.run_sync(decode)
        except BadUpload as exc:
            raise HTTPError(422, str(exc)) from None

    async def _start(
        self, session: SessionRecord, user: User | None, text: str, images: list[str], files: list[_Attachment]
    ) -> Run:
        """Start a run from the user's message, checked as a WebSocket ``message`` is
        (section 3's limits, answered 422), with ``if_running: reject`` (409)."""
        settings = self.settings
        try:
            request, _ = parse_message(
                {"type": "message", "content": text, "images": images},
                session.id,
                user.id if user else None,
                None,
                settings.max_message_chars,
            )
            request = attrs.evolve(
                request, upload_dir=uploads.session_dir(settings.data_dir, session.user_id, session.id)
            )
            if request.images:
                await check_base64(request.images)  # in steps on the loop (issue 10)
        except BadClientMessage as exc:
            raise HTTPError(422, str(exc)) from None
        if files:
            request = await self._with_uploads(session, request, files)
        # A run whose terminal event is out is over: wait for its save, then start at once
        # (no checkpoint between ``current`` and ``submit``).
        await self.registry.current(session.id)
        try:
            run = await self.registry.admit(request, "reject")  # cluster-wide with NAVI_REDIS_URL
        except RunAlreadyActive:
            raise HTTPError(409, ALREADY_RUNNING) from None
        except BadClientMessage as exc:  # the agent refuses it (a script over its bounds)
            raise HTTPError(422, str(exc)) from None
        except QueueFull as exc:
            raise HTTPError(409, str(exc)) from None
        except ShuttingDown as exc:
            raise HTTPError(503, str(exc)) from None
        if run is None:  # cannot happen with "reject" right after current(); never queue silently
            raise HTTPError(409, ALREADY_RUNNING)
        return run

    async def _with_uploads(self, session: SessionRecord, request: RunRequest, files: list[_Attachment]) -> RunRequest:
        """Save the attached files as uploads of the session (as ``POST
        /sessions/{id}/files`` would) and tell the agent where they are."""
        data_dir = self.settings.data_dir
        try:
            for f in files:
                await uploads.save(self.registry.store, data_dir, session.user_id, session.id, f.name, f.body)
        except SessionGone:
            raise HTTPError(404, "Session not found") from None
        except OSError as exc:
            log.error("upload.save_failed", session_id=session.id, error=str(exc))
            raise HTTPError(503, "Storage cannot take the upload; try again shortly.") from None
        names = [f.name for f in files]
        lines = "\n".join(f"- {n} → {uploads.public_path(session.id, n)}" for n in names)
        return attrs.evolve(request, content=f"{request.content}\n\n[Uploaded files on disk:\n{lines}]", files=names)

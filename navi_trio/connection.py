"""One WebSocket connection: a nursery of a receiver, one writer and a heartbeat.

- The **receiver** always drains ASGI ``receive()`` (hypercorn's reader stalls otherwise)
  and is the only reliable disconnect signal (``websocket.disconnect``; STYLE P7, P10).
- The **writer** is the only task that calls ``send()``, so frame order, and seq order,
  is fixed by construction (P8). It reads the connection's bounded outbox, and when the
  outbox is empty it catches up lagging subscriptions from their run's log (P9).
- The **heartbeat** queues a ``heartbeat`` whenever nothing was sent for ``heartbeat_s``
  (P11), on the writer's last-send time: no cancel scope per event.

Whichever of them ends first ends the nursery, so no task outlives the connection. The
runs this connection follows live in the server nursery and go on without it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson
import structlog
import trio

from . import frame_json, uploads
from .agents.pacing import Pacer
from .base64_check import is_base64
from .errors import BadClientMessage, QueueFull, RunAlreadyActive, ShuttingDown
from .events import HEARTBEAT, MERGE_MAX_CHARS, SESSION_SYNC, Event, encode, error_frame
from .runs import IF_RUNNING, Run, RunRegistry, RunRequest, Subscriber
from .uploads import BadUpload

if TYPE_CHECKING:
    from .asgi_types import Receive, Send

log = structlog.get_logger("navi_trio.connection")

MAX_IMAGES: Final = 8
MAX_FILES: Final = 32
MAX_IMAGE_BYTES: Final = 50 * 1024 * 1024
EXPECTED_MESSAGE: Final = "Expected {type: 'message', content: '...'}"
ALREADY_RUNNING: Final = "Agent is already running for this session."
NO_RUN_TO_STOP: Final = "No active run to stop."

#: Close codes (CONTRACT section 3 and 7).
CLOSE_NOT_FOUND: Final = 4004
CLOSE_DENIED: Final = 4003
CLOSE_RESTART: Final = 1012
CLOSE_POLICY: Final = 1008

#: A delta that waited this long in the outbox means the reader is behind: the writer
#: then merges it with the same-kind deltas queued behind it.
MERGE_AFTER_S: Final = 0.005
MAX_PENDING_ANSWERS: Final = 32

_conn_ids = itertools.count(1)

#: What a connection's outbox carries: a run event (shared, encoded once), a ready frame
#: (heartbeat, error answer, session_sync), or None to wake the writer.
OutboxItem = Event | str | None


class Connection:
    """A subscriber connection: the :class:`~navi_trio.runs.Outbox` and
    :class:`~navi_trio.runs.Follower` of its session's runs."""

    __slots__ = (
        "_answers",
        "_max_message_chars",
        "_nursery",
        "_outbox_recv",
        "_outbox_send",
        "_pacer",
        "_receive",
        "_send",
        "_session_owner",
        "_uploads_root",
        "close_code",
        "close_reason",
        "heartbeat_s",
        "id",
        "lagging",
        "last_send",
        "registry",
        "session_id",
        "subscriptions",
        "user_id",
    )

    def __init__(
        self,
        registry: RunRegistry,
        session_id: str,
        user_id: str | None,
        send: Send,
        receive: Receive,
        *,
        heartbeat_s: float,
        outbox_size: int,
        uploads_root: Path | None = None,
        session_owner: str | None = None,
        max_message_chars: int = 100_000,
        pacer: Pacer | None = None,
    ) -> None:
        self.id = next(_conn_ids)
        self._uploads_root = uploads_root
        self._session_owner = session_owner
        self._max_message_chars = max_message_chars
        #: The shared timer: a parked heartbeat holds no cancel scope (an idle connection
        #: is the common case, so this is memory and wake-up cost per connection).
        self._pacer = pacer if pacer is not None else Pacer()
        self.registry = registry
        self.session_id = session_id
        self.user_id = user_id
        self._send = send
        self._receive = receive
        self.heartbeat_s = heartbeat_s
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[OutboxItem](outbox_size)
        # Plain lists, not deques: an idle connection is the common case, an empty deque
        # costs ~600 bytes, and these hold a handful of items at most.
        self.lagging: list[Subscriber] = []
        #: Answers to client messages: never block the receiver on a full outbox. Bounded:
        #: a client that floods bad messages and never reads loses the oldest answers.
        #: The shared empty tuple until the first answer, as for ``subscriptions`` until
        #: the first run: most connections never need either list (56 bytes each).
        self._answers: list[str] | tuple[()] = ()
        self.subscriptions: list[Subscriber] | tuple[()] = ()
        self.last_send = trio.current_time()
        self.close_code: int | None = None
        self.close_reason = ""
        self._nursery: trio.Nursery | None = None

    # -- Outbox ------------------------------------------------------------------------
    def offer(self, frame: OutboxItem) -> bool:
        try:
            self._outbox_send.send_nowait(frame)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def wake(self) -> None:
        self.offer(None)  # None is "look at lagging and close", not a frame

    # -- Follower ----------------------------------------------------------------------
    def run_started(self, run: Run) -> None:
        self._track(run.subscribe(self))

    def request_close(self, code: int, reason: str) -> None:
        """Close once everything queued and lagging has been written (or on cancel)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.wake()

    def _track(self, sub: Subscriber) -> None:
        self.subscriptions = [s for s in self.subscriptions if not s.run.settled or s.lagging]
        self.subscriptions.append(sub)

    # -- lifecycle ---------------------------------------------------------------------
    async def serve(self, resume_run_id: str | None = None, resume_after: int | None = None) -> None:
        """Run the connection until the client leaves or a close is requested.

        Cancellation: cancelling this (server shutdown past hypercorn's graceful timeout)
        sends close code 1012 within a shielded, bounded scope, then lets ``Cancelled`` go on.

        Resource handling: owns the outbox channel ends; unsubscribes from every run and
        stops following the session on the way out, whatever ends it.
        """
        structlog.contextvars.bind_contextvars(conn_id=self.id, session_id=self.session_id, user_id=self.user_id)
        log.info("ws.open")
        self.registry.metrics.tally.websockets += 1
        try:
            with self._outbox_send, self._outbox_recv:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    # A run whose terminal event is already out is over: wait for its save,
                    # so this client gets session_sync and finds the answer in the history.
                    await self.registry.current(self.session_id)
                    self._attach(resume_run_id, resume_after)
                    # Constant names: a name formatted per task is kept by it (~60 bytes
                    # each); the conn_id is in the log context.
                    nursery.start_soon(self._writer, name="ws-writer")
                    nursery.start_soon(self._heartbeat, name="ws-heartbeat")
                    await self._receiver()
                    nursery.cancel_scope.cancel(reason="client disconnected")
        except* trio.Cancelled:
            # Cancelled from outside (hypercorn's graceful timeout ran out): say 1012, not 1006.
            # The nursery delivers the Cancelled inside a group, hence except*.
            with trio.move_on_after(1.0, shield=True):
                await self._send({"type": "websocket.close", "code": CLOSE_RESTART, "reason": "Server restarting"})
            raise
        finally:
            self._detach()
            self.registry.metrics.tally.websockets -= 1
            log.info("ws.closed")

    def _attach(self, resume_run_id: str | None, resume_after: int | None) -> None:
        """Follow the session and subscribe to its active run, in one synchronous step."""
        run = self.registry.follow(self.session_id, self)
        if self.registry.closing.is_set():
            self.request_close(CLOSE_RESTART, "Server restarting")
            return
        if run is None:
            self.offer(SESSION_SYNC)
            return
        if resume_run_id is not None and resume_run_id == run.id and resume_after:
            self._track(run.subscribe(self, after=resume_after, replay=True))
            return
        if resume_run_id is not None and resume_run_id != run.id:
            self.offer(SESSION_SYNC)  # the run they knew is over: reload history, then follow this one
        self._track(run.subscribe(self, replay=True))

    def _detach(self) -> None:
        self.registry.unfollow(self.session_id, self)
        for sub in self.subscriptions:
            sub.run.unsubscribe(sub)
        self.subscriptions = ()
        self.lagging.clear()

    # -- the three tasks ---------------------------------------------------------------
    async def _writer(self) -> None:
        """The only task that calls ``send``. Ends after writing a requested close.

        When a delta has waited ``MERGE_AFTER_S`` or more in the outbox (earlier frames
        were still being sent: the reader is behind), it is written merged with the
        same-kind deltas queued behind it, with the seq of the last one. Nothing ever waits
        to make a batch, and a reader that keeps up gets every delta on its own.
        """
        send = self._send
        recv = self._outbox_recv
        lagging = self.lagging
        tally = self.registry.metrics.tally
        pending: OutboxItem = None
        item: OutboxItem
        while True:
            if self._answers:
                item = self._answers.pop(0)
            elif pending is not None:
                item, pending = pending, None
            else:
                empty = False
                try:
                    item = recv.receive_nowait()
                except trio.WouldBlock:
                    empty = True
                # Not in the except block: a writer parked there would keep the WouldBlock
                # and its traceback alive as long as the connection is idle (~400 bytes).
                if empty:
                    if lagging:
                        sub = lagging[0]
                        seen = sub.queued
                        item = sub.next_catch_up_frame()
                        if sub.queued - seen > 1:  # several events of the log in one frame
                            tally.frames_merged += 1
                        if item is None:
                            del lagging[0]
                            continue
                    elif self.close_code is not None:
                        await send({"type": "websocket.close", "code": self.close_code, "reason": self.close_reason})
                        assert self._nursery is not None
                        self._nursery.cancel_scope.cancel(reason="close requested")
                        return
                    else:
                        item = await recv.receive()
            if item is None:
                continue
            if isinstance(item, str):
                frame = item
            elif item.delta is None or trio.current_time() - item.t < MERGE_AFTER_S:
                frame = item.wire
            else:
                frame, pending = _coalesce(item, recv)
                if frame is not item.wire:
                    tally.frames_merged += 1
            await send({"type": "websocket.send", "text": frame})
            tally.frames_sent += 1
            self.last_send = trio.current_time()

    async def _heartbeat(self) -> None:
        hb = self.heartbeat_s
        while True:
            now = trio.current_time()
            due = self.last_send + hb
            if now >= due:
                if self.offer(HEARTBEAT):  # a full outbox means we are sending anyway
                    self.registry.metrics.tally.heartbeats_sent += 1
                self.last_send = now
                due = now + hb
            await self._pacer.sleep_until(due)

    async def _receiver(self) -> None:
        receive = self._receive
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            if kind != "websocket.receive":
                continue
            text = message.get("text")
            if text is None:
                raw = message.get("bytes") or b""
                try:
                    text = raw.decode()
                except UnicodeDecodeError:
                    await self._answer_error("Invalid JSON")
                    continue
            await self._handle(text)

    # -- client messages ---------------------------------------------------------------
    async def _answer_error(self, message: str) -> None:
        answers = self._answers
        if not isinstance(answers, list):
            answers = self._answers = []
        elif len(answers) >= MAX_PENDING_ANSWERS:
            del answers[0]
        answers.append(error_frame(message))
        self.wake()
        await trio.lowlevel.checkpoint()

    async def _handle(self, text: str) -> None:
        try:
            data = await frame_json.loads(text, images_checked_later=True)  # by check_base64
        except orjson.JSONDecodeError:
            await self._answer_error("Invalid JSON")
            return
        if isinstance(data, dict) and data.get("type") == "stop":
            # Waits for the run's end, so a message sent right after the stop can start.
            if await self.registry.stop_current(self.session_id) is None:
                await self._answer_error(NO_RUN_TO_STOP)
            return
        try:
            request, if_running = parse_message(data, self.session_id, self.user_id, self.id, self._max_message_chars)
            if self._uploads_root is not None:
                folder = uploads.session_dir(self._uploads_root, self._session_owner, self.session_id)
                request = attrs.evolve(request, upload_dir=folder)
            if request.images:
                await check_base64(request.images)
            files = data.get("files")
            if files is not None and files != []:
                request = await self._with_files(request, files)
            self.registry.submit(request, if_running)
        except RunAlreadyActive:
            await self._answer_error(ALREADY_RUNNING)
        except (BadClientMessage, BadUpload, QueueFull, ShuttingDown) as exc:
            await self._answer_error(str(exc))

    async def _with_files(self, request: RunRequest, files: Any) -> RunRequest:
        """Check that every named file is an upload of this session (metadata only, in a
        worker thread), and tell the agent where they are. Raises :class:`BadUpload`."""
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise BadClientMessage("files must be a list of {name, path} objects.")
        if len(files) > MAX_FILES:
            raise BadClientMessage(f"Too many files ({len(files)}). Max {MAX_FILES} allowed.")
        root = self._uploads_root
        if root is None:
            raise BadUpload("Uploads are not available on this server.")

        def check() -> list[str]:
            for f in files:
                uploads.resolve_upload(root, self._session_owner, self.session_id, f.get("name"), f.get("path"))
            return [f"- {f['name']} → {uploads.public_path(self.session_id, f['name'])}" for f in files]

        lines = await trio.to_thread.run_sync(check)
        note = "\n\n[Uploaded files on disk:\n" + "\n".join(lines) + "]"
        return attrs.evolve(request, content=request.content + note, files=[f["name"] for f in files])


def _coalesce(first: Event, recv: trio.MemoryReceiveChannel[OutboxItem]) -> tuple[str, OutboxItem]:
    """Merge ``first`` with the same-kind deltas queued right behind it.

    Returns the frame and the first item that did not fit (to be written next), if any.
    """
    try:
        nxt = recv.receive_nowait()
    except trio.WouldBlock:
        return first.wire, None
    if type(nxt) is not Event or nxt.type != first.type or nxt.delta is None:
        return first.wire, nxt
    assert first.delta is not None
    parts = [first.delta, nxt.delta]
    size = len(first.delta) + len(nxt.delta)
    last = nxt
    pending: OutboxItem = None
    while True:
        try:
            nxt = recv.receive_nowait()
        except trio.WouldBlock:
            break
        if type(nxt) is not Event or nxt.type != first.type or nxt.delta is None or size > MERGE_MAX_CHARS:
            pending = nxt
            break
        parts.append(nxt.delta)
        size += len(nxt.delta)
        last = nxt
    return encode({"type": first.type, "seq": last.seq, "delta": "".join(parts)}), pending


def parse_message(
    data: Any, session_id: str, user_id: str | None, conn_id: int | None = None, max_chars: int = 100_000
) -> tuple[RunRequest, str]:
    """Validate a client ``message`` (CONTRACT section 3's bad-input table).

    Raises :class:`BadClientMessage` whose text is the wire ``error.message``.
    """
    if not isinstance(data, dict) or data.get("type") != "message":
        raise BadClientMessage(EXPECTED_MESSAGE)
    content = data.get("content")
    if not isinstance(content, str) or not content or content.isspace():  # no copy, unlike strip()
        raise BadClientMessage(EXPECTED_MESSAGE)
    if len(content) > max_chars:
        raise BadClientMessage(f"Message too long ({len(content)} characters). Max {max_chars} allowed.")
    if_running = data.get("if_running", "reject")
    if if_running is None:
        if_running = "reject"
    if if_running not in IF_RUNNING:
        raise BadClientMessage("if_running must be 'reject', 'interrupt' or 'enqueue'.")
    images = _parse_images(data.get("images"))
    agent_content = content
    if images:
        n = len(images)
        noun = "image" if n == 1 else "images"
        agent_content += f"\n\n[{n} {noun} attached inline — already in your context, no extra loading needed.]"
    return RunRequest(session_id, user_id, agent_content, content, images, conn_id), if_running


def _parse_images(raw: Any) -> list[str]:
    """Count and size checks (CONTRACT section 3); the images are kept as sent, so a
    ``data:`` URL keeps its media type. Their base64 is checked by :func:`check_base64`."""
    if raw is None or raw == []:
        return []
    if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
        raise BadClientMessage("images must be a list of base64 strings or data: URLs.")
    if len(raw) > MAX_IMAGES:
        raise BadClientMessage(f"Too many images ({len(raw)}). Max {MAX_IMAGES} allowed.")
    total = 0
    for img in raw:
        total += len(img) - _payload_start(img)
        if total > MAX_IMAGE_BYTES:
            raise BadClientMessage("Total image payload exceeds 50 MB limit.")
    return list(raw)


def _payload_start(img: str) -> int:
    """Where the payload of a ``data:<head>,<payload>`` image begins (0 if it is not one),
    found without copying a 50 MB string."""
    if not img.startswith("data:"):
        return 0
    return img.find(",") + 1  # no comma: 0, the whole string counts


async def check_base64(images: list[str]) -> None:
    """Each image is base64, or a ``data:<type>;base64,<data>`` URL. Up to 50 MB, checked
    in chunks on the event loop (:mod:`~navi_trio.base64_check`), so other streams go on.
    Raises :class:`BadClientMessage`.

    Cancellation: a cancel between chunks ends the check; the message is not submitted.
    """
    for i, img in enumerate(images, start=1):
        start = 0
        if img.startswith("data:"):
            comma = img.find(",")
            if comma < 0 or not img.endswith(";base64", 0, comma):
                raise BadClientMessage(f"Image {i} is not a base64 data: URL.")
            start = comma + 1
        if not await is_base64(img, start):
            raise BadClientMessage(f"Image {i} is not valid base64.")

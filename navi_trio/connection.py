"""One WebSocket connection: a nursery of a receiver, one writer and a heartbeat.

- The **receiver** always drains ASGI ``receive()`` (hypercorn's reader stalls otherwise)
  and is the only reliable disconnect signal (``websocket.disconnect``; STYLE P7, P10).
  It never waits on a run: a stop is awaited by a short-lived task, and the messages that
  arrive meanwhile are held and handled, in order, once the stopped run has ended.
- The **writer** is the only task that calls ``send()``, so frame order, and seq order,
  is fixed by construction (P8). It reads the connection's bounded outbox, and when the
  outbox is empty it catches up lagging subscriptions from their run's log (P9,
  ``catchup.py``). It reports each run's terminal event once it is on the wire.
- The **heartbeat** queues a ``heartbeat`` whenever nothing was sent for ``heartbeat_s``
  (P11), on the writer's last-send time: no cancel scope per event.

Whichever of them ends first ends the nursery, so no task outlives the connection. The
runs this connection follows live in the server nursery and go on without it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

import orjson
import structlog
import trio

from . import frame_json
from .agents.pacing import Pacer
from .catchup import EMPTY, CatchUp, coalesce
from .errors import BadClientMessage, QueueFull, RunAlreadyActive, ShuttingDown
from .events import HEARTBEAT, SESSION_SYNC, TERMINAL_TYPES, Event, error_frame
from .messages import is_stop, run_request
from .uploads import BadUpload

if TYPE_CHECKING:
    from .asgi_types import Receive, Send
    from .fanout import Subscriber
    from .lifecycle import Run
    from .runs import RunRegistry

log = structlog.get_logger("navi_trio.connection")

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
#: Client messages held while a stop ends its run; past this the receiver waits for it
#: (the client is then pushed back by TCP, as by any reader that does not keep up).
MAX_HELD: Final = 32

_conn_ids = itertools.count(1)

#: What a connection's outbox carries: a run event (shared, encoded once), a ready frame
#: (heartbeat, error answer, session_sync), or None to wake the writer.
OutboxItem = Event | str | None


class Connection:
    """A subscriber connection: the :class:`~navi_trio.fanout.Outbox` and
    :class:`~navi_trio.fanout.Follower` of its session's runs."""

    __slots__ = (
        "_answers",
        "_held",
        "_held_done",
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
        #: The subscriptions catching up from their run's log (only the writer takes).
        self.lagging: CatchUp[Subscriber] = CatchUp()
        #: Client frames that arrived while a stop ends its run (None: no stop pending).
        self._held: list[str] | None = None
        self._held_done: trio.Event | None = None
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

    def fall_behind(self, sub: Subscriber) -> None:
        self.lagging.append(sub)

    @property
    def behind(self) -> bool:
        return bool(self.lagging)

    # -- Follower ----------------------------------------------------------------------
    def run_started(self, run: Run) -> None:
        self._track(self.registry.local.subscribe(run, self))

    def request_close(self, code: int, reason: str) -> None:
        """Close once everything queued and lagging has been written (or on cancel)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.wake()

    def _track(self, sub: Subscriber) -> None:
        sub.reports_wire = True  # the writer says when the run's terminal event is sent
        self.subscriptions = [s for s in self.subscriptions if not s.run.settled or s.lagging]
        self.subscriptions.append(sub)

    def _on_wire(self, terminal: Event) -> None:
        for sub in self.subscriptions:
            if sub.awaiting_wire and sub.run.log.terminal is terminal:
                sub.on_wire()

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
        local = self.registry.local
        run = local.follow(self.session_id, self)
        if self.registry.closing.is_set():
            self.request_close(CLOSE_RESTART, "Server restarting")
            return
        if run is None:
            self.offer(SESSION_SYNC)
            return
        if resume_run_id is not None and resume_run_id == run.id and resume_after:
            self._track(local.subscribe(run, self, after=resume_after, replay=True))
            return
        if resume_run_id is not None and resume_run_id != run.id:
            self.offer(SESSION_SYNC)  # the run they knew is over: reload history, then follow this one
        self._track(local.subscribe(run, self, replay=True))

    def _detach(self) -> None:
        local = self.registry.local
        local.unfollow(self.session_id, self)
        for sub in self.subscriptions:
            local.unsubscribe(sub)
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
        terminal: Event | None
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
                        caught = lagging.next_frame()
                        if caught is None:
                            continue
                        item, carried = caught
                        if carried > 1:  # several events of the log in one frame
                            tally.frames_merged += 1
                    elif self.close_code is not None:
                        await send({"type": "websocket.close", "code": self.close_code, "reason": self.close_reason})
                        assert self._nursery is not None
                        self._nursery.cancel_scope.cancel(reason="close requested")
                        return
                    else:
                        item = await recv.receive()
            if item is None:
                continue
            terminal = None
            if isinstance(item, str):
                frame = item
            elif item.delta is None:
                frame = item.wire
                if item.type in TERMINAL_TYPES:
                    terminal = item
            elif trio.current_time() - item.t < MERGE_AFTER_S:
                frame = item.wire
            else:
                frame, nxt = coalesce(item, recv.receive_nowait, trio.WouldBlock)
                pending = None if nxt is EMPTY else cast("OutboxItem", nxt)
                if frame is not item.wire:
                    tally.frames_merged += 1
            await send({"type": "websocket.send", "text": frame})
            tally.frames_sent += 1
            self.last_send = trio.current_time()
            if terminal is not None:
                self._on_wire(terminal)

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
                    text = ""  # answered "Invalid JSON" in its turn, like any frame that is not JSON
            held = self._held
            if held is None:
                await self._handle(text)
                continue
            held.append(text)  # a stop is ending the run: handled in order after it
            if len(held) >= MAX_HELD and self._held_done is not None:
                await self._held_done.wait()

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

    async def _handle(self, text: str, *, in_stop: bool = False) -> None:
        try:
            data = await frame_json.loads(text, images_checked_later=True)  # by check_base64
        except orjson.JSONDecodeError:
            await self._answer_error("Invalid JSON")
            return
        if is_stop(data):
            if in_stop:
                await self._stop_run()
            else:
                self._begin_stop()
            return
        try:
            request, if_running = await run_request(
                data,
                session_id=self.session_id,
                user_id=self.user_id,
                conn_id=self.id,
                max_chars=self._max_message_chars,
                uploads_root=self._uploads_root,
                session_owner=self._session_owner,
                store=self.registry.store,
            )
            await self.registry.admit(request, if_running)
        except RunAlreadyActive:
            await self._answer_error(ALREADY_RUNNING)
        except (BadClientMessage, BadUpload, QueueFull, ShuttingDown) as exc:
            await self._answer_error(str(exc))

    async def _stop_run(self) -> None:
        if await self.registry.stop_current(self.session_id) is None:
            await self._answer_error(NO_RUN_TO_STOP)

    def _begin_stop(self) -> None:
        """Hold what the client sends from now on, and stop the run in a task of this
        connection's nursery: the receiver goes on draining meanwhile."""
        self._held = []
        self._held_done = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._stop, name="ws-stop")

    async def _stop(self) -> None:
        """The client's stop: wait until the run has really ended and its answer is saved,
        so that a message sent right after the stop can start; then handle the messages
        held meanwhile, in order (a stop among them is waited for here too).

        Cancellation: the connection going away ends the wait; the run still stops, since
        the stop was requested before any wait (``RunRegistry.stop_current``).
        """
        held = self._held
        assert held is not None
        assert self._held_done is not None
        await self._stop_run()
        while held:
            await self._handle(held.pop(0), in_stop=True)
        self._held = None  # no checkpoint since the last check: nothing is left behind
        self._held_done.set()
        self._held_done = None

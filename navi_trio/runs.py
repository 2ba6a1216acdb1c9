"""Runs and the run registry: one run per session, each in its own ``CancelScope``.

Runs live in the server-lifetime nursery opened by the lifespan task, never in a
connection's nursery, so a client disconnect cannot cancel a run (STYLE P2, P3).

A run's events go to its :class:`~navi_trio.events.RunLog` first (the source of truth),
then to each subscriber's bounded outbox with ``send_nowait``. A subscriber whose outbox
is full is marked *lagging* and skipped; its connection's writer catches it up from the
log, merging deltas, then re-arms it (STYLE P9). The run never waits for a reader.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import structlog
import trio

from .errors import AgentError, QueueFull, RunAlreadyActive, SessionGone, ShuttingDown, StoreError
from .events import REPLAY_END, SESSION_SYNC, Event, RunLog, count_frames, replay_start_frame
from .metrics import Metrics
from .store.base import Answer, NewRun, utc_now

if TYPE_CHECKING:
    from .agents.base import Agent
    from .store.base import Store

log = structlog.get_logger("navi_trio.runs")

#: Answer status saved for each terminal event / stop reason.
STATUS_FOR_REASON = {"user": "stopped", "deleted": "stopped", "shutdown": "interrupted"}
#: Scheduler passes a settling run lets go by before its save starts, so that the
#: writers have put a cut-short tool_call and the terminal event on the wire: hypercorn
#: yields twice per frame (its send lock, the socket send), and counting passes on a real
#: server, the terminal event's send returned 5 passes after it was published.
FLUSH_PASSES = 5


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # built outside a trio run (a unit test): no arrival time
        return float("nan")


@attrs.frozen
class RunRequest:
    """A validated user message, ready to become a run."""

    session_id: str
    user_id: str | None
    content: str  # what the agent sees (notes for images and files appended)
    original_content: str  # what the history shows as the user's message
    images: list[str] = attrs.field(factory=list)
    #: The connection the message came from (for the log: a run outlives it).
    conn_id: int | None = None
    #: Names of this session's uploads the message refers to (checked on arrival).
    files: list[str] = attrs.field(factory=list)
    #: This session's upload folder (tools read only there).
    upload_dir: Path | None = None
    #: When the message arrived, on trio's clock (time to first delta is measured from it).
    received_at: float = attrs.field(factory=_now)

    def saved_as(self, answer_id: str) -> NewRun:
        """What the store keeps of this message: the user's message and the id of its
        answer (saved when its run starts, or at shutdown if it was still queued)."""
        return NewRun(self.session_id, uuid.uuid4().hex, self.original_content, answer_id, utc_now())


@attrs.frozen
class Queued:
    """A request waiting for the session's active run to end."""

    request: RunRequest
    #: Sent with ``if_running: "interrupt"``: it stops whatever runs before it.
    interrupted: bool = False


class Outbox(Protocol):
    """A connection's side of its subscriptions (implemented by ``Connection``)."""

    lagging: list[Subscriber]

    def offer(self, frame: Event | str) -> bool:
        """``send_nowait`` into the outbox; False when it is full (or gone)."""
        ...

    def wake(self) -> None:
        """Make the writer look at ``lagging`` even if nothing else is queued."""
        ...


class Follower(Protocol):
    """A connection following a session: it subscribes to every run of it."""

    @property
    def user_id(self) -> str | None: ...

    def run_started(self, run: Run) -> None: ...

    def request_close(self, code: int, reason: str) -> None: ...


@attrs.define(eq=False, slots=True)
class Subscriber:
    """One connection's place in one run.

    ``queued`` is the seq of the last event handed to the outbox (or written during
    catch-up). ``prelude`` holds replay frames to write first. ``sync_after`` asks for a
    ``session_sync`` once the run is over and its answer saved.
    """

    run: Run
    outbox: Outbox
    queued: int = 0
    lagging: bool = False
    #: At most two frames (stream_start, replay_start): a list, not a deque (~600 bytes
    #: each), since there is one Subscriber per connection per run.
    prelude: list[str] = attrs.Factory(list)
    #: While replaying: the seq the replay ends at (``replay_end`` is written after it).
    replay_until: int | None = None
    sync_after: bool = False
    synced: bool = False

    def fall_behind(self) -> None:
        if not self.lagging:
            self.lagging = True
            self.outbox.lagging.append(self)

    def next_catch_up_frame(self) -> str | None:
        """The next frame this lagging subscriber needs, or None once it is caught up
        (it is then re-armed: live events reach it through the outbox again)."""
        if self.prelude:
            return self.prelude.pop(0)
        run = self.run
        if self.replay_until is not None:
            if self.queued < self.replay_until:
                frame, self.queued = run.log.next_frame(self.queued, self.replay_until)
                return frame
            self.replay_until = None
            return REPLAY_END
        if self.queued < len(run.log.events):
            frame, self.queued = run.log.next_frame(self.queued)
            return frame
        if run.settled and self.sync_after and not self.synced:
            self.synced = True
            return SESSION_SYNC
        self.lagging = False
        return None


@attrs.define(eq=False)
class Run:
    """One agent turn. Implements the agent's :class:`~navi_trio.agents.base.RunContext`."""

    request: RunRequest
    id: str = attrs.Factory(lambda: uuid.uuid4().hex)
    answer_id: str = attrs.Factory(lambda: uuid.uuid4().hex)
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    subscribers: list[Subscriber] = attrs.Factory(list)
    done: trio.Event = attrs.Factory(trio.Event)
    stop_reason: str | None = None
    #: Set when the store failed while this run streamed: the run ends with ``error``.
    failure: str | None = None
    #: ``log.answer_changes`` as of the last checkpoint: what the store holds.
    checkpointed: int = 0
    #: NAVI_MAX_RUN_EVENTS: the log never holds more (what the agent emits past it is
    #: dropped, and the run ends with an ``error`` saying so).
    max_events: int = 200_000
    #: Tools whose ``tool_started`` was dropped past ``max_events`` and not yet finished
    #: (the innermost, since nothing starts after the bound): their ``tool_call`` is too.
    dropped_tools: int = 0
    #: Loaded before the agent plays, for agents that want it.
    history: list[dict[str, Any]] = attrs.Factory(list)
    summary: str | None = None
    store: Store | None = None
    #: True once the answer is saved (or its save gave up) and the run is deregistered.
    settled: bool = False
    log: RunLog = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.log = RunLog(self.id, clock=trio.current_time)

    # -- RunContext --------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self.request.session_id

    @property
    def user_id(self) -> str | None:
        return self.request.user_id

    @property
    def content(self) -> str:
        return self.request.content

    @property
    def user_message(self) -> str:
        return self.request.original_content

    @property
    def images(self) -> list[str]:
        return self.request.images

    @property
    def upload_dir(self) -> Path | None:
        return self.request.upload_dir

    async def save_summary(self, summary: str, through_message_id: str) -> None:
        if self.store is not None:
            await self.store.save_summary(self.session_id, summary, through_message_id)

    def emit_thinking(self, delta: str) -> None:
        if self._has_room():
            self.publish(self.log.thinking_delta(delta))

    def emit_thinking_end(self) -> None:
        self.publish(self.log.thinking_end())  # closes, never adds to what must be closed

    def emit_text(self, delta: str) -> None:
        if self._has_room():
            self.publish(self.log.text_delta(delta))

    def emit_tool_started(self, tool: str, args: Any, *, is_subagent: bool = False) -> None:
        if self._has_room():
            self.publish(self.log.tool_started(tool, args, is_subagent=is_subagent))
        else:
            self.dropped_tools += 1

    def emit_tool_call(self, result: str, *, success: bool) -> None:
        if self.dropped_tools:  # its tool_started was dropped past the bound: so is this
            self.dropped_tools -= 1
            return
        self.publish(self.log.tool_call(result, success=success))

    def emit_context_compressed(self) -> None:
        if self._has_room():
            self.publish(self.log.context_compressed())

    def _has_room(self) -> bool:
        """Whether one more agent event fits under :attr:`max_events` with room left for
        what closes the run; if not, the run is ended with an ``error`` saying so (at
        the agent's next checkpoint) and the event is dropped."""
        if self.log.has_room(self.max_events):
            return True
        self.fail(f"The answer reached the limit of {self.max_events} events (NAVI_MAX_RUN_EVENTS) and was ended.")
        return False

    # -- fan-out -----------------------------------------------------------------------
    def publish(self, events: list[Event]) -> None:
        """Offer freshly logged events to every armed subscriber, never blocking.

        The hot path: one ``send_nowait`` of a shared, already-encoded ``str`` per
        subscriber per event. A full outbox makes that subscriber lagging.
        """
        for sub in self.subscribers:
            if sub.lagging:
                continue
            offer = sub.outbox.offer
            for ev in events:
                if not offer(ev):
                    sub.fall_behind()
                    break
                sub.queued = ev.seq

    def cancel(self, reason: str) -> None:
        """Stop the run (``scope.cancel()``); the first reason given wins, and a run that
        already wrote its terminal event keeps the reason it ended with."""
        if self.stop_reason is None and not self.log.finished:
            self.stop_reason = reason
        self.cancel_scope.cancel(reason=f"stop: {reason}")

    def fail(self, message: str) -> None:
        """End the run with a terminal ``error`` (a storage fault, the event bound), unless
        it is already stopping or over."""
        if self.stop_reason is None and self.failure is None and not self.log.finished:
            self.failure = message
            self.cancel_scope.cancel(reason="storage fault")

    def subscribe(self, outbox: Outbox, *, after: int | None = None, replay: bool = False) -> Subscriber:
        """Add a subscriber. Synchronous, so nothing can slip in between what it is
        given from the log and what it is sent live: no gap, no duplicate.

        - ``replay=False``: a follower from the start (``after`` ignored; the run is new).
        - ``replay=True, after=None``: attach: stream_start, replay_start, the rest, replay_end.
        - ``replay=True, after=N``: resume: stream_start (seq 1, as every attach begins),
          replay_start, the events with seq > N, replay_end.
        """
        sub = Subscriber(self, outbox)
        if replay:
            # The replay is merged like any catch-up; its frames are counted now and built
            # from the log as they are written, so nothing is copied ahead of time.
            events = self.log.events
            n = len(events)
            start = 1 if after is None else min(max(after, 1), n)
            sub.prelude.append(events[0].wire)
            sub.prelude.append(replay_start_frame(count_frames(events, start, n)))
            sub.queued = start
            sub.replay_until = n
            sub.sync_after = True
        if replay or outbox.lagging:
            # Order across runs: a later run must not overtake an earlier one still catching up.
            sub.fall_behind()
            outbox.wake()
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with contextlib.suppress(ValueError):
            self.subscribers.remove(sub)

    def answer(self, status: str) -> Answer:
        return Answer(
            id=self.answer_id,
            session_id=self.session_id,
            status=status,
            content=self.log.content,
            thinking=self.log.thinking_text,
            tool_calls=[t.as_dict() for t in self.log.tool_calls],
        )


def answer_status(run: Run) -> str:
    """The status a run's answer is saved with, from its terminal event (and stop reason)."""
    terminal = run.log.terminal
    assert terminal is not None
    if terminal.type == "stream_end":
        return "complete"
    if terminal.type == "error":
        return "error"
    return STATUS_FOR_REASON.get(run.stop_reason or "user", "stopped")


class RunRegistry:
    """The server's runs: at most one active run per session, plus a bounded queue.

    Every method that decides whether a run starts is synchronous: check and register
    happen with no checkpoint in between, so two messages cannot both start a run.
    """

    def __init__(
        self,
        server_nursery: trio.Nursery,
        store: Store,
        agent: Agent,
        *,
        save_timeout_s: float = 5.0,
        max_queued_runs: int = 4,
        max_run_events: int = 200_000,
        metrics: Metrics | None = None,
    ) -> None:
        self._nursery = server_nursery
        self.metrics = metrics if metrics is not None else Metrics.detached()
        self.store = store
        self._agent = agent
        self._save_timeout_s = save_timeout_s
        self._max_queued = max_queued_runs
        self._max_run_events = max_run_events
        #: The agent's own check of a message before its run starts, if it has one.
        self._check_message = getattr(agent, "check_message", None)
        self._active: dict[str, Run] = {}
        self._queues: dict[str, deque[Queued]] = {}
        #: Lists, not sets: a session has a follower or two, and an empty set costs 216
        #: bytes (a session per idle connection is the common case).
        self._followers: dict[str, list[Follower]] = {}
        #: Set when shutdown begins: no new runs from then on.
        self.closing = trio.Event()
        #: Set once every run has ended after shutdown began.
        self.closed = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._run_started = trio.Event()
        #: Final answers the store refused (locked, read-only, full): retried every
        #: checkpoint tick until they are in, so no failed answer stays hidden as running.
        self._unsaved: dict[str, Answer] = {}
        #: Runs waiting for their user message to be saved; written together (below).
        self._begins: list[tuple[NewRun, trio.Event, list[StoreError | None]]] = []
        self._begin_flusher = False

    # -- lookups -----------------------------------------------------------------------
    def active(self, session_id: str) -> Run | None:
        return self._active.get(session_id)

    @property
    def runs(self) -> list[Run]:
        return list(self._active.values())

    @property
    def queued_count(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    @property
    def unsaved_count(self) -> int:
        return len(self._unsaved)

    async def current(self, session_id: str) -> Run | None:
        """The session's active run as a client sees it: a run whose terminal event is
        already out is over, so it is waited for until its answer is saved; then whatever
        runs next (a queued message's run) is the answer, or ``None``.

        The terminal event goes to the writers a few scheduler passes before the save
        starts (``FLUSH_PASSES``), and the save takes a worker thread. A client that saw
        ``stream_end`` and at once reloads the history, reconnects, or presses stop must
        find the run over and its answer saved, not a run still "active".

        Cancellation: only waits on ``run.done``, which the run's shielded save sets
        within ``save_timeout_s``; a cancel just ends the wait.
        """
        run = self._active.get(session_id)
        while run is not None and run.log.finished:
            await run.done.wait()
            run = self._active.get(session_id)
        return run

    async def wait_idle(self) -> None:
        """Return once no run is active (every run ended and its answer saved)."""
        await self._idle.wait()

    # -- followers ---------------------------------------------------------------------
    def follow(self, session_id: str, follower: Follower) -> Run | None:
        """Register a connection for every future run of the session; return the active
        run (if any) so the caller can subscribe to it in the same synchronous step."""
        followers = self._followers.setdefault(session_id, [])
        if follower not in followers:
            followers.append(follower)
        return self._active.get(session_id)

    def unfollow(self, session_id: str, follower: Follower) -> None:
        followers = self._followers.get(session_id)
        if followers is not None and follower in followers:
            followers.remove(follower)
            if not followers:
                del self._followers[session_id]

    def followers(self, session_id: str) -> list[Follower]:
        return list(self._followers.get(session_id, ()))

    @property
    def follower_count(self) -> int:
        return sum(len(f) for f in self._followers.values())

    def connections_of(self, user_id: str) -> int:
        return sum(1 for fs in self._followers.values() for f in fs if f.user_id == user_id)

    async def serve_revocations(self, interval_s: float) -> None:
        """Close the connections of users revoked since they connected, within
        ``interval_s`` (revocation happens in another process: the CLI).

        Reads the store only while some connection belongs to a user. A store fault is
        logged and retried at the next tick.
        """
        while True:
            await trio.sleep(interval_s)
            if not any(f.user_id is not None for fs in self._followers.values() for f in fs):
                continue
            try:
                revoked = await self.store.revoked_user_ids()
            except StoreError as exc:
                log.error("revocations.check_failed", error=str(exc))
                continue
            for fs in list(self._followers.values()):
                for f in list(fs):
                    if f.user_id in revoked:
                        f.request_close(4003, "Token revoked")

    # -- starting and stopping ---------------------------------------------------------
    def submit(self, request: RunRequest, if_running: str = "reject") -> Run | None:
        """Start a run for ``request`` now, or as ``if_running`` says when one is active.

        Returns the new run, or None when the request was queued (``enqueue``, or
        ``interrupt``: it starts as soon as the stopped run has ended).

        Raises:
            BadClientMessage: the agent refuses the message (a script over its bounds).
            RunAlreadyActive: ``reject`` and a run is active.
            QueueFull: ``enqueue`` and the session's queue is at its bound.
            ShuttingDown: the server is draining.
        """
        if self.closing.is_set():
            raise ShuttingDown("The server is shutting down; try again shortly.")
        if self._check_message is not None:
            self._check_message(request.original_content)
        sid = request.session_id
        active = self._active.get(sid)
        if active is None:
            return self._start(request)
        queue = self._queues.setdefault(sid, deque())
        if active.log.finished and not queue:
            # The active run has written its terminal event and is only saving its answer:
            # to the client it is over, so this message starts as soon as the save is done.
            queue.append(Queued(request))
            return None
        if if_running == "reject":
            if not queue:
                del self._queues[sid]
            raise RunAlreadyActive(sid)
        if len(queue) >= self._max_queued:
            raise QueueFull(f"Too many queued messages for this session (max {self._max_queued}).")
        if if_running == "enqueue":
            queue.append(Queued(request))
        else:
            # interrupt: stop what runs and go next, behind interrupts already waiting (each
            # of those will start and be stopped in turn, so every message keeps its place).
            at = 0
            while at < len(queue) and queue[at].interrupted:
                at += 1
            queue.insert(at, Queued(request, interrupted=True))
            active.cancel("user")
        return None

    def _start(self, request: RunRequest) -> Run:
        run = Run(request, max_events=self._max_run_events)
        self._active[request.session_id] = run
        self._idle = trio.Event()
        self._run_started.set()
        for follower in self._followers.get(request.session_id, ()):
            follower.run_started(run)
        run.publish([run.log.start()])
        self._nursery.start_soon(self._run_task, run, name=f"run:{run.id}")
        return run

    def stop(self, session_id: str, reason: str = "user") -> Run | None:
        """Cancel the session's active run, if any (synchronous; await ``run.done``)."""
        run = self._active.get(session_id)
        if run is not None:
            run.cancel(reason)
        return run

    async def stop_current(self, session_id: str) -> Run | None:
        """A client's stop: cancel the run :meth:`current` gives (one whose terminal
        event is already out is over, not stopped) and return it once it has really
        ended, its answer saved; or ``None`` when nothing runs.

        Cancellation: the run is cancelled before any wait, so a cancel of the caller
        only ends the wait; the run still ends and saves in its own shielded cleanup.
        """
        asked_at = trio.current_time()
        run = await self.current(session_id)
        if run is not None:
            run.cancel("user")  # no checkpoint since current(): still the active run
            await run.done.wait()
            self.metrics.stop_answered(asked_at)
        return run

    def forget_session(self, session_id: str) -> None:
        """Drop what was queued for a session that is being deleted."""
        self._queues.pop(session_id, None)

    # -- the run task ------------------------------------------------------------------
    async def _run_task(self, run: Run) -> None:
        """Play the agent inside the run's own cancel scope, then settle.

        Cancellation: ``run.cancel()`` (stop, DELETE, drain) is caught by the run's scope and
        gives ``stream_stopped`` with that reason. A cancel from outside (the server nursery
        going away) also ends in ``stream_stopped`` with reason ``shutdown``, written in the
        ``finally`` before the ``Cancelled`` goes on.

        Error handling: no ``Exception`` leaves this task (STYLE P6); it becomes the terminal
        ``error`` event and is logged.
        """
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            session_id=run.session_id, run_id=run.id, conn_id=run.request.conn_id, user_id=run.user_id
        )
        req = run.request
        log.info("run.started")
        self.metrics.run_began(run)
        try:
            if getattr(self._agent, "wants_history", False):
                run.store = self.store
                run.summary, run.history = await self.store.load_context(req.session_id)
            # The user's message is saved even if a stop lands at once: shielded, bounded.
            with trio.move_on_after(self._save_timeout_s, shield=True) as begin_scope:
                await self._begin(req.saved_as(run.answer_id))
            if begin_scope.cancelled_caught:
                raise StoreError("timed out saving the user's message")
            with run.cancel_scope:
                await trio.lowlevel.checkpoint_if_cancelled()  # stopped while saving: play nothing
                await self._agent.play(run)
            if not run.cancel_scope.cancelled_caught:
                run.publish(run.log.end())
            elif run.failure is not None:
                run.publish(run.log.error(run.failure))
            else:
                run.publish(run.log.stopped(run.stop_reason or "user"))
        except AgentError as exc:
            log.info("run.agent_error", error=str(exc))
            run.publish(run.log.error(str(exc)))
        except SessionGone:
            # A message that raced its session's DELETE: the run ends as a deleted
            # session's runs do. Nothing failed, so nothing is logged as an error.
            log.info("run.session_gone")
            run.stop_reason = "deleted"
            run.publish(run.log.stopped("deleted"))
        except StoreError as exc:
            log.error("run.store_error", error=str(exc))
            run.publish(run.log.error(f"Storage error: {exc}"))
        except Exception:
            log.exception("run.crashed")
            run.publish(run.log.error("The agent failed unexpectedly; the error was logged."))
        finally:
            if not run.log.finished:  # cancelled from outside the run's own scope
                run.stop_reason = run.stop_reason or "shutdown"
                run.publish(run.log.stopped(run.stop_reason))
            with trio.move_on_after(self._save_timeout_s, shield=True) as save_scope:
                # The writers send the terminal event first: the save's worker thread would
                # otherwise compete with them for the CPU (bench scenario 4: ~1 ms later).
                for _ in range(FLUSH_PASSES):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                await self._save(run)
            if save_scope.cancelled_caught:
                log.error("run.save_timed_out", timeout_s=self._save_timeout_s)
            self._finish(run)

    async def _begin(self, new_run: NewRun) -> None:
        """Save a run's user message (and its running answer), group-committed: all runs
        starting at the same moment share one transaction, written by a flusher task in the
        server nursery that lives only while there is something to write.

        Cancellation: the caller waits in a shielded, bounded scope; the flusher's write is
        shielded and bounded too. Raises :class:`StoreError`.
        """
        done = trio.Event()
        result: list[StoreError | None] = [None]
        self._begins.append((new_run, done, result))
        if not self._begin_flusher:
            self._begin_flusher = True
            self._nursery.start_soon(self._flush_begins, name="begin-runs")
        await done.wait()
        if result[0] is not None:
            raise result[0]

    async def _flush_begins(self) -> None:
        try:
            while self._begins:
                batch, self._begins = self._begins, []
                errors: list[StoreError | None] = [None] * len(batch)
                with trio.move_on_after(self._save_timeout_s, shield=True) as scope:
                    try:
                        with self.metrics.store_op("begin"):
                            await self.store.begin_runs([b[0] for b in batch])
                    except StoreError as exc:
                        if len(batch) == 1:
                            errors[0] = exc
                        else:  # one bad row (a session just deleted) must not fail the others
                            for i, (new_run, _, _) in enumerate(batch):
                                try:
                                    await self.store.begin_runs([new_run])
                                except StoreError as one:
                                    errors[i] = one
                if scope.cancelled_caught:
                    errors = [e or StoreError("timed out saving the user's message") for e in errors]
                for (_, done, result), error in zip(batch, errors, strict=True):
                    result[0] = error
                    done.set()
        finally:
            self._begin_flusher = False
            for _, done, result in self._begins:  # cancelled with work left: fail it, don't hang
                result[0] = StoreError("the server stopped before the message was saved")
                done.set()
            self._begins = []

    async def _save(self, run: Run) -> None:
        """Save the answer with the status its terminal event gives; log a store fault.

        Cancellation: called only inside the shielded, time-bounded scope of ``_run_task``.
        """
        status = answer_status(run)
        answer = run.answer(status)
        try:
            with self.metrics.store_op("save"):
                await self.store.save_answer(answer)
        except StoreError as exc:
            log.error("run.save_failed", error=str(exc), retry_every_s="checkpoint interval")
            self._unsaved[answer.id] = answer
            self._run_started.set()  # wake the checkpoint task to retry
        log.info("run.ended", status=status, last_seq=run.log.last_seq, reason=run.stop_reason)

    def _finish(self, run: Run) -> None:
        """Synchronous end of a run: deregister, tell re-attached readers to sync, then
        start the session's next queued request (if any)."""
        sid = run.session_id
        if self._active.get(sid) is run:
            del self._active[sid]
        run.settled = True
        for sub in run.subscribers:
            if sub.sync_after and not sub.lagging and not sub.synced:
                if sub.outbox.offer(SESSION_SYNC):
                    sub.synced = True
                else:
                    sub.fall_behind()
        run.subscribers.clear()  # lagging readers keep the run through their Subscriber
        self.metrics.run_ended(run, answer_status(run))
        run.done.set()
        queue = self._queues.get(sid)
        if queue:
            nxt = queue.popleft()
            if not queue:
                del self._queues[sid]
            # Never during shutdown: drain() empties the queues (saving what they held)
            # in the same step that makes submit() refuse new requests.
            started = self._start(nxt.request)
            if queue and queue[0].interrupted:
                started.cancel("user")  # a later message already interrupted this one
        if not self._active:
            self._idle.set()

    # -- checkpoints -------------------------------------------------------------------
    async def serve_checkpoints(self, interval_s: float) -> None:
        """Save the text of every running answer every ``interval_s``, for all runs in one
        store transaction, so a hard kill loses at most about that much (CONTRACT 7).

        Runs with nothing new to save are skipped (a run waiting on a tool writes nothing
        until the tool's result or new text arrives); with no active run this task sleeps
        on an event, not a timer. A store fault ends the affected runs with a terminal
        ``error`` naming it (``Run.fail``); the server goes on.

        Cancellation: runs until the server nursery is cancelled; a checkpoint cut short
        is harmless, since every run's final save follows anyway.
        """
        while True:
            if not self._active and not self._unsaved:
                self._run_started = trio.Event()
                await self._run_started.wait()
            await trio.sleep(interval_s)
            await self._retry_unsaved()
            active = self._active.values()
            dirty = [r for r in active if not r.log.finished and r.checkpointed < r.log.answer_changes]
            if not dirty:
                continue
            changes = [r.log.answer_changes for r in dirty]
            try:
                with trio.move_on_after(self._save_timeout_s) as scope, self.metrics.store_op("checkpoint"):
                    await self.store.checkpoint([r.answer("running") for r in dirty])
                if scope.cancelled_caught:
                    raise StoreError("timed out saving answers in progress")
            except StoreError as exc:
                log.error("checkpoint.failed", error=str(exc), runs=len(dirty))
                for r in dirty:
                    r.fail(f"Storage error: {exc}")
                continue
            for r, n in zip(dirty, changes, strict=True):
                r.checkpointed = n

    async def _retry_unsaved(self) -> None:
        for answer_id, answer in list(self._unsaved.items()):
            try:
                with trio.move_on_after(self._save_timeout_s), self.metrics.store_op("save"):
                    await self.store.save_answer(answer)
                    del self._unsaved[answer_id]
                    log.info("run.save_retried", answer_id=answer_id, status=answer.status)
            except StoreError:
                return  # still failing: try again at the next tick

    # -- shutdown ----------------------------------------------------------------------
    async def drain(self, grace_s: float) -> None:
        """Refuse new runs, save the messages still queued (their runs will not start),
        give active runs ``grace_s`` to finish, then stop the rest with reason
        ``shutdown``; set :attr:`closed` when every run has ended and been saved.

        Cancellation: if this task is cancelled, runs still get cancelled by the server
        nursery going away, and each still writes its terminal event and saves.
        """
        self.closing.set()
        unstarted = [queued.request for queue in self._queues.values() for queued in queue]
        self._queues.clear()
        if unstarted:
            await self._keep_unstarted(unstarted)
        with trio.move_on_after(grace_s):
            await self._idle.wait()
        for run in self.runs:
            run.cancel("shutdown")
        with trio.move_on_after(self._save_timeout_s + 1.0):
            await self._idle.wait()
        self.closed.set()

    async def _keep_unstarted(self, requests: list[RunRequest]) -> None:
        """Save the messages still queued when shutdown begins, each with an empty
        ``interrupted`` answer: their runs never start, but no message the user sent is
        lost. The history shows it after the restart, and the user can send it again.

        Cancellation: shielded and bounded by ``save_timeout_s``, like a run's final save.
        """
        with trio.move_on_after(self._save_timeout_s, shield=True) as scope:
            for req in requests:
                new_run = req.saved_as(uuid.uuid4().hex)
                answer = Answer(new_run.answer_id, req.session_id, "interrupted", "", "", [])
                try:
                    await self.store.begin_runs([new_run])
                    await self.store.save_answer(answer)
                except StoreError as exc:  # the session was just deleted, or storage fails
                    log.error("run.queued_not_saved", session_id=req.session_id, error=str(exc))
                else:
                    log.warning("run.queued_saved_unstarted", session_id=req.session_id)
        if scope.cancelled_caught:
            log.error("run.queued_save_timed_out", timeout_s=self._save_timeout_s)

    def close_followers(self, session_id: str, code: int, reason: str) -> None:
        for follower in self.followers(session_id):
            follower.request_close(code, reason)

    def close_all_followers(self, code: int, reason: str) -> None:
        for session_id in list(self._followers):
            self.close_followers(session_id, code, reason)

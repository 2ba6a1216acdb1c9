"""A run's life, top to bottom: request, states, the one decision of how it ends, the task.

::

    STARTING ──► PLAYING ──► ENDED ──► SETTLED
        └───────────────────►┘

- **STARTING**: the session's run (registered, announced to its followers, ``stream_start``
  published); its user message is being saved.
- **PLAYING**: the agent plays inside the run's own ``CancelScope``.
- **ENDED**: the terminal event is in the log. To every client the run is over: a stop
  finds nothing to stop, a reconnect and a history read wait for SETTLED.
- **SETTLED**: the terminal event is on every armed writer's wire (or given up on), the
  answer is saved (or its save gave up), the run is deregistered and ``done`` is set.

How a run ended decides its terminal event and saved status in one place,
:func:`ending`. Transitions are guarded, as hypercorn's ``protocol/ws_stream.py`` guards
its connection states: a transition the diagram does not have is a bug and raises
:class:`~navi_trio.errors.LifecycleError`.

Runs live in the server-lifetime nursery opened by the lifespan task, never in a
connection's nursery, so a client disconnect cannot cancel a run (STYLE P2, P3).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import structlog
import trio

from .errors import AgentError, LifecycleError, SessionGone, StoreError
from .events import RunLog
from .fanout import FanOut, Subscriber, WireFlush
from .store.base import Answer, NewRun, utc_now

if TYPE_CHECKING:
    from .agents.base import Agent
    from .metrics import Metrics
    from .persistence import Persistence
    from .store.base import Store

log = structlog.get_logger("navi_trio.runs")

#: Answer status saved for each stop reason.
STATUS_FOR_REASON: Final = {"user": "stopped", "deleted": "stopped", "shutdown": "interrupted"}


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # built outside a trio run (a unit test): no arrival time
        return float("nan")


#: How long a settling run waits for its writers to put the terminal event on the wire
#: before it saves anyway (a writer blocked on a client that stopped reading).
WIRE_GIVE_UP_S: Final = 0.25


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


class RunState(enum.Enum):
    STARTING = "starting"
    PLAYING = "playing"
    ENDED = "ended"
    SETTLED = "settled"


_TRANSITIONS: Final = {
    RunState.STARTING: frozenset({RunState.PLAYING, RunState.ENDED}),
    RunState.PLAYING: frozenset({RunState.ENDED}),
    RunState.ENDED: frozenset({RunState.SETTLED}),
    RunState.SETTLED: frozenset(),
}


class How(enum.Enum):
    """How the playing part of a run came to an end."""

    #: The agent returned.
    COMPLETED = "completed"
    #: The run's own scope caught a cancel: a stop (``Run.cancel``) or a storage fault
    #: while it streamed (``Run.fail``).
    CANCELLED = "cancelled"
    #: The agent or the store raised: the message says what the user reads.
    FAILED = "failed"
    #: Cancelled from outside the run's scope (the server nursery going away).
    ABANDONED = "abandoned"
    #: Its session was deleted under it (a message that raced its session's DELETE).
    GONE = "gone"


@attrs.frozen
class Ending:
    """The terminal event a run writes and the status its answer is saved with."""

    terminal: str  # stream_end | stream_stopped | error
    status: str  # complete | stopped | interrupted | error
    reason: str | None = None  # stream_stopped's reason
    message: str | None = None  # error's message


def ending(how: How, *, stop_reason: str | None, failure: str | None, message: str | None = None) -> Ending:
    """The one decision of how a run ends, from how it came to an end.

    ``stop_reason`` is the first stop asked of it (``user``, ``deleted``, ``shutdown``),
    ``failure`` a storage fault met while it streamed, ``message`` the error a failed
    agent or store gave.
    """
    if how is How.COMPLETED:
        return Ending("stream_end", "complete")
    if how is How.FAILED:
        return Ending("error", "error", message=message)
    if how is How.GONE:
        return Ending("stream_stopped", "stopped", reason="deleted")
    if how is How.CANCELLED and failure is not None:
        return Ending("error", "error", message=failure)
    reason = stop_reason or ("user" if how is How.CANCELLED else "shutdown")
    return Ending("stream_stopped", STATUS_FOR_REASON.get(reason, "stopped"), reason=reason)


@attrs.define(eq=False)
class Run(FanOut):
    """One agent turn. Implements the agent's :class:`~navi_trio.agents.base.RunContext`."""

    request: RunRequest
    id: str = attrs.Factory(lambda: uuid.uuid4().hex)
    answer_id: str = attrs.Factory(lambda: uuid.uuid4().hex)
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    subscribers: list[Subscriber] = attrs.Factory(list)
    #: Set once SETTLED: the run's end for anyone waiting on it (a stop, a delete, drain).
    done: trio.Event = attrs.Factory(trio.Event)
    state: RunState = RunState.STARTING
    #: The first stop asked of it while it could still be stopped.
    stop_reason: str | None = None
    #: Set when the store failed while this run streamed: the run ends with ``error``.
    failure: str | None = None
    #: The status its answer is saved with (decided with its terminal event).
    status: str = "running"
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
    #: Whether the terminal event is on every armed writer's wire yet.
    wire: WireFlush = attrs.Factory(WireFlush)
    log: RunLog = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.log = RunLog(self.id, clock=trio.current_time)

    # -- states ------------------------------------------------------------------------
    def _enter(self, state: RunState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise LifecycleError(f"run {self.id}: {self.state.value} -> {state.value}")
        self.state = state

    @property
    def over(self) -> bool:
        """The terminal event is out (ENDED or SETTLED): to a client the run is over."""
        return self.state is RunState.ENDED or self.state is RunState.SETTLED

    @property
    def settled(self) -> bool:
        return self.state is RunState.SETTLED

    def start(self) -> None:
        """Publish ``stream_start`` (the run is STARTING: registered and announced)."""
        self.publish([self.log.start()])

    def play(self) -> None:
        """PLAYING: its user message is saved; the agent plays next."""
        self._enter(RunState.PLAYING)

    def cancel(self, reason: str) -> None:
        """Stop the run (``scope.cancel()``); the first reason given wins, and a run that
        already wrote its terminal event keeps the reason it ended with."""
        if self.stop_reason is None and not self.over:
            self.stop_reason = reason
        self.cancel_scope.cancel(reason=f"stop: {reason}")

    def fail(self, message: str) -> None:
        """End the run with a terminal ``error`` (a storage fault, the event bound), unless
        it is already stopping or over."""
        if self.stop_reason is None and self.failure is None and not self.over:
            self.failure = message
            self.cancel_scope.cancel(reason="storage fault")

    def end(self, how: How, message: str | None = None) -> None:
        """ENDED: write the terminal event :func:`ending` decides (after what a stop cut
        short: a running tool's ``tool_call``, open thinking's ``thinking_end``)."""
        self._enter(RunState.ENDED)
        end = ending(how, stop_reason=self.stop_reason, failure=self.failure, message=message)
        if end.terminal == "stream_end":
            events = self.log.end()
        elif end.terminal == "error":
            events = self.log.error(end.message or "")
        else:
            assert end.reason is not None
            if how is How.ABANDONED or how is How.GONE:
                self.stop_reason = end.reason  # an end nobody asked of this run
            events = self.log.stopped(end.reason)
        self.status = end.status
        self.publish(events)
        self.count_wire(events[-1])

    async def on_the_wire(self) -> None:
        """Return once the terminal event is on every armed subscriber's wire, or after
        ``WIRE_GIVE_UP_S``. Cancellation: only a wait; the run's shielded cleanup calls it."""
        with trio.move_on_after(WIRE_GIVE_UP_S):
            await self.wire.flushed.wait()

    def settle(self) -> None:
        """SETTLED (answer saved or given up, deregistered): sync re-attached readers,
        let go of the subscribers, set ``done``."""
        self._enter(RunState.SETTLED)
        self.sync_subscribers()
        self.done.set()

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

    def answer(self, status: str | None = None) -> Answer:
        """The answer as it stands, with ``status`` (default: the one its end decided)."""
        return Answer(
            id=self.answer_id,
            session_id=self.session_id,
            status=self.status if status is None else status,
            content=self.log.content,
            thinking=self.log.thinking_text,
            tool_calls=[t.as_dict() for t in self.log.tool_calls],
        )


async def live(
    run: Run, agent: Agent, persistence: Persistence, metrics: Metrics, on_settled: Callable[[Run], None]
) -> None:
    """The run's task: save its user message, play the agent inside the run's own cancel
    scope, end, put the terminal event on the wire, save the answer, settle.

    Cancellation: ``run.cancel()`` (stop, DELETE, drain) is caught by the run's scope and
    gives ``stream_stopped`` with that reason. A cancel from outside (the server nursery
    going away) also ends in ``stream_stopped`` with reason ``shutdown``, written in the
    ``finally`` before the ``Cancelled`` goes on. The wire wait and the save run in one
    shielded scope bounded by the store's save timeout.

    Error handling: no ``Exception`` leaves this task (STYLE P6); it becomes the terminal
    ``error`` event and is logged.
    """
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        session_id=run.session_id, run_id=run.id, conn_id=run.request.conn_id, user_id=run.user_id
    )
    log.info("run.started")
    metrics.run_began(run)
    try:
        if getattr(agent, "wants_history", False):
            run.store = persistence.store
            run.summary, run.history = await persistence.store.load_context(run.session_id)
        # The user's message is saved even if a stop lands at once: shielded, bounded.
        await persistence.begin(run.request.saved_as(run.answer_id))
        run.play()
        with run.cancel_scope:
            await trio.lowlevel.checkpoint_if_cancelled()  # stopped while saving: play nothing
            if run.request.upload_dir is not None:
                # The session's uploads in this process's data dir: another process of a
                # cluster may have taken them, or checked this message and queued it here.
                # A stop abandons the fetch (what is half written is a temp file).
                folder = await persistence.store.local_uploads(run.request.upload_dir, run.session_id)
                run.request = attrs.evolve(run.request, upload_dir=folder)
            await agent.play(run)
        run.end(How.CANCELLED if run.cancel_scope.cancelled_caught else How.COMPLETED)
    except AgentError as exc:
        log.info("run.agent_error", error=str(exc))
        run.end(How.FAILED, str(exc))
    except SessionGone:
        # A message that raced its session's DELETE: the run ends as a deleted session's
        # runs do. Nothing failed, so nothing is logged as an error.
        log.info("run.session_gone")
        run.end(How.GONE)
    except StoreError as exc:
        log.error("run.store_error", error=str(exc))
        run.end(How.FAILED, f"Storage error: {exc}")
    except Exception:
        log.exception("run.crashed")
        run.end(How.FAILED, "The agent failed unexpectedly; the error was logged.")
    finally:
        if not run.over:  # cancelled from outside the run's own scope
            run.end(How.ABANDONED)
        timeout = persistence.save_timeout_s
        with trio.move_on_after(timeout, shield=True) as save_scope:
            # The writers send the terminal event first: the save's worker thread would
            # otherwise compete with them for the CPU (bench scenario 4: ~1 ms later).
            await run.on_the_wire()
            await persistence.save_final(run)
        if save_scope.cancelled_caught:
            log.error("run.save_timed_out", timeout_s=timeout)
        on_settled(run)

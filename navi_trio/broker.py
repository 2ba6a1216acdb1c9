"""The broker: what the processes serving sessions share, behind one interface.

Above this seam the run registry (``runs.py``) decides every admission, stop and hand-over
the same way whichever broker it talks to: :class:`InProcessBroker` for a server that is
one process (plain dicts, no service at all), or the Redis broker
(:class:`~navi_trio.cluster.broker.RedisBroker`, ``NAVI_REDIS_URL``) that makes several
processes one server. Both pass the same conformance suite
(``tests/broker_conformance.py``, in the style of trio's ``check_two_way_stream``).

The seam speaks of runs by id and every method is async, because across processes each
step is a round trip. So every decision is a compare-and-set: admission looks (who holds
the session, what waits), decides with ``admission.py``, then claims or queues only if
what it saw still holds, and looks again if not. The in-process broker answers each
call without a checkpoint, so in one process a look and the step that acts on it are
still one step.

What is shared, and the contract each part keeps:

- **Ownership**: at most one run per session. :meth:`Broker.claim` succeeds for one run
  id at a time; :meth:`Broker.finish` hands the session on, in one step, to a new run id
  for the next queued message (played by the process that finished), or frees it.
- **The run's log and its fan-out**: :meth:`Broker.own` makes the log of a run played
  here readable wherever the session is followed; :meth:`Broker.watch` gives a view of a
  run played by another process that a connection subscribes to like a local run
  (replay, resume by seq, catch-up with merging). :meth:`Broker.finish` returns only once
  the run's terminal event is where every reader finds it.
- **Stop requests**: :meth:`Broker.request_stop` reaches the run wherever it plays; the
  run keeps the first reason given.
- **Notices**: every process hears (through the ``on_notice`` given to :meth:`Broker.bind`)
  that a run started (``run_started``, before its first event can be missed: a reader
  reads the run's log from its start) and that a session's followers are to be closed
  (``close``).
- **Queues**: messages waiting for a session's run, in order, inserted only while the
  holder and length admission saw still hold.
- **Dead owners** (only where processes can die apart): a run whose owner's lease lapsed
  is ended once, and its answer handed to ``on_orphan`` to be saved ``interrupted``.

What stays in each process (its connections, and the local objects they subscribe to in
one synchronous step) is :class:`~navi_trio.local.LocalRuns`.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Protocol

import attrs
import trio

from .errors import NaviError

if TYPE_CHECKING:
    from .admission import Queued
    from .events import RunLog
    from .lifecycle import Run


class BrokerUnavailable(NaviError):
    """The shared state cannot be reached (Redis lost); ``str(exc)`` names it for users."""


@attrs.frozen
class Holder:
    """Who holds a session: a run, and the process that plays it."""

    run_id: str
    owner: str

    @property
    def value(self) -> str:
        return f"{self.run_id} {self.owner}"

    @classmethod
    def parse(cls, value: str) -> Holder:
        run_id, _, owner = value.partition(" ")
        return cls(run_id, owner)


#: The kinds of :class:`Notice`.
NOTICE_KINDS: Final = frozenset({"run_started", "stop", "close"})


@attrs.frozen
class Notice:
    """What every process hears: ``run_started`` (a session has a new run, played by
    ``owner``), ``stop`` (stop run ``run_id`` with ``reason``), ``close`` (close the
    session's followers with ``code`` and ``reason``; ``owner`` is the asker)."""

    kind: str
    session_id: str
    run_id: str = ""
    owner: str = ""
    reason: str = ""
    code: int = 0

    def fields(self) -> dict[str, str]:
        return {
            "k": self.kind,
            "s": self.session_id,
            "r": self.run_id,
            "o": self.owner,
            "x": self.reason,
            "c": str(self.code),
        }

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> Notice:
        return cls(f["k"], f["s"], f.get("r", ""), f.get("o", ""), f.get("x", ""), int(f.get("c", "0")))


OnNotice = Callable[[Notice], None]
#: Save the answer of a run whose owner died: (session id, answer id, its log as read).
OnOrphan = Callable[[str, str, "RunLog"], Awaitable[None]]


class Watched(Protocol):
    """A run played by another process, as this one sees it (what :meth:`Broker.watch`
    gives): a fan-out a connection subscribes to like a local run."""

    id: str
    session_id: str
    #: Set once the run is settled (its answer saved by its owner).
    done: trio.Event
    #: Set once its first event has been read (an attach replays from ``stream_start``).
    first: trio.Event
    #: How a stop asked here reaches the process that plays it.
    on_cancel: Callable[[Watched, str], None] | None

    @property
    def over(self) -> bool: ...

    def cancel(self, reason: str) -> None: ...


class Broker(Protocol):
    """The seam. Each method is one atomic step for the state it names: a cancel leaves it
    done or not done, never half done (a lost answer to a claim expires by itself).
    Methods that reach another process raise :class:`BrokerUnavailable` when it is lost."""

    @property
    def owner(self) -> str:
        """The name of this process in holders and notices."""
        ...

    @property
    def healthy(self) -> bool:
        """False while the shared state does not answer (``/healthz`` answers 503)."""
        ...

    @property
    def queued_count(self) -> int:
        """Messages waiting behind this process's runs (for ``/metrics``; may lag by a
        second in a cluster)."""
        ...

    def bind(self, on_notice: OnNotice, on_orphan: OnOrphan) -> None:
        """Where notices and orphaned answers go (the registry, once, before :meth:`serve`)."""
        ...

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The broker's own tasks (listening for notices, finding dead owners); started
        once it hears every notice published from then on.

        Cancellation: ends them; runs are the registry's, not ended by this.
        """
        ...

    # -- ownership -----------------------------------------------------------------------
    async def holder(self, session_id: str) -> Holder | None:
        """Who holds the session now (None: nobody)."""
        ...

    async def look(self, session_id: str) -> tuple[Holder | None, list[Queued]]:
        """What admission decides from, in one step: the session's holder and its queue."""
        ...

    async def claim(self, session_id: str, run_id: str) -> bool:
        """Make ``run_id`` (to be played here) the session's run; False if one holds it."""
        ...

    async def own(self, run: Run) -> None:
        """A run claimed here, before it publishes ``stream_start``: make its log readable
        wherever the session is followed, keep its claim alive while it lives, and send
        the ``run_started`` notice."""
        ...

    async def finish(self, run: Run, *, hand_on: bool = True) -> tuple[Queued, str] | None:
        """After the run's answer is saved: once its terminal event is out (where every
        reader finds it), mark it settled and hand the session on in one step: to a new
        run id for the next queued message (returned with it: play it here under that
        id), or to nobody (None; also with ``hand_on=False``, and when the session was
        no longer this run's)."""
        ...

    async def watch(self, session_id: str, run_id: str, *, task_status: trio.TaskStatus[Watched]) -> None:  # noqa: ASYNC114
        """Follow a run played by another process: ``started`` at once with its view,
        then feed the view's subscribers until the run is settled.

        Cancellation: only reads; a cancel ends the view (its subscribers get no more).
        """
        ...

    # -- stop requests and notices -------------------------------------------------------
    async def request_stop(self, session_id: str, run_id: str, reason: str) -> None:
        """Ask run ``run_id`` to stop with ``reason`` wherever it plays (a run already over
        keeps its ending)."""
        ...

    async def stop_live(self, session_id: str, reason: str) -> tuple[Holder | None, bool]:
        """A client's stop, in one step: who holds the session (None: nobody) and whether
        its run is still live (its terminal event not out yet). A live run that another
        process plays is asked to stop with ``reason`` in the same step; a run played
        here is the caller's to cancel, in its own table."""
        ...

    async def close_followers(self, session_id: str, code: int, reason: str) -> None:
        """Tell every other process to close its followers of the session."""
        ...

    # -- queues --------------------------------------------------------------------------
    async def queued(self, session_id: str) -> list[Queued]:
        """What waits for the session's run, oldest first."""
        ...

    async def enqueue(self, session_id: str, queued: Queued, at: int, *, holder: Holder | None, length: int) -> bool:
        """Put ``queued`` at position ``at`` if the session is still held by ``holder``
        with ``length`` messages waiting (what admission decided from); False (nothing
        changed) if either moved."""
        ...

    async def forget_queue(self, session_id: str) -> list[Queued]:
        """Drop what waits for the session; return it, oldest first."""
        ...


def _nobody(notice: Notice) -> None:
    pass


class InProcessBroker:
    """The :class:`Broker` of a server that is one process: plain dicts.

    Every method completes without a checkpoint (nothing to wait for), so in one process
    admission's look and the claim that follows it are one step. Every run is this
    process's own, so :meth:`watch` has nothing to watch and no owner can die apart.
    """

    owner: Final = "local"

    def __init__(self) -> None:
        self._holders: dict[str, Holder] = {}
        self._queues: dict[str, deque[Queued]] = {}
        self._owned: dict[str, Run] = {}
        self._on_notice: OnNotice = _nobody

    @property
    def healthy(self) -> bool:
        return True

    @property
    def queued_count(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def bind(self, on_notice: OnNotice, on_orphan: OnOrphan) -> None:
        self._on_notice = on_notice

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # nothing to listen to: notices are delivered as they are sent

    # -- ownership -----------------------------------------------------------------------
    async def holder(self, session_id: str) -> Holder | None:
        return self._holders.get(session_id)

    async def look(self, session_id: str) -> tuple[Holder | None, list[Queued]]:
        return self._holders.get(session_id), list(self._queues.get(session_id, ()))

    async def claim(self, session_id: str, run_id: str) -> bool:
        if session_id in self._holders:
            return False
        self._holders[session_id] = Holder(run_id, self.owner)
        return True

    async def own(self, run: Run) -> None:
        self._owned[run.id] = run  # its log is the run's own, readable by every connection
        self._on_notice(Notice("run_started", run.session_id, run.id, owner=self.owner))

    async def finish(self, run: Run, *, hand_on: bool = True) -> tuple[Queued, str] | None:
        self._owned.pop(run.id, None)
        sid = run.session_id
        if self._holders.get(sid) != Holder(run.id, self.owner):
            return None
        queue = self._queues.get(sid)
        if hand_on and queue:
            first = queue.popleft()
            if not queue:
                del self._queues[sid]
            successor_id = uuid.uuid4().hex
            self._holders[sid] = Holder(successor_id, self.owner)
            return first, successor_id
        del self._holders[sid]
        return None

    async def watch(self, session_id: str, run_id: str, *, task_status: trio.TaskStatus[Watched]) -> None:  # noqa: ASYNC114
        raise LookupError(f"run {run_id} is played by this process: there is nothing to watch")

    # -- stop requests and notices -------------------------------------------------------
    async def request_stop(self, session_id: str, run_id: str, reason: str) -> None:
        run = self._owned.get(run_id)
        if run is not None:
            run.cancel(reason)

    async def stop_live(self, session_id: str, reason: str) -> tuple[Holder | None, bool]:
        holder = self._holders.get(session_id)
        if holder is None:
            return None, False
        run = self._owned.get(holder.run_id)
        return holder, run is None or not run.over  # every run here is the caller's to cancel

    async def close_followers(self, session_id: str, code: int, reason: str) -> None:
        pass  # no other process follows it

    # -- queues --------------------------------------------------------------------------
    async def queued(self, session_id: str) -> list[Queued]:
        return list(self._queues.get(session_id, ()))

    async def enqueue(self, session_id: str, queued: Queued, at: int, *, holder: Holder | None, length: int) -> bool:
        queue = self._queues.get(session_id, ())
        if self._holders.get(session_id) != holder or len(queue) != length:
            return False
        self._queues.setdefault(session_id, deque()).insert(at, queued)
        return True

    async def forget_queue(self, session_id: str) -> list[Queued]:
        return list(self._queues.pop(session_id, ()))

"""The broker: everything the processes serving sessions share, behind one interface.

Above this seam (the run registry, connections, HTTP routes) nothing knows which
implementation it talks to; the server builds one :class:`InProcessBroker` today, and a
broker spanning processes implements the same :class:`Broker` and passes the same
conformance suite (``tests/broker_conformance.py``, in the style of trio's
``check_two_way_stream``).

What is shared, and the contract each part keeps:

- **Ownership**: at most one run per session. :meth:`Broker.claim` succeeds for one run
  of a session at a time; :meth:`Broker.release` hands the session to the next queued
  message's run in the same step, or frees it. :meth:`Broker.wait_idle` returns once no
  session has a run.
- **The run's log and its fan-out**: :meth:`Broker.subscribe` gives a subscriber every
  event of the run exactly once, in seq order (replayed from the log when asked, caught
  up from it when its outbox was full), with no gap between replay and live events.
- **Stop, delete and interrupt requests**: :meth:`Broker.request_stop` reaches the
  session's run wherever it plays; the first reason given is the one it ends with.
- **Run-started notices**: every follower of a session hears of each new run of it
  (``Follower.run_started``) before the run's first event, so it misses none.
- **Queues**: messages waiting for a session's run, in order, bounded by admission.
- **Revocations and closes**: :meth:`Broker.revoke` and :meth:`Broker.close_followers`
  reach every connection concerned.

Every method is synchronous, so that a check and the registration that follows it
happen with no checkpoint in between; only :meth:`Broker.wait_idle` waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import trio

from .fanout import Followers

if TYPE_CHECKING:
    from .admission import Queued
    from .fanout import Follower, Outbox, Subscriber
    from .lifecycle import Run, RunRequest


class Broker(Protocol):
    # -- ownership -----------------------------------------------------------------------
    def active(self, session_id: str) -> Run | None:
        """The session's run (from its claim until its release), or None."""
        ...

    @property
    def runs(self) -> list[Run]:
        """Every run that holds a session."""
        ...

    def claim(self, run: Run) -> bool:
        """Make ``run`` its session's run; False (and nothing changes) if it has one."""
        ...

    def release(self, run: Run, successor: Run | None = None) -> None:
        """``run`` gives up its session: to ``successor`` (a run of the same session, the
        next queued message's), in the same step, or to nobody. Releasing a run that no
        longer holds its session does nothing."""
        ...

    async def wait_idle(self) -> None:
        """Return once no session has a run.

        Cancellation: only a wait; a cancel ends it and changes nothing.
        """
        ...

    # -- the run's log and its fan-out ---------------------------------------------------
    def subscribe(self, run: Run, outbox: Outbox, *, after: int | None = None, replay: bool = False) -> Subscriber:
        """Deliver the run's events to ``outbox``: from now on (``replay=False``), or the
        whole run so far first (``replay=True``: stream_start, replay_start, the events,
        replay_end), or stream_start and the events after seq ``after`` first (a resume)."""
        ...

    def unsubscribe(self, sub: Subscriber) -> None: ...

    # -- stop, delete and interrupt requests ---------------------------------------------
    def request_stop(self, session_id: str, reason: str) -> Run | None:
        """Ask the session's run to stop with ``reason``; return it (None if none)."""
        ...

    # -- followers and run-started notices -----------------------------------------------
    def follow(self, session_id: str, follower: Follower) -> Run | None:
        """Register ``follower`` for every future run of the session (once, however often
        asked); return the session's run, so the caller can subscribe to it in the same
        synchronous step and miss nothing."""
        ...

    def unfollow(self, session_id: str, follower: Follower) -> None: ...

    def followers(self, session_id: str) -> list[Follower]: ...

    @property
    def follower_count(self) -> int: ...

    def connections_of(self, user_id: str) -> int:
        """How many connections of this user follow a session."""
        ...

    def announce(self, run: Run) -> None:
        """Tell every follower of the run's session that it started (``run_started``)."""
        ...

    # -- queues --------------------------------------------------------------------------
    def queued(self, session_id: str) -> Sequence[Queued]:
        """What waits for the session's run, oldest first (a view: do not keep it)."""
        ...

    def enqueue(self, session_id: str, queued: Queued, at: int) -> None:
        """Put ``queued`` at position ``at`` of the session's queue."""
        ...

    def pop_queued(self, session_id: str) -> Queued | None:
        """Take the first of the session's queue, or None."""
        ...

    def forget_queue(self, session_id: str) -> None:
        """Drop what waits for the session (it is being deleted)."""
        ...

    def take_all_queued(self) -> list[RunRequest]:
        """Empty every queue (shutdown); return what they held, oldest first per session."""
        ...

    @property
    def queued_count(self) -> int:
        """How many messages wait, over every session."""
        ...

    # -- revocations and closes ----------------------------------------------------------
    def has_user_connections(self) -> bool:
        """Some follower belongs to a user (only then can a revocation concern anyone)."""
        ...

    def revoke(self, user_ids: set[str]) -> None:
        """Close every connection of these users (4003 ``Token revoked``)."""
        ...

    def close_followers(self, session_id: str, code: int, reason: str) -> None: ...

    def close_all_followers(self, code: int, reason: str) -> None: ...


class InProcessBroker:
    """The :class:`Broker` of a server that is one process: plain dicts and lists.

    One owner per piece of state: the session table and the queues here, the followers
    in :class:`~navi_trio.fanout.Followers`, each run's subscribers in the run itself.
    """

    def __init__(self) -> None:
        self._active: dict[str, Run] = {}
        self._queues: dict[str, deque[Queued]] = {}
        self._followers = Followers()
        self._idle = trio.Event()
        self._idle.set()

    # -- ownership -----------------------------------------------------------------------
    def active(self, session_id: str) -> Run | None:
        return self._active.get(session_id)

    @property
    def runs(self) -> list[Run]:
        return list(self._active.values())

    def claim(self, run: Run) -> bool:
        sid = run.session_id
        if sid in self._active:
            return False
        self._active[sid] = run
        if self._idle.is_set():
            self._idle = trio.Event()
        return True

    def release(self, run: Run, successor: Run | None = None) -> None:
        sid = run.session_id
        if self._active.get(sid) is not run:
            return
        if successor is not None:
            assert successor.session_id == sid
            self._active[sid] = successor
            return
        del self._active[sid]
        if not self._active:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- the run's log and its fan-out ---------------------------------------------------
    def subscribe(self, run: Run, outbox: Outbox, *, after: int | None = None, replay: bool = False) -> Subscriber:
        return run.subscribe(outbox, after=after, replay=replay)

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.run.unsubscribe(sub)

    # -- stop, delete and interrupt requests ---------------------------------------------
    def request_stop(self, session_id: str, reason: str) -> Run | None:
        run = self._active.get(session_id)
        if run is not None:
            run.cancel(reason)
        return run

    # -- followers and run-started notices -----------------------------------------------
    def follow(self, session_id: str, follower: Follower) -> Run | None:
        self._followers.add(session_id, follower)
        return self._active.get(session_id)

    def unfollow(self, session_id: str, follower: Follower) -> None:
        self._followers.remove(session_id, follower)

    def followers(self, session_id: str) -> list[Follower]:
        return self._followers.of(session_id)

    @property
    def follower_count(self) -> int:
        return len(self._followers)

    def connections_of(self, user_id: str) -> int:
        return len(self._followers.of_user(user_id))

    def announce(self, run: Run) -> None:
        for follower in self._followers.live(run.session_id):
            follower.run_started(run)

    # -- queues --------------------------------------------------------------------------
    def queued(self, session_id: str) -> Sequence[Queued]:
        return self._queues.get(session_id, ())

    def enqueue(self, session_id: str, queued: Queued, at: int) -> None:
        self._queues.setdefault(session_id, deque()).insert(at, queued)

    def pop_queued(self, session_id: str) -> Queued | None:
        queue = self._queues.get(session_id)
        if not queue:
            return None
        first = queue.popleft()
        if not queue:
            del self._queues[session_id]
        return first

    def forget_queue(self, session_id: str) -> None:
        self._queues.pop(session_id, None)

    @property
    def queued_count(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def take_all_queued(self) -> list[RunRequest]:
        requests = [queued.request for queue in self._queues.values() for queued in queue]
        self._queues.clear()
        return requests

    # -- revocations and closes ----------------------------------------------------------
    def has_user_connections(self) -> bool:
        return self._followers.any_user()

    def revoke(self, user_ids: set[str]) -> None:
        for follower in self._followers.of_users(user_ids):
            follower.request_close(4003, "Token revoked")

    def close_followers(self, session_id: str, code: int, reason: str) -> None:
        for follower in self._followers.of(session_id):
            follower.request_close(code, reason)

    def close_all_followers(self, code: int, reason: str) -> None:
        for session_id in self._followers.sessions():
            self.close_followers(session_id, code, reason)

"""Who gets a run's events: its subscribers, and the followers of each session.

A run's events go to its :class:`~navi_trio.events.RunLog` first (the source of truth),
then to each subscriber's bounded outbox with ``send_nowait``. A subscriber whose outbox
is full falls behind: the run skips it, and its connection's writer catches it up from
the log (``catchup.py``), then re-arms it (STYLE P9). The run never waits for a reader.

At the run's end one more thing is counted here: whether its terminal event is on every
armed subscriber's wire (its writer's ``send`` returned), so the answer's save, which
competes with the writers for the CPU, starts once the event is out, not a guessed
number of scheduler passes later. A lagging or departed subscriber is not waited for.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from .catchup import Cursor
from .events import SESSION_SYNC, Event

if TYPE_CHECKING:
    from .events import RunLog
    from .lifecycle import Run


class Outbox(Protocol):
    """A connection's side of its subscriptions (implemented by ``Connection``)."""

    def offer(self, frame: Event | str) -> bool:
        """``send_nowait`` into the outbox; False when it is full (or gone)."""
        ...

    def wake(self) -> None:
        """Make the writer look at its catch-up even if nothing else is queued."""
        ...

    def fall_behind(self, sub: Subscriber) -> None:
        """Take ``sub`` into the writer's catch-up (it is lagging from now on)."""
        ...

    @property
    def behind(self) -> bool:
        """Some subscription of this outbox is still catching up."""
        ...


class Follower(Protocol):
    """A connection following a session: it subscribes to every run of it."""

    @property
    def user_id(self) -> str | None: ...

    def run_started(self, run: Run) -> None: ...

    def request_close(self, code: int, reason: str) -> None: ...


@attrs.define(eq=False, slots=True)
class Subscriber(Cursor):
    """One connection's place in one run: a :class:`~navi_trio.catchup.Cursor` with the
    run and the outbox it is for."""

    run: FanOut = attrs.field(kw_only=True)
    outbox: Outbox = attrs.field(kw_only=True)
    #: The outbox's writer reports when this subscriber's terminal event is on the wire
    #: (a ``Connection`` does; a stand-in that only records need not).
    reports_wire: bool = attrs.field(default=False, kw_only=True)
    #: The terminal event is in the outbox and its writer has not said it is sent.
    awaiting_wire: bool = attrs.field(default=False, kw_only=True)

    def fall_behind(self) -> None:
        if not self.lagging:
            self.lagging = True
            self.outbox.fall_behind(self)

    def next_catch_up_frame(self) -> str | None:
        return self.next_frame(self.run.log, self.run.settled)

    def on_wire(self) -> None:
        """The writer sent this run's terminal event, or gave up on it (closed)."""
        if self.awaiting_wire:
            self.awaiting_wire = False
            self.run.wire.sent()


class WireFlush:
    """Counts the armed writers that have yet to send a run's terminal event."""

    __slots__ = ("flushed", "pending")

    def __init__(self) -> None:
        self.pending = 0
        #: Set once every one of them has sent it (or left).
        self.flushed = trio.Event()

    def expect(self, pending: int) -> None:
        self.pending = pending
        if not pending:
            self.flushed.set()

    def sent(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.flushed.set()


class FanOut:
    """The fan-out half of a run (:class:`~navi_trio.lifecycle.Run` inherits it).

    Synchronous throughout: nothing can slip in between what a new subscriber is given
    from the log and what it is sent live, so there is no gap and no duplicate.
    """

    __slots__ = ()
    log: RunLog
    subscribers: list[Subscriber]
    wire: WireFlush

    @property
    def settled(self) -> bool:
        raise NotImplementedError

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

    def subscribe(self, outbox: Outbox, *, after: int | None = None, replay: bool = False) -> Subscriber:
        """Add a subscriber.

        - ``replay=False``: a follower from the start (``after`` ignored; the run is new).
        - ``replay=True, after=None``: attach: stream_start, replay_start, the rest, replay_end.
        - ``replay=True, after=N``: resume: stream_start (seq 1, as every attach begins),
          replay_start, the events with seq > N, replay_end.
        """
        sub = Subscriber(run=self, outbox=outbox)
        if replay:
            sub.start_replay(self.log, after)
        if replay or outbox.behind:
            # Order across runs: a later run must not overtake an earlier one still catching up.
            sub.fall_behind()
            outbox.wake()
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with contextlib.suppress(ValueError):
            self.subscribers.remove(sub)
        sub.on_wire()  # a departed reader is not waited for

    # -- the terminal event on the wire ------------------------------------------------
    def count_wire(self, terminal: Event) -> None:
        """Just after the terminal event was published: wait for every armed subscriber
        that was handed it and whose writer reports sends."""
        pending = 0
        for sub in self.subscribers:
            if sub.reports_wire and not sub.lagging and sub.queued == terminal.seq:
                sub.awaiting_wire = True
                pending += 1
        self.wire.expect(pending)

    def sync_subscribers(self) -> None:
        """At the run's end (answer saved): tell re-attached readers to sync, then let go
        of every subscriber (lagging readers keep the run through their Subscriber)."""
        for sub in self.subscribers:
            if sub.owes_sync():
                if sub.outbox.offer(SESSION_SYNC):
                    sub.synced = True
                else:
                    sub.fall_behind()
            sub.awaiting_wire = False
        self.subscribers.clear()


class Followers:
    """Which connections follow which session (each subscribes to every run of it).

    Lists, not sets: a session has a follower or two, and an empty set costs 216 bytes
    (a session per idle connection is the common case).
    """

    __slots__ = ("_by_session",)

    def __init__(self) -> None:
        self._by_session: dict[str, list[Follower]] = {}

    def add(self, session_id: str, follower: Follower) -> None:
        followers = self._by_session.setdefault(session_id, [])
        if follower not in followers:
            followers.append(follower)

    def remove(self, session_id: str, follower: Follower) -> None:
        followers = self._by_session.get(session_id)
        if followers is not None and follower in followers:
            followers.remove(follower)
            if not followers:
                del self._by_session[session_id]

    def of(self, session_id: str) -> list[Follower]:
        """A copy: a follower may leave while the caller walks it."""
        return list(self._by_session.get(session_id, ()))

    def live(self, session_id: str) -> tuple[Follower, ...] | list[Follower]:
        """The session's followers, not copied (for a synchronous walk that adds none)."""
        return self._by_session.get(session_id, ())

    def sessions(self) -> list[str]:
        return list(self._by_session)

    def __len__(self) -> int:
        return sum(len(f) for f in self._by_session.values())

    def of_user(self, user_id: str) -> list[Follower]:
        return [f for fs in self._by_session.values() for f in fs if f.user_id == user_id]

    def any_user(self) -> bool:
        """Some follower belongs to a user (revocations matter only then)."""
        return any(f.user_id is not None for fs in self._by_session.values() for f in fs)

    def of_users(self, user_ids: set[str]) -> list[Follower]:
        return [f for fs in self._by_session.values() for f in fs if f.user_id in user_ids]

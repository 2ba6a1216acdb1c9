"""Catching a reader up from the run's log: replay, merging and re-arming (sans-IO).

A subscriber whose outbox was full is *lagging*: the run skips it and its connection's
writer, once its outbox is empty, builds the missing frames from the run's event log
(the source of truth), merged by the one rule of :func:`~navi_trio.events.merges`, until
it is caught up and re-armed. A replay (attach or resume) is the same catch-up with a
prelude. This module holds that walk as plain synchronous code, like ``events.py``:

- :class:`Cursor`: one reader's place in one run's log (what it was given, what it still
  needs to be told), and the next frame it needs;
- :class:`CatchUp`: a connection's lagging subscriptions, oldest run first, so a later run
  never overtakes an earlier one still catching up;
- :func:`coalesce`: the deltas queued in a writer's outbox behind one that waited too
  long, merged by the same rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol, TypeVar

import attrs

from .events import MERGE_MAX_CHARS, REPLAY_END, SESSION_SYNC, Event, RunLog, count_frames, merged_frame, merges
from .events import replay_start_frame as _replay_start

#: What :func:`coalesce` returns when it emptied the outbox.
EMPTY: Final = object()


@attrs.define(eq=False, slots=True)
class Cursor:
    """One reader's place in one run.

    ``queued`` is the seq of the last event handed to the outbox (or written during
    catch-up). ``prelude`` holds replay frames to write first. ``sync_after`` asks for a
    ``session_sync`` once the run is over and its answer saved.
    """

    queued: int = 0
    lagging: bool = False
    #: At most two frames (stream_start, replay_start): a list, not a deque (~600 bytes
    #: each), since there is one cursor per connection per run.
    prelude: list[str] = attrs.Factory(list)
    #: While replaying: the seq the replay ends at (``replay_end`` is written after it).
    replay_until: int | None = None
    sync_after: bool = False
    synced: bool = False

    def start_replay(self, log: RunLog, after: int | None) -> None:
        """Attach (``after`` None: stream_start, replay_start, the rest, replay_end) or
        resume (stream_start, seq 1, as every attach begins; replay_start, the events with
        seq > ``after``, replay_end).

        The replay is merged like any catch-up; its frames are counted now and built from
        the log as they are written, so nothing is copied ahead of time.
        """
        events = log.events
        n = len(events)
        start = 1 if after is None else min(max(after, 1), n)
        self.prelude.append(events[0].wire)
        self.prelude.append(_replay_start(count_frames(events, start, n)))
        self.queued = start
        self.replay_until = n
        self.sync_after = True

    def next_frame(self, log: RunLog, settled: bool) -> str | None:
        """The next frame this lagging reader needs, or None once it is caught up (it is
        then re-armed: live events reach it through the outbox again)."""
        if self.prelude:
            return self.prelude.pop(0)
        if self.replay_until is not None:
            if self.queued < self.replay_until:
                frame, self.queued = log.next_frame(self.queued, self.replay_until)
                return frame
            self.replay_until = None
            return REPLAY_END
        if self.queued < len(log.events):
            frame, self.queued = log.next_frame(self.queued)
            return frame
        if settled and self.sync_after and not self.synced:
            self.synced = True
            return SESSION_SYNC
        self.lagging = False
        return None

    def owes_sync(self) -> bool:
        """At the run's end: an armed reader that re-attached is owed its ``session_sync``
        now (a lagging one gets it at the end of its catch-up)."""
        return self.sync_after and not self.lagging and not self.synced


class Lagging(Protocol):
    """A cursor with its log at hand (a :class:`~navi_trio.fanout.Subscriber`)."""

    queued: int

    def next_catch_up_frame(self) -> str | None: ...


L = TypeVar("L", bound=Lagging)


class CatchUp(list[L]):
    """A connection's lagging subscriptions in the order they fell behind.

    A plain list (an idle connection is the common case, and an empty deque costs ~600
    bytes); it holds a handful of subscriptions at most. Only the connection's writer
    takes from it.
    """

    __slots__ = ()

    def next_frame(self) -> tuple[str, int] | None:
        """The next catch-up frame and how many of the log's events it carries (more than
        one: merged), or None once every subscription is caught up (each is re-armed and
        dropped from here as it catches up)."""
        while self:
            sub = self[0]
            seen = sub.queued
            frame = sub.next_catch_up_frame()
            if frame is not None:
                return frame, sub.queued - seen
            del self[0]
        return None


def coalesce(first: Event, take: Callable[[], object], empty: type[Exception] = IndexError) -> tuple[str, object]:
    """Merge ``first`` with the same-kind deltas queued right behind it, by the rule of
    :func:`~navi_trio.events.merges`. ``take`` gives the next queued item, or raises
    ``empty`` when there is none (a writer passes its channel's ``receive_nowait`` and
    ``trio.WouldBlock``: nothing here imports trio).

    Returns the frame and the first item taken that did not join it (to be written next),
    or :data:`EMPTY`.
    """
    assert first.delta is not None
    parts = [first.delta]
    size = len(first.delta)
    last = first
    while True:
        try:
            nxt = take()
        except empty:
            nxt = EMPTY
            break
        if type(nxt) is not Event or not merges(first, nxt, size, MERGE_MAX_CHARS):
            break
        delta = nxt.delta
        assert delta is not None
        parts.append(delta)
        size += len(delta)
        last = nxt
    if last is first:
        return first.wire, nxt
    return merged_frame(first, last, parts), nxt

"""This process's runs and followers: what a connection subscribes to, in one step.

The broker (``broker.py``) holds what the processes of a server share and speaks of runs
by id. What a connection needs is a local object it can subscribe to in the same
synchronous step as it registers as a follower, so that it misses no event: that is this
table. It holds, per session, the run this process plays or, in a cluster, the
:class:`~navi_trio.cluster.broker.RemoteRun` mirroring a run played elsewhere (both are a
:class:`~navi_trio.fanout.FanOut` over a log), and the connections following the session.

Every method is synchronous: a check and the registration that follows it happen with no
checkpoint in between; only :meth:`LocalRuns.wait_idle` waits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from .fanout import Followers

if TYPE_CHECKING:
    from .fanout import Follower, Outbox, Subscriber
    from .lifecycle import Run


class LocalRuns:
    """The session table and the followers of one process.

    One owner per piece of state: the session table here, the followers in
    :class:`~navi_trio.fanout.Followers`, each run's subscribers in the run itself.
    """

    def __init__(self) -> None:
        self._active: dict[str, Run] = {}
        self._followers = Followers()
        self._idle = trio.Event()
        self._idle.set()

    # -- the session table ---------------------------------------------------------------
    def active(self, session_id: str) -> Run | None:
        """The session's run as this process sees it (from its claim until its release)."""
        return self._active.get(session_id)

    @property
    def runs(self) -> list[Run]:
        """Every run in the table."""
        return list(self._active.values())

    def claim(self, run: Run) -> bool:
        """Make ``run`` its session's run here; False (and nothing changes) if it has one."""
        sid = run.session_id
        if sid in self._active:
            return False
        self._active[sid] = run
        if self._idle.is_set():
            self._idle = trio.Event()
        return True

    def release(self, run: Run, successor: Run | None = None) -> None:
        """``run`` gives up its session: to ``successor`` (a run of the same session), in
        the same step, or to nobody. Releasing a run that no longer holds it does nothing."""
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
        """Return once the table is empty.

        Cancellation: only a wait; a cancel ends it and changes nothing.
        """
        await self._idle.wait()

    def stop(self, session_id: str, reason: str) -> Run | None:
        """Ask the session's run in the table to stop with ``reason`` (a run played
        elsewhere passes the request on); return it, or None."""
        run = self._active.get(session_id)
        if run is not None:
            run.cancel(reason)
        return run

    # -- a run's subscribers -----------------------------------------------------------
    def subscribe(self, run: Run, outbox: Outbox, *, after: int | None = None, replay: bool = False) -> Subscriber:
        """Deliver the run's events to ``outbox``: from now on (``replay=False``), or the
        whole run so far first (``replay=True``: stream_start, replay_start, the events,
        replay_end), or stream_start and the events after seq ``after`` first (a resume)."""
        return run.subscribe(outbox, after=after, replay=replay)

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.run.unsubscribe(sub)

    # -- followers and run-started notices -----------------------------------------------
    def follow(self, session_id: str, follower: Follower) -> Run | None:
        """Register ``follower`` for every future run of the session (once, however often
        asked); return the session's run, so the caller can subscribe to it in the same
        synchronous step and miss nothing."""
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
        """How many connections of this user follow a session."""
        return len(self._followers.of_user(user_id))

    def announce(self, run: Run) -> None:
        """Tell every follower of the run's session that it started (``run_started``)."""
        for follower in self._followers.live(run.session_id):
            follower.run_started(run)

    # -- revocations and closes ----------------------------------------------------------
    def has_user_connections(self) -> bool:
        """Some follower belongs to a user (only then can a revocation concern anyone)."""
        return self._followers.any_user()

    def revoke(self, user_ids: set[str]) -> None:
        """Close every connection of these users (4003 ``Token revoked``)."""
        for follower in self._followers.of_users(user_ids):
            follower.request_close(4003, "Token revoked")

    def close_followers(self, session_id: str, code: int, reason: str) -> None:
        for follower in self._followers.of(session_id):
            follower.request_close(code, reason)

    def close_all_followers(self, code: int, reason: str) -> None:
        for session_id in self._followers.sessions():
            self.close_followers(session_id, code, reason)

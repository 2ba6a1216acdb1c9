"""The run registry: this server's runs, above the broker seam.

It puts the parts together: admission (``admission.py``) decides what a message does,
the broker (``broker.py``) holds what processes share (who owns a session's run, its
followers, queues, stop requests), each run lives its life (``lifecycle.py``) in its own
``CancelScope`` in the server-lifetime nursery, and persistence (``persistence.py``)
writes what it must. The registry never knows which broker it talks to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import trio

from . import admission
from .admission import Queued
from .errors import StoreError
from .lifecycle import Run, RunRequest, live
from .metrics import Metrics
from .persistence import Persistence

if TYPE_CHECKING:
    from .agents.base import Agent
    from .broker import Broker
    from .fanout import Follower
    from .store.base import Store

log = structlog.get_logger("navi_trio.runs")


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
        broker: Broker,
        save_timeout_s: float = 5.0,
        max_queued_runs: int = 4,
        max_run_events: int = 200_000,
        metrics: Metrics | None = None,
    ) -> None:
        self._nursery = server_nursery
        self.metrics = metrics if metrics is not None else Metrics.detached()
        self.store = store
        self.broker = broker
        self._agent = agent
        self._max_queued = max_queued_runs
        self._max_run_events = max_run_events
        #: The agent's own check of a message before its run starts, if it has one.
        self._check_message = getattr(agent, "check_message", None)
        self.persistence = Persistence(server_nursery, store, save_timeout_s, self.metrics)
        #: Set when shutdown begins: no new runs from then on.
        self.closing = trio.Event()
        #: Set once every run has ended after shutdown began.
        self.closed = trio.Event()

    # -- lookups -----------------------------------------------------------------------
    def active(self, session_id: str) -> Run | None:
        return self.broker.active(session_id)

    @property
    def runs(self) -> list[Run]:
        return self.broker.runs

    @property
    def queued_count(self) -> int:
        return self.broker.queued_count

    @property
    def unsaved_count(self) -> int:
        return self.persistence.unsaved_count

    async def current(self, session_id: str) -> Run | None:
        """The session's active run as a client sees it: a run that is over (ENDED: its
        terminal event is out) is waited for until SETTLED (its answer saved); then
        whatever runs next (a queued message's run) is the answer, or ``None``.

        A client that saw ``stream_end`` and at once reloads the history, reconnects, or
        presses stop must find the run over and its answer saved, not a run still
        "active": the lifecycle's one rule for readers, used by each of them.

        Cancellation: only waits on ``run.done``, which the run's shielded save sets
        within ``save_timeout_s``; a cancel just ends the wait.
        """
        run = self.broker.active(session_id)
        while run is not None and run.over:
            await run.done.wait()
            run = self.broker.active(session_id)
        return run

    async def wait_idle(self) -> None:
        """Return once no run is active (every run ended and its answer saved)."""
        await self.broker.wait_idle()

    # -- followers ---------------------------------------------------------------------
    def follow(self, session_id: str, follower: Follower) -> Run | None:
        """Register a connection for every future run of the session; return the active
        run (if any) so the caller can subscribe to it in the same synchronous step."""
        return self.broker.follow(session_id, follower)

    def unfollow(self, session_id: str, follower: Follower) -> None:
        self.broker.unfollow(session_id, follower)

    def followers(self, session_id: str) -> list[Follower]:
        return self.broker.followers(session_id)

    @property
    def follower_count(self) -> int:
        return self.broker.follower_count

    def connections_of(self, user_id: str) -> int:
        return self.broker.connections_of(user_id)

    async def serve_revocations(self, interval_s: float) -> None:
        """Close the connections of users revoked since they connected, within
        ``interval_s`` (revocation happens in another process: the CLI).

        Reads the store only while some connection belongs to a user. A store fault is
        logged and retried at the next tick.
        """
        while True:
            await trio.sleep(interval_s)
            if not self.broker.has_user_connections():
                continue
            try:
                revoked = await self.store.revoked_user_ids()
            except StoreError as exc:
                log.error("revocations.check_failed", error=str(exc))
                continue
            self.broker.revoke(revoked)

    async def serve_checkpoints(self, interval_s: float) -> None:
        """See :meth:`Persistence.serve_checkpoints`, over this server's runs."""
        broker = self.broker
        await self.persistence.serve_checkpoints(interval_s, lambda: broker.runs)

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
        closing = self.closing.is_set()
        if self._check_message is not None and not closing:
            self._check_message(request.original_content)
        sid = request.session_id
        active = self.broker.active(sid)
        verdict = admission.admit(
            sid,
            if_running,
            closing=closing,
            active=active is not None,
            active_over=active is not None and active.over,
            queue=self.broker.queued(sid),
            max_queued=self._max_queued,
        )
        if verdict.start:
            run = self._new_run(request)
            claimed = self.broker.claim(run)
            assert claimed  # no checkpoint since active() said the session is free
            self._launch(run)
            return run
        self.broker.enqueue(sid, Queued(request, interrupted=verdict.interrupted), verdict.at)
        if verdict.interrupted:
            self.broker.request_stop(sid, "user")
        return None

    async def admit(self, request: RunRequest, if_running: str = "reject") -> Run | None:
        """What a connection calls: :meth:`submit` here (no checkpoint, so one process's
        check-and-register stays one step); a cluster's registry decides it through Redis.
        Raises what :meth:`submit` raises."""
        return self.submit(request, if_running)

    async def stop_anywhere(self, session_id: str, reason: str) -> Run | None:
        """A DELETE's stop: :meth:`stop` here; a cluster's registry reaches the run
        wherever it plays. Await the returned run's ``done``."""
        return self.stop(session_id, reason)

    def _new_run(self, request: RunRequest) -> Run:
        return Run(request, max_events=self._max_run_events)

    def _launch(self, run: Run) -> None:
        """A claimed run: tell the followers, publish ``stream_start``, start its task."""
        self.persistence.run_started()
        self.broker.announce(run)
        run.start()
        self._nursery.start_soon(
            live, run, self._agent, self.persistence, self.metrics, self._settled, name=f"run:{run.id}"
        )

    def stop(self, session_id: str, reason: str = "user") -> Run | None:
        """Cancel the session's active run, if any (synchronous; await ``run.done``)."""
        return self.broker.request_stop(session_id, reason)

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
            self.broker.request_stop(session_id, "user")  # no checkpoint since current()
            await run.done.wait()
            self.metrics.stop_answered(asked_at)
        return run

    def forget_session(self, session_id: str) -> None:
        """Drop what was queued for a session that is being deleted."""
        self.broker.forget_queue(session_id)

    def _settled(self, run: Run) -> None:
        """Synchronous end of a run: hand the session to its next queued request's run
        (or free it), settle the run (re-attached readers sync, ``done`` is set), then
        start the successor."""
        sid = run.session_id
        # Never during shutdown: drain() empties the queues (saving what they held) in the
        # same step that makes submit() refuse new requests.
        nxt = self.broker.pop_queued(sid)
        successor = self._new_run(nxt.request) if nxt is not None else None
        self.broker.release(run, successor)
        self.metrics.run_ended(run, run.status)
        run.settle()
        if successor is not None:
            self._launch(successor)
            if admission.interrupts_successor(self.broker.queued(sid)):
                successor.cancel("user")  # a later message already interrupted this one

    # -- shutdown ----------------------------------------------------------------------
    async def drain(self, grace_s: float) -> None:
        """Refuse new runs, save the messages still queued (their runs will not start),
        give active runs ``grace_s`` to finish, then stop the rest with reason
        ``shutdown``; set :attr:`closed` when every run has ended and been saved.

        Cancellation: if this task is cancelled, runs still get cancelled by the server
        nursery going away, and each still writes its terminal event and saves.
        """
        self.closing.set()
        unstarted = self.broker.take_all_queued()
        if unstarted:
            await self.persistence.keep_unstarted(unstarted)
        with trio.move_on_after(grace_s):
            await self.broker.wait_idle()
        for run in self.runs:
            self.broker.request_stop(run.session_id, "shutdown")
        with trio.move_on_after(self.persistence.save_timeout_s + 1.0):
            await self.broker.wait_idle()
        self.closed.set()

    def close_followers(self, session_id: str, code: int, reason: str) -> None:
        self.broker.close_followers(session_id, code, reason)

    def close_all_followers(self, code: int, reason: str) -> None:
        self.broker.close_all_followers(code, reason)

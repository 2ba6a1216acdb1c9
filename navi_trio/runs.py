"""The run registry: this server's runs, above the broker seam.

It puts the parts together: admission (``admission.py``) decides what a message does,
the broker (``broker.py``) holds what the processes of a server share (who holds each
session, the queues, stop requests, notices), each run lives its life (``lifecycle.py``)
in its own ``CancelScope`` in the server-lifetime nursery, persistence
(``persistence.py``) writes what it must, and :class:`~navi_trio.local.LocalRuns` holds
what a connection subscribes to. The registry never knows which broker it talks to: one
process and a cluster take the same steps.

- **Admission** (:meth:`RunRegistry.admit`): look (the holder, the queue), decide, then
  claim or queue only if what was seen still holds; else look again.
- **Lookups** (:meth:`RunRegistry.current`): a session whose run plays elsewhere is
  mirrored here (the broker's view of it); a run that is over is waited for until
  settled (its answer saved), in one place, for every reader.
- **A run's end** (:meth:`RunRegistry._finish`): the broker hands the session on (to
  the next queued message's run, played here) or frees it; then the local table, the
  run settles, ``done`` is set, and the successor starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import structlog
import trio

from . import admission
from .admission import Queued
from .broker import BrokerUnavailable, Notice
from .errors import RunAlreadyActive, ShuttingDown, StoreError
from .lifecycle import Run, RunRequest, live
from .local import LocalRuns
from .metrics import Metrics
from .persistence import Persistence
from .store.base import Answer

if TYPE_CHECKING:
    from .agents.base import Agent
    from .broker import Broker, Watched
    from .events import RunLog
    from .fanout import Follower
    from .store.base import Store

log = structlog.get_logger("navi_trio.runs")

#: Looks at a session before admission gives up (other processes kept changing it).
ADMIT_TRIES: Final = 20
#: What a message is answered while the shared state does not answer.
BROKER_LOST: Final = "Redis is unreachable, so no answer can start now; try again shortly."


class RunRegistry:
    """The server's runs: at most one active run per session, plus a bounded queue,
    decided through ``broker`` (shared by every process of the server)."""

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
        #: What this process's connections subscribe to: its own runs, and mirrors.
        self.local = LocalRuns()
        self._agent = agent
        self._max_queued = max_queued_runs
        self._max_run_events = max_run_events
        #: The agent's own check of a message before its run starts, if it has one.
        self._check_message = getattr(agent, "check_message", None)
        self.persistence = Persistence(server_nursery, store, save_timeout_s, self.metrics)
        #: This process's own runs (the local table also holds mirrors of others').
        self.own_runs: set[Run] = set()
        self._own_idle = trio.Event()
        self._own_idle.set()
        #: Set when shutdown begins: no new runs from then on.
        self.closing = trio.Event()
        #: Set once every run has ended after shutdown began.
        self.closed = trio.Event()
        broker.bind(self._heard, self._save_orphan)

    # -- lookups -----------------------------------------------------------------------
    def active(self, session_id: str) -> Run | None:
        """The session's run in this process's table (its own, or a mirror)."""
        return self.local.active(session_id)

    @property
    def runs(self) -> list[Run]:
        """This process's own runs."""
        return list(self.own_runs)

    @property
    def queued_count(self) -> int:
        return self.broker.queued_count

    @property
    def unsaved_count(self) -> int:
        return self.persistence.unsaved_count

    async def current(self, session_id: str) -> Run | None:
        """The session's active run as a client sees it, wherever it plays (mirrored here
        if elsewhere, its first event read, so an attach replays from ``stream_start``):
        a run that is over (its terminal event is out) is waited for until settled (its
        answer saved); then whatever runs next (a queued message's run) is the answer,
        or ``None``.

        A client that saw ``stream_end`` and at once reloads the history, reconnects, or
        presses stop must find the run over and its answer saved, not a run still
        "active": the lifecycle's one rule for readers, used by each of them.

        With the broker lost: this process's own view.

        Cancellation: only waits (on a mirror's first read, on ``run.done``, which the
        run's shielded save sets within ``save_timeout_s``); a cancel just ends the wait.
        """
        for _ in range(ADMIT_TRIES):
            try:
                holder = await self.broker.holder(session_id)
            except BrokerUnavailable:
                holder = None
            if holder is not None and holder.owner != self.broker.owner:
                remote = await self._nursery.start(self._mirror, session_id, holder.run_id)
                with trio.move_on_after(self.persistence.save_timeout_s):
                    await remote.first.wait()
                if remote.over:
                    await remote.done.wait()
                    continue  # look again: a queued message's run may play now
            return await self._current_here(session_id)
        return None

    async def _current_here(self, session_id: str) -> Run | None:
        """:meth:`current` in this process's table: a run that is over is waited for."""
        run = self.local.active(session_id)
        while run is not None and run.over:
            await run.done.wait()
            run = self.local.active(session_id)
        return run

    async def wait_idle(self) -> None:
        """Return once none of this process's runs is active (each ended and saved)."""
        await self._own_idle.wait()

    # -- followers ---------------------------------------------------------------------
    def follow(self, session_id: str, follower: Follower) -> Run | None:
        """Register a connection for every future run of the session; return the active
        run (if any) so the caller can subscribe to it in the same synchronous step."""
        return self.local.follow(session_id, follower)

    def unfollow(self, session_id: str, follower: Follower) -> None:
        self.local.unfollow(session_id, follower)

    def followers(self, session_id: str) -> list[Follower]:
        return self.local.followers(session_id)

    @property
    def follower_count(self) -> int:
        return self.local.follower_count

    def connections_of(self, user_id: str) -> int:
        return self.local.connections_of(user_id)

    async def serve_broker(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:  # noqa: ASYNC114, ASYNC128
        """The broker's own tasks (see :meth:`Broker.serve`)."""
        await self.broker.serve(task_status=task_status)

    async def serve_revocations(self, interval_s: float) -> None:
        """Close the connections of users revoked since they connected, within
        ``interval_s`` (revocation happens in another process: the CLI).

        Reads the store only while some connection belongs to a user. A store fault is
        logged and retried at the next tick.
        """
        while True:
            await trio.sleep(interval_s)
            if not self.local.has_user_connections():
                continue
            try:
                revoked = await self.store.revoked_user_ids()
            except StoreError as exc:
                log.error("revocations.check_failed", error=str(exc))
                continue
            self.local.revoke(revoked)

    async def serve_checkpoints(self, interval_s: float) -> None:
        """See :meth:`Persistence.serve_checkpoints`, over this process's own runs (the
        local table also holds mirrors of runs other processes checkpoint)."""
        own = self.own_runs
        await self.persistence.serve_checkpoints(interval_s, lambda: own)

    # -- the broker's notices ----------------------------------------------------------
    def _heard(self, notice: Notice) -> None:
        """A notice from another process: mirror a run that started there if some
        connection here follows its session; close the followers of a deleted session.
        (The broker itself acts on ``stop`` notices for the runs it owns.)"""
        if notice.owner == self.broker.owner:
            return
        if notice.kind == "run_started":
            if self.local.followers(notice.session_id):
                self._nursery.start_soon(self._mirror, notice.session_id, notice.run_id)
        elif notice.kind == "close":
            self.local.close_followers(notice.session_id, notice.code, notice.reason)

    async def _mirror(  # noqa: ASYNC114
        self, session_id: str, run_id: str, *, task_status: trio.TaskStatus[Watched] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Mirror a run played elsewhere while it lives: make it the session's run in the
        local table, tell the local followers it started, and drop it once settled."""
        held = self.local.active(session_id)
        if held is not None and held.id == run_id:
            task_status.started(held)  # type: ignore[arg-type]  # already mirrored here
            return
        async with trio.open_nursery() as nursery:
            remote: Watched = await nursery.start(self.broker.watch, session_id, run_id)
            remote.on_cancel = self._ask_stop
            local = self._may_take_local(remote)
            if local:
                self._take_local(remote)  # type: ignore[arg-type]  # a mirror plays a Run's part here
                self.local.announce(remote)  # type: ignore[arg-type]
            task_status.started(remote)
        if local:
            self.local.release(remote)  # type: ignore[arg-type]

    def _take_local(self, run: Run) -> None:
        """Make ``run`` the session's run in the local table, dropping a mirror the
        server has moved past (its settled marker may not have been read here yet)."""
        held = self.local.active(run.session_id)
        if held is not None and held is not run:
            self.local.release(held)
        claimed = self.local.claim(run)
        assert claimed

    def _may_take_local(self, remote: Watched) -> bool:
        """Whether a mirror may be the session's run here: not over a live run it would
        hide (a stop's mirror of a run that has just ended, while its successor plays)."""
        held = self.local.active(remote.session_id)
        return held is None or held.over

    def _ask_stop(self, remote: Watched, reason: str) -> None:
        self._nursery.start_soon(self._request_stop, remote.session_id, remote.id, reason)

    async def _request_stop(self, session_id: str, run_id: str, reason: str) -> None:
        try:
            await self.broker.request_stop(session_id, run_id, reason)
        except BrokerUnavailable as exc:
            log.error("runs.stop_lost", run_id=run_id, error=str(exc))

    async def _save_orphan(self, session_id: str, answer_id: str, run_log: RunLog) -> None:
        """The answer of a run whose owner died, as its log was read: ``interrupted``."""
        answer = Answer(
            id=answer_id,
            session_id=session_id,
            status="interrupted",
            content=run_log.content,
            thinking=run_log.thinking_text,
            tool_calls=[t.as_dict() for t in run_log.tool_calls],
        )
        await self.store.save_answer(answer)

    # -- starting ----------------------------------------------------------------------
    async def admit(self, request: RunRequest, if_running: str = "reject") -> Run | None:
        """Start a run for ``request`` now, or as ``if_running`` says when one is active.

        Returns the new run, or None when the request was queued (``enqueue``, or
        ``interrupt``: it starts as soon as the stopped run has ended).

        Raises:
            BadClientMessage: the agent refuses the message (a script over its bounds).
            RunAlreadyActive: ``reject`` and a run is active.
            QueueFull: ``enqueue`` and the session's queue is at its bound.
            ShuttingDown: the server is draining, or the broker does not answer.

        Cancellation: each step is one atomic step of the broker; a cancel between them
        leaves either nothing, or a claimed session whose run starts here (no checkpoint
        between the claim and the run's registration).
        """
        closing = self.closing.is_set()
        if self._check_message is not None and not closing:
            self._check_message(request.original_content)
        try:
            return await self._admit(request, if_running)
        except BrokerUnavailable as exc:
            log.error("runs.admit_failed", error=str(exc))
            raise ShuttingDown(BROKER_LOST) from None

    def submit(self, request: RunRequest, if_running: str = "reject") -> Run | None:
        """:meth:`admit` as one synchronous step, for a broker that answers without
        waiting (the in-process one): what the agent-testing kit and unit tests use to
        start or interrupt a run between two task steps. Returns and raises what
        :meth:`admit` does; the same code decides.

        Raises:
            RuntimeError: the broker had to wait (a cluster's): await :meth:`admit`.
        """
        step = self.admit(request, if_running)
        try:
            step.send(None)
        except StopIteration as done:
            run: Run | None = done.value
            return run
        step.close()
        raise RuntimeError("submit() needs a broker that answers at once; await admit() instead")

    async def _admit(self, request: RunRequest, if_running: str) -> Run | None:
        sid = request.session_id
        broker = self.broker
        for _ in range(ADMIT_TRIES):
            holder, queue = await broker.look(sid)
            held = self.local.active(sid)
            over = holder is not None and held is not None and held.id == holder.run_id and held.over
            verdict = admission.admit(
                sid,
                if_running,
                closing=self.closing.is_set(),
                active=holder is not None,
                active_over=over,
                queue=queue,
                max_queued=self._max_queued,
            )
            if verdict.start:
                run = self._new_run(request)
                if not await broker.claim(sid, run.id):
                    continue
                self._start_own(run)
                await self._own(run)
                self._launch(run)
                return run
            queued = Queued(request, interrupted=verdict.interrupted)
            if await broker.enqueue(sid, queued, verdict.at, holder=holder, length=len(queue)):
                if verdict.interrupted and holder is not None:
                    await broker.request_stop(sid, holder.run_id, "user")
                return None
        raise RunAlreadyActive(sid)

    def _new_run(self, request: RunRequest, run_id: str | None = None) -> Run:
        if run_id is None:
            return Run(request, max_events=self._max_run_events)
        return Run(request, id=run_id, max_events=self._max_run_events)

    def _start_own(self, run: Run) -> None:
        self._take_local(run)
        self.own_runs.add(run)
        if self._own_idle.is_set():
            self._own_idle = trio.Event()

    async def _own(self, run: Run) -> None:
        """:meth:`Broker.own`; with the broker lost meanwhile the run plays on here (the
        Redis broker's writer ends it with an ``error`` naming Redis)."""
        try:
            await self.broker.own(run)
        except BrokerUnavailable as exc:
            log.error("runs.own_failed", run_id=run.id, error=str(exc))

    def _launch(self, run: Run) -> None:
        """A claimed, owned run: tell the followers, publish ``stream_start``, start its task."""
        self.persistence.run_started()
        self.local.announce(run)
        run.start()
        self._nursery.start_soon(
            live, run, self._agent, self.persistence, self.metrics, self._settled, name=f"run:{run.id}"
        )

    # -- the end of a run --------------------------------------------------------------
    def _settled(self, run: Run) -> None:
        """The run task's last step (synchronous): what follows needs the broker."""
        self._nursery.start_soon(self._finish, run, name=f"finish:{run.id}")

    async def _finish(self, run: Run) -> None:
        """The broker hands the session on (its terminal event out, the run settled
        there); then the local table, the run settles (re-attached readers sync, ``done``
        is set), and the successor starts, so a stop answers after all of it.

        Cancellation: shielded and bounded by the save timeout (it is a run's cleanup).
        """
        passed = None
        closing = self.closing.is_set()
        with trio.move_on_after(self.persistence.save_timeout_s, shield=True):
            with contextlib.suppress(BrokerUnavailable):
                passed = await self.broker.finish(run, hand_on=not closing)
            if closing:  # what waited for it will not start: saved as unstarted
                await self._keep_queues_unstarted([run.session_id])
        successor = None
        if passed is not None:
            queued, successor_id = passed
            successor = self._new_run(queued.request, successor_id)
        self.local.release(run, successor)
        self.own_runs.discard(run)
        self.metrics.run_ended(run, run.status)
        run.settle()
        if successor is None:
            if not self.own_runs:
                self._own_idle.set()
            return
        self.own_runs.add(successor)
        with trio.move_on_after(self.persistence.save_timeout_s, shield=True):
            await self._own(successor)
        self._launch(successor)
        with contextlib.suppress(BrokerUnavailable):
            if admission.interrupts_successor(await self.broker.queued(run.session_id)):
                successor.cancel("user")  # a later message already interrupted this one

    async def _keep_queues_unstarted(self, session_ids: Iterable[str]) -> None:
        """Take what waits for these sessions and save it as unstarted, in one store call."""
        unstarted: list[RunRequest] = []
        for session_id in session_ids:
            with contextlib.suppress(BrokerUnavailable):
                unstarted += [queued.request for queued in await self.broker.forget_queue(session_id)]
        if unstarted:
            await self.persistence.keep_unstarted(unstarted)

    # -- stops, deletes, closes --------------------------------------------------------
    def stop(self, session_id: str, reason: str = "user") -> Run | None:
        """Cancel the session's run in this process's table, if any (synchronous; await
        ``run.done``). A mirror passes the stop on to the process that plays it."""
        return self.local.stop(session_id, reason)

    async def stop_current(self, session_id: str) -> Run | None:
        """A client's stop, wherever the run plays: stop the session's live run and
        return it once it has really ended, its answer saved; or ``None`` when nothing
        runs. A run whose terminal event is already out is over, not stopped: it is
        waited for until settled, then whatever runs next (a queued message's run) is
        the one stopped.

        The look and, for a run played elsewhere, the stop request are one step of the
        broker (:meth:`Broker.stop_live`), so a stop across processes costs one round
        trip before the owner hears it.

        Cancellation: the run is asked to stop before any wait, so a cancel of the caller
        only ends the wait; the run still ends and saves in its own shielded cleanup.
        """
        asked_at = trio.current_time()
        for _ in range(ADMIT_TRIES):
            try:
                holder, live = await self.broker.stop_live(session_id, "user")
            except BrokerUnavailable:
                holder, live = None, False  # this process's own view
            if holder is None or holder.owner == self.broker.owner:
                run = await self._current_here(session_id)
                if run is None:
                    return None
                run.cancel("user")
            else:
                run = await self._nursery.start(self._mirror, session_id, holder.run_id)
                if not live:
                    await run.done.wait()
                    continue  # it was over: look again
            await run.done.wait()
            self.metrics.stop_answered(asked_at)
            return run
        return None

    async def stop_anywhere(self, session_id: str, reason: str) -> Run | None:
        """A DELETE's stop, wherever the run plays; return the run (await ``done``)."""
        run = await self.current(session_id)
        if run is not None:
            run.cancel(reason)
        return run

    def forget_session(self, session_id: str) -> None:
        """Drop what was queued for a session that is being deleted."""
        self._nursery.start_soon(self._forget_queue, session_id)

    async def _forget_queue(self, session_id: str) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self.broker.forget_queue(session_id)

    def close_followers(self, session_id: str, code: int, reason: str) -> None:
        """Close the session's followers here and in every other process."""
        self.local.close_followers(session_id, code, reason)
        self._nursery.start_soon(self._close_elsewhere, session_id, code, reason)

    async def _close_elsewhere(self, session_id: str, code: int, reason: str) -> None:
        try:
            await self.broker.close_followers(session_id, code, reason)
        except BrokerUnavailable as exc:
            log.error("runs.close_lost", session_id=session_id, error=str(exc))

    def close_all_followers(self, code: int, reason: str) -> None:
        """Close every connection of this process (a restart: they reconnect elsewhere)."""
        self.local.close_all_followers(code, reason)

    # -- shutdown ----------------------------------------------------------------------
    async def drain(self, grace_s: float) -> None:
        """Refuse new runs here, save the messages queued behind this process's runs
        (they will not start), give its runs ``grace_s`` to finish, then stop the rest
        with reason ``shutdown``; set :attr:`closed` when each has ended and been saved.
        Other processes' runs go on (their followers here are closed by the caller and
        reconnect elsewhere).

        Cancellation: if this task is cancelled, runs still get cancelled by the server
        nursery going away, and each still writes its terminal event and saves.
        """
        self.closing.set()
        await self._keep_queues_unstarted({run.session_id for run in self.own_runs})
        with trio.move_on_after(grace_s):
            await self.wait_idle()
        for run in self.runs:
            run.cancel("shutdown")
        with trio.move_on_after(self.persistence.save_timeout_s + 1.0):
            await self.wait_idle()
        self.closed.set()

"""The run registry of a process in a cluster: the in-process machinery, with the
session table, queues, stops and run-started notices decided through Redis.

The local in-process broker (``broker.py``) stays what connections talk to (its
synchronous steps are what keep a connection's subscribe gap-free), and becomes this
process's *view* of the cluster: the session table holds this process's own runs and,
for sessions a local connection follows, the :class:`~navi_trio.cluster.node.RemoteRun`
of a run played elsewhere (a fan-out over the run's stream). So attach, resume, catch-up,
a stop's wait on ``run.done`` work unchanged on either kind of run.

What must be cluster-wide goes through :class:`~navi_trio.cluster.node.ClusterNode`,
which is why the cluster's entry points are async: :meth:`ClusterRegistry.admit` (look,
decide with ``admission.py``, then claim or queue only if what it saw still holds; else
look again), :meth:`current` (a session whose run plays elsewhere is looked up and
mirrored), and the end of a run (terminal event in its stream, settled, then the session
handed on in one step).
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import structlog
import trio

from .. import admission
from ..admission import Queued
from ..errors import RunAlreadyActive, ShuttingDown
from ..lifecycle import Run, RunRequest
from ..runs import RunRegistry
from ..store.base import Answer
from .bus import Notice
from .node import REDIS_DOWN, ClusterNode, RemoteRun
from .redis import Client, Keys, connect

if TYPE_CHECKING:
    from ..agents.base import Agent
    from ..broker import Broker
    from ..events import RunLog
    from ..metrics import Metrics
    from ..settings import Settings
    from ..store.base import Store

log = structlog.get_logger("navi_trio.cluster")

#: Looks at the session before admission gives up (another process kept changing it).
ADMIT_TRIES: Final = 20
#: What a message is answered while Redis does not answer.
REDIS_LOST: Final = "Redis is unreachable, so no answer can start now; try again shortly."


class ClusterRegistry(RunRegistry):
    """A :class:`~navi_trio.runs.RunRegistry` whose sessions are shared by a cluster.

    ``broker`` is this process's local view (an in-process broker, from the composition
    root): its session table holds this process's runs and the mirrors of others'.
    """

    def __init__(
        self,
        server_nursery: trio.Nursery,
        store: Store,
        agent: Agent,
        *,
        broker: Broker,
        client: Client,
        keys: Keys,
        owner: str,
        lease_s: float,
        save_timeout_s: float = 5.0,
        max_queued_runs: int = 4,
        max_run_events: int = 200_000,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(
            server_nursery,
            store,
            agent,
            broker=broker,
            save_timeout_s=save_timeout_s,
            max_queued_runs=max_queued_runs,
            max_run_events=max_run_events,
            metrics=metrics,
        )
        self.node = ClusterNode(
            client,
            keys,
            owner,
            lease_s=lease_s,
            max_run_events=max_run_events,
            on_notice=self._heard,
            on_orphan=self._save_orphan,
        )
        self._server_nursery = server_nursery
        #: This process's own runs (the session table also holds remote ones).
        self.own_runs: set[Run] = set()
        self._own_idle = trio.Event()
        self._own_idle.set()

    # -- the node's notices ------------------------------------------------------------
    def _heard(self, notice: Notice) -> None:
        if notice.kind == "run_started" and notice.owner != self.node.owner:
            if self.broker.followers(notice.session_id):
                self._server_nursery.start_soon(self._mirror, notice.session_id, notice.run_id)
        elif notice.kind == "close" and notice.owner != self.node.owner:
            self.broker.close_followers(notice.session_id, notice.code, notice.reason)

    async def _mirror(  # noqa: ASYNC114
        self, session_id: str, run_id: str, *, task_status: trio.TaskStatus[RemoteRun | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Mirror a run played elsewhere while it lives: make it the session's run in the
        local table, tell the local followers it started, and drop it once settled."""
        held = self.broker.active(session_id)
        if held is not None and held.id == run_id:
            task_status.started(held if isinstance(held, RemoteRun) else None)  # type: ignore[unreachable]
            return
        async with trio.open_nursery() as nursery:
            remote: RemoteRun = await nursery.start(self.node.watch, session_id, run_id)
            remote.on_cancel = self._ask_stop
            local = self._may_take_local(remote)
            if local:
                self._take_local(remote)  # type: ignore[arg-type]  # a RemoteRun plays a Run's part here
                self.broker.announce(remote)  # type: ignore[arg-type]
            task_status.started(remote)
        if local:
            self.broker.release(remote)  # type: ignore[arg-type]

    def _take_local(self, run: Run) -> None:
        """Make ``run`` the session's run in the local table, dropping a remote run the
        cluster has moved past (its settled marker may not have been read here yet)."""
        held = self.broker.active(run.session_id)
        if held is not None and held is not run:
            self.broker.release(held)
        assert self.broker.claim(run)

    def _may_take_local(self, remote: RemoteRun) -> bool:
        """Whether a mirror may be the session's run here: not over a live run it would
        hide (a stop's mirror of a run that has just ended, while its successor plays)."""
        held = self.broker.active(remote.session_id)
        return held is None or held.over

    def _ask_stop(self, remote: RemoteRun, reason: str) -> None:
        notice = Notice("stop", remote.session_id, remote.id, reason=reason)
        self._server_nursery.start_soon(self._publish, notice)

    async def _publish(self, notice: Notice) -> None:
        try:
            await self.node.bus.publish(notice)
        except REDIS_DOWN as exc:
            log.error("cluster.notice_lost", kind=notice.kind, error=str(exc))

    async def _save_orphan(self, session_id: str, answer_id: str, run_log: RunLog) -> None:
        answer = Answer(
            id=answer_id,
            session_id=session_id,
            status="interrupted",
            content=run_log.content,
            thinking=run_log.thinking_text,
            tool_calls=[t.as_dict() for t in run_log.tool_calls],
        )
        await self.store.save_answer(answer)

    # -- admission ---------------------------------------------------------------------
    async def admit(self, request: RunRequest, if_running: str = "reject") -> Run | None:
        """:meth:`RunRegistry.submit`, decided for the whole cluster.

        Cancellation: each step is one atomic Redis script; a cancel between them leaves
        either nothing, or a claimed session whose run starts here (no checkpoint
        between the claim and the run's registration).
        """
        closing = self.closing.is_set()
        if self._check_message is not None and not closing:
            self._check_message(request.original_content)
        try:
            return await self._admit(request, if_running)
        except REDIS_DOWN as exc:
            log.error("cluster.admit_failed", error=str(exc) or type(exc).__name__)
            raise ShuttingDown(REDIS_LOST) from None

    async def _admit(self, request: RunRequest, if_running: str) -> Run | None:
        sid = request.session_id
        node = self.node
        for _ in range(ADMIT_TRIES):
            holder = await node.holder(sid)
            queue = await node.queues.view(sid)
            held = self.broker.active(sid)
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
                if not await node.claim(sid, run.id):
                    continue
                self._start_own(run)
                await self._own(run)
                self._launch(run)
                return run
            queued = Queued(request, interrupted=verdict.interrupted)
            if await node.queues.insert(sid, queued, verdict.at, holder=holder, length=len(queue)):
                if verdict.interrupted and holder is not None:
                    await node.bus.publish(Notice("stop", sid, holder.run_id, reason="user"))
                return None
        raise RunAlreadyActive(sid)

    async def _own(self, run: Run) -> None:
        """:meth:`ClusterNode.own`; with Redis lost meanwhile the run plays on here and
        its writer ends it with an ``error`` naming Redis."""
        try:
            await self.node.own(run)
        except REDIS_DOWN as exc:
            log.error("cluster.own_failed", run_id=run.id, error=str(exc) or type(exc).__name__)

    def _start_own(self, run: Run) -> None:
        self._take_local(run)
        self.own_runs.add(run)
        if self._own_idle.is_set():
            self._own_idle = trio.Event()

    # -- lookups -----------------------------------------------------------------------
    async def current(self, session_id: str) -> Run | None:
        """The session's run wherever it plays (mirrored here if it plays elsewhere, its
        first event read, so an attach replays from ``stream_start``); one that is over
        is waited for until settled, as in one process. With Redis lost: this process's
        own view."""
        try:
            holder = await self.node.holder(session_id)
        except REDIS_DOWN:
            return await super().current(session_id)
        if holder is not None and holder.owner != self.node.owner:
            remote = await self._server_nursery.start(self._mirror, session_id, holder.run_id)
            if remote is not None:
                with trio.move_on_after(self.persistence.save_timeout_s):
                    await remote.first.wait()
        return await super().current(session_id)

    # -- the end of a run --------------------------------------------------------------
    def _settled(self, run: Run) -> None:
        self._server_nursery.start_soon(self._finish, run)

    async def _finish(self, run: Run) -> None:
        """The terminal event into the stream, settled, the session handed on; then the
        local table and ``run.done``, so a stop asked here answers after all of it.

        Cancellation: shielded and bounded by the save timeout (it is a run's cleanup)."""
        passed = None
        closing = self.closing.is_set()
        with trio.move_on_after(self.persistence.save_timeout_s, shield=True):
            passed = await self.node.finish(run, hand_on=not closing)
            if closing:  # what waited for it will not start: saved as unstarted, as in one process
                with contextlib.suppress(*REDIS_DOWN):
                    unstarted = [q.request for q in await self.node.queues.forget(run.session_id)]
                    if unstarted:
                        await self.persistence.keep_unstarted(unstarted)
        successor = None
        if passed is not None:
            queued, successor_id = passed
            successor = Run(queued.request, id=successor_id, max_events=self._max_run_events)
        self.broker.release(run, successor)
        self.own_runs.discard(run)
        run.settle()
        if successor is not None:
            self.own_runs.add(successor)
            with trio.move_on_after(self.persistence.save_timeout_s, shield=True):
                await self._own(successor)
            self._launch(successor)
            with contextlib.suppress(*REDIS_DOWN):
                if admission.interrupts_successor(await self.node.queues.view(run.session_id)):
                    successor.cancel("user")
        elif not self.own_runs:
            self._own_idle.set()

    # -- stops, deletes, closes --------------------------------------------------------
    async def stop_current(self, session_id: str) -> Run | None:
        """A client's stop, wherever the run plays. For a run played elsewhere the stop
        notice goes out as soon as its holder is known, before this process mirrors the
        run to wait for its end (settled: its answer saved); the run is returned then.

        Cancellation: as :meth:`RunRegistry.stop_current`; the notice is sent or not."""
        try:
            holder = await self.node.holder(session_id)
        except REDIS_DOWN:
            return await super().stop_current(session_id)  # this process's own view
        held = self.broker.active(session_id)
        if holder is None or holder.owner == self.node.owner or (held is not None and held.id == holder.run_id):
            return await super().stop_current(session_id)
        await self._publish(Notice("stop", session_id, holder.run_id, reason="user"))
        remote = await self._server_nursery.start(self._mirror, session_id, holder.run_id)
        if remote is None:
            return await super().stop_current(session_id)
        await remote.done.wait()
        return remote  # type: ignore[no-any-return]  # a RemoteRun plays a Run's part here

    async def stop_anywhere(self, session_id: str, reason: str) -> Run | None:
        """Stop the session's run wherever it plays (a DELETE); return it (await ``done``)."""
        run = await self.current(session_id)
        if run is not None:
            self.broker.request_stop(session_id, reason)
        return run

    def forget_session(self, session_id: str) -> None:
        self._server_nursery.start_soon(self._forget_queue, session_id)

    async def _forget_queue(self, session_id: str) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            await self.node.queues.forget(session_id)

    def close_followers(self, session_id: str, code: int, reason: str) -> None:
        self.broker.close_followers(session_id, code, reason)
        notice = Notice("close", session_id, owner=self.node.owner, reason=reason, code=code)
        self._server_nursery.start_soon(self._publish, notice)

    # -- this process's own runs ------------------------------------------------------
    @property
    def runs(self) -> list[Run]:
        return list(self.own_runs)

    async def serve_checkpoints(self, interval_s: float) -> None:
        """Checkpoints of this process's own runs (the local table also holds mirrors of
        runs other processes play and checkpoint)."""
        own = self.own_runs
        await self.persistence.serve_checkpoints(interval_s, lambda: own)

    async def wait_idle(self) -> None:
        await self._own_idle.wait()

    async def drain(self, grace_s: float) -> None:
        """Refuse new runs here, give this process's runs ``grace_s``, then stop them with
        reason ``shutdown``; other processes' runs go on (their followers here are closed
        by the caller and reconnect elsewhere). Queues stay in Redis for the session's
        owner; a queue behind a run of ours goes with it (saved as unstarted)."""
        self.closing.set()
        with trio.move_on_after(grace_s):
            await self.wait_idle()
        for run in self.runs:
            run.cancel("shutdown")
        with trio.move_on_after(self.persistence.save_timeout_s + 1.0):
            await self.wait_idle()
        self.closed.set()


@contextlib.asynccontextmanager
async def open_cluster_client(settings: Settings) -> AsyncIterator[Client | None]:
    """The Redis client of a cluster (``NAVI_REDIS_URL``), or None for one process.

    Raises:
        RedisUnavailable: Redis does not answer at startup (a startup failure).
    """
    if not settings.redis_url:
        yield None
        return
    async with connect(settings.redis_url) as client:
        yield client


def cluster_registry(
    server_nursery: trio.Nursery,
    store: Store,
    agent: Agent,
    settings: Settings,
    client: Client,
    broker: Broker,
    metrics: Metrics,
) -> ClusterRegistry:
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return ClusterRegistry(
        server_nursery,
        store,
        agent,
        broker=broker,
        client=client,
        keys=Keys(),
        owner=owner,
        lease_s=settings.lease_s,
        save_timeout_s=settings.save_timeout_s,
        max_queued_runs=settings.max_queued_runs,
        max_run_events=settings.max_run_events,
        metrics=metrics,
    )

"""The Redis broker: the :class:`~navi_trio.broker.Broker` that makes processes one server.

Each part of the seam is one small module of Redis keys (``lease.py``, ``stream.py``,
``bus.py``, ``queues.py``); this one puts them together for one process (``owner`` names
it in leases and notices):

- **its own runs**: :meth:`RedisBroker.claim` takes the session's lease; :meth:`own`
  mirrors the run's log into its stream (a subscriber of the run like any connection,
  whose writer is a task that appends batches: the run never waits for Redis), renews the
  lease while the run lives and announces it on the bus; :meth:`finish` waits until the
  terminal event is in the stream, marks the run settled (its answer is saved: the caller
  calls it after the save) and hands the session on (to the next queued message's run)
  or frees it;
- **runs played elsewhere**: :meth:`watch` gives a :class:`RemoteRun`, a
  :class:`~navi_trio.fanout.FanOut` over a :class:`~navi_trio.cluster.stream.MirrorLog`
  fed by a task that reads the run's stream, so a connection subscribes to it, replays,
  resumes and catches up exactly as from a local run;
- **stops from anywhere**: :meth:`request_stop` is a ``stop`` notice on the bus, which the
  process playing the run acts on;
- **dead owners**: :meth:`sweep` finds runs whose lease has expired and ends each once in
  the cluster (``stream_stopped`` reason ``shutdown``), handing the rebuilt log to
  ``on_orphan`` to save its answer ``interrupted``.

A lost Redis raises :class:`~navi_trio.cluster.redis.RedisUnavailable` (a
:class:`~navi_trio.broker.BrokerUnavailable`) from every method of the seam.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Final, cast

import coredis.exceptions
import structlog
import trio

from ..broker import Holder, Notice, OnNotice, OnOrphan, Watched
from ..errors import StoreError
from ..events import Event, RunLog
from ..fanout import FanOut, Subscriber, WireFlush
from .bus import BUS_MAXLEN, Bus
from .lease import Leases
from .queues import Queues
from .redis import CONNECTION_ERRORS, Client, Keys, RedisUnavailable, connect
from .stream import (
    APPEND_SCRIPT,
    APPEND_SHA,
    OVER_LUA,
    MirrorLog,
    RunStream,
    RunTakenOver,
    StreamReader,
    end_orphan,
    ended_unsettled,
    rebuild,
)

if TYPE_CHECKING:
    from ..admission import Queued
    from ..lifecycle import Run
    from ..settings import Settings

log = structlog.get_logger("navi_trio.cluster")

#: What a lost Redis raises.
REDIS_DOWN: Final = (*CONNECTION_ERRORS, RedisUnavailable)
#: How often a task that lost Redis tries again.
RETRY_S: Final = 0.5
# KEYS: the session's lease, the bus. ARGV: the asker, the reason, the log keys' prefix,
# the bus bound, the session. Returns false (nobody holds the session), or {holder, live}:
# live is 1 if the run's terminal event is not in its stream yet; then, if another process
# plays it, the stop notice is on the bus, sent in the same step as the look.
_STOP_LIVE: Final = (
    OVER_LUA
    + """
local holder = redis.call('GET', KEYS[1])
if not holder then return false end
local space = string.find(holder, ' ', 1, true)
local run_id, owner = string.sub(holder, 1, space - 1), string.sub(holder, space + 1)
if over(redis.call('XREVRANGE', ARGV[3] .. run_id, '+', '-', 'COUNT', 1)) then return {holder, 0} end
if owner ~= ARGV[1] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
    'k', 'stop', 's', ARGV[5], 'r', run_id, 'o', '', 'x', ARGV[2], 'c', '0')
end
return {holder, 1}
"""
)
#: How often the messages waiting behind this process's runs are counted.
QUEUED_COUNT_S: Final = 1.0
#: Bound on saving an orphaned run's answer and settling it (a sweep must not hang).
ORPHAN_SAVE_S: Final = 10.0


def _nobody(notice: Notice) -> None:
    pass


async def _unsaved(session_id: str, answer_id: str, run_log: RunLog) -> None:  # noqa: ASYNC124 (an OnOrphan)
    log.error("cluster.orphan_not_saved", session_id=session_id)


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    """What the seam's callers see of a lost Redis: :class:`RedisUnavailable`."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable(f"Redis is unreachable: {exc or type(exc).__name__}") from exc


def redis_lost_message(exc: BaseException) -> str:
    """The ``error`` a run ends with when Redis is lost (no URL: it may hold a password)."""
    return f"Redis is unreachable ({exc or type(exc).__name__}): the answer was ended."


class RemoteRun(FanOut):
    """A run played by another process, as this one sees it: its id, its session, and
    its log as read from its stream so far. Subscribers are fed as the stream is read."""

    __slots__ = ("done", "first", "id", "log", "on_cancel", "session_id", "subscribers", "wire")

    def __init__(self, run_id: str, session_id: str) -> None:
        self.id = run_id
        self.session_id = session_id
        self.log = MirrorLog(run_id)  # type: ignore[assignment]  # walks as a RunLog does
        self.subscribers: list[Subscriber] = []
        self.wire = WireFlush()
        #: Set once the run is settled (its answer saved by its owner).
        self.done = trio.Event()
        #: Set once its first event has been read.
        self.first = trio.Event()
        #: How a stop asked here reaches the process that plays it.
        self.on_cancel: Callable[[Watched, str], None] | None = None

    def cancel(self, reason: str) -> None:
        """Ask the run to stop (wherever it plays); ``done`` says when it has."""
        if self.on_cancel is not None and not self.over:
            self.on_cancel(self, reason)

    @property
    def mirror(self) -> MirrorLog:
        return self.log  # type: ignore[return-value]

    @property
    def over(self) -> bool:
        return self.mirror.finished

    @property
    def settled(self) -> bool:
        return self.mirror.settled


class StreamOutbox:
    """The owner's subscription to its own run: what the run publishes, queued for the
    broker's appender, which sends every owned run's waiting events to Redis in one
    pipeline per round trip. Never full (bounded by the run's own event bound), so the
    run never waits for Redis."""

    def __init__(self, ready: Callable[[], None]) -> None:
        self.pending: list[Event] = []
        self._ready = ready

    def offer(self, frame: Event | str) -> bool:
        if type(frame) is Event:
            self.pending.append(frame)
            self._ready()
        return True

    def wake(self) -> None:
        pass

    def fall_behind(self, sub: Subscriber) -> None:  # never: offer never refuses
        raise AssertionError("a stream outbox never falls behind")

    @property
    def behind(self) -> bool:
        return False


class _Owned:
    """What the node keeps for a run it plays."""

    __slots__ = ("flushed", "outbox", "run", "stream", "sub")

    def __init__(self, run: Run, stream: RunStream, outbox: StreamOutbox, sub: Subscriber) -> None:
        self.run = run
        self.stream = stream
        self.outbox = outbox
        self.sub = sub
        #: Set once the terminal event is in the stream (or the run cannot write any more).
        self.flushed = trio.Event()


class RedisBroker:
    """One process's end of the Redis broker (``owner`` names it in leases and notices)."""

    def __init__(
        self,
        client: Client,
        keys: Keys,
        owner: str,
        *,
        lease_s: float,
        max_run_events: int,
    ) -> None:
        self._client = client
        self.keys = keys
        self.owner = owner
        self.lease_s = lease_s
        self._max_events = max_run_events
        self.leases = Leases(client, keys, owner, lease_s)
        self.queues = Queues(client, keys, owner, self.leases.lease_ms)
        self.bus = Bus(client, keys)
        self._stop_live = client.register_script(_STOP_LIVE)
        self._on_notice: OnNotice = _nobody
        self._on_orphan: OnOrphan = _unsaved
        self._owned: dict[str, _Owned] = {}
        #: The messages waiting behind this process's runs, as last counted.
        self._queued_count = 0
        self._recount = trio.Event()
        #: Owned runs with events for their streams, for the appender's next trip.
        self._waiting: dict[str, _Owned] = {}
        self._appends = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: False while Redis does not answer (then ``/healthz`` answers 503).
        self.healthy = True

    @property
    def queued_count(self) -> int:
        return self._queued_count

    def bind(self, on_notice: OnNotice, on_orphan: OnOrphan) -> None:
        self._on_notice = on_notice
        self._on_orphan = on_orphan

    @property
    def _runs_key(self) -> str:
        return f"{self.keys.prefix}:runs"

    # -- the node's own tasks ----------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen to the bus and sweep for orphaned runs; ``started`` once listening.

        A lost Redis is not fatal: :attr:`healthy` turns False (``/healthz`` answers 503),
        each task retries every :data:`RETRY_S`, and once Redis answers again the bus is
        read on from the last notice heard (nothing before the outage is heard twice).

        Cancellation: ends the node's tasks (each run's writer and lease renewal too); a
        run it played is then ended by another process's sweep once its lease expires.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            cursor = await self.bus.cursor()
            nursery.start_soon(self._listen_forever, cursor)
            nursery.start_soon(self._sweep_forever)
            nursery.start_soon(self._count_queued_forever)
            nursery.start_soon(self._append_forever)
            task_status.started()

    def _lost(self, exc: BaseException) -> None:
        """Redis stopped answering: unhealthy, and every run played here ends with an
        ``error`` naming Redis (none of them can reach its followers elsewhere now)."""
        if self.healthy:
            self.healthy = False
            log.error("cluster.redis_lost", error=str(exc) or type(exc).__name__)
            for owned in list(self._owned.values()):
                owned.run.fail(redis_lost_message(exc))

    def _back(self) -> None:
        if not self.healthy:
            self.healthy = True
            log.info("cluster.redis_back")

    async def _listen_forever(self, cursor: str) -> None:
        box = [cursor]

        def heard(notice: Notice, entry_id: str) -> None:
            box[0] = entry_id
            self._heard(notice)

        while True:
            try:
                await self._client.ping()
                self._back()
                await self.bus.follow_ids(heard, box[0])
            except REDIS_DOWN as exc:
                self._lost(exc)
                await trio.sleep(RETRY_S)

    def _heard(self, notice: Notice) -> None:
        if notice.kind == "stop":
            owned = self._owned.get(notice.run_id)
            if owned is not None:
                owned.run.cancel(notice.reason)
        self._on_notice(notice)

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(self.lease_s / 2)
            try:
                await self.sweep()
            except REDIS_DOWN as exc:
                self._lost(exc)

    async def _count_queued_forever(self) -> None:
        """Count what waits behind this process's runs (for ``/metrics``): once a second
        (another process may queue behind them), and soon after a queue changed here."""
        while True:
            with trio.move_on_after(QUEUED_COUNT_S):
                await self._recount.wait()
            self._recount = trio.Event()
            sessions = {owned.run.session_id for owned in self._owned.values()}
            with contextlib.suppress(*REDIS_DOWN):
                total = 0
                for session_id in sessions:
                    total += await self._client.llen(self.keys.queue(session_id))
                self._queued_count = total

    # -- ownership ---------------------------------------------------------------------
    async def holder(self, session_id: str) -> Holder | None:
        with _redis_errors():
            return await self.leases.holder(session_id)

    async def look(self, session_id: str) -> tuple[Holder | None, list[Queued]]:
        with _redis_errors():
            return await self.queues.look(session_id)

    async def claim(self, session_id: str, run_id: str) -> bool:
        """Make ``run_id`` (to be played here) the session's run, cluster-wide."""
        with _redis_errors():
            return await self.leases.claim(session_id, run_id)

    async def own(self, run: Run) -> None:
        """A run claimed here: record it, mirror its log into its stream, renew its lease,
        and tell every process it started. Call before the run publishes ``stream_start``.

        Raises what a lost Redis raises; the run is recorded and its writer started
        before that can happen, so the run still plays here and its writer ends it with
        an ``error`` naming Redis.
        """
        assert self._nursery is not None, "serve() first"
        stream = RunStream(self._client, self.keys, run.id, self._max_events)
        owned: _Owned
        outbox = StreamOutbox(lambda: self._ready(owned))
        owned = _Owned(run, stream, outbox, run.subscribe(outbox))
        self._owned[run.id] = owned
        self._ready(owned)
        self._nursery.start_soon(self._renew, owned)
        with _redis_errors():  # one round trip: the run is known to the sweep, and announced
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hset(self._runs_key, {run.id: f"{run.session_id} {run.answer_id}"})
                self.bus.publish_in(pipe, Notice("run_started", run.session_id, run.id, owner=self.owner))

    def _ready(self, owned: _Owned) -> None:
        """The run has events for its stream: the appender takes them at its next trip."""
        if not owned.flushed.is_set():
            self._waiting[owned.run.id] = owned
            self._appends.set()

    async def _append_forever(self) -> None:
        """Append what every owned run published, all runs in one pipeline per round
        trip (one fenced script per run); while a trip is out the next batch gathers, so
        the busier the process the more each trip carries. A run's stream is done once
        its terminal event is in (``flushed``), or it was taken over, or Redis was lost
        (the run then ends with an ``error`` naming Redis).

        Cancellation: a trip cancelled half-way may leave a run's top behind what Redis
        holds; this task only ends with the broker, and the runs with it.
        """
        while True:
            await self._appends.wait()
            self._appends = trio.Event()
            waiting, self._waiting = self._waiting, {}
            trips: list[tuple[_Owned, list[Event]]] = []
            for owned in waiting.values():
                batch, owned.outbox.pending = owned.outbox.pending, []
                if batch:
                    trips.append((owned, batch))
            if not trips:
                continue
            try:
                results = await self._append_trip(trips)
            except REDIS_DOWN as exc:
                self._lost(exc)
                for owned, _ in trips:
                    owned.run.fail(redis_lost_message(exc))
                    owned.flushed.set()
                continue
            for (owned, batch), done in zip(trips, results, strict=True):
                self._appended(owned, batch, done)

    async def _append_trip(self, trips: list[tuple[_Owned, list[Event]]]) -> list[int]:
        """One round trip: each run's fenced append, by ``EVALSHA`` in one pipeline (no
        ``SCRIPT EXISTS`` trip first); a Redis that lost its scripts (restarted) gets
        the script loaded and the trip again (nothing was appended: every call said
        ``NOSCRIPT``)."""
        for _ in range(2):
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    answers = [
                        pipe.evalsha(APPEND_SHA, keys=[o.stream.key], args=o.stream.append_args(b)) for o, b in trips
                    ]
                return [int(cast("int", await answer)) for answer in answers]
            except coredis.exceptions.NoScriptError:
                await self._client.script_load(APPEND_SCRIPT)
        raise RedisUnavailable("Redis keeps forgetting the append script")

    def _appended(self, owned: _Owned, batch: list[Event], done: int) -> None:
        try:
            owned.stream.appended(batch, done)
        except RunTakenOver:
            log.warning("cluster.run_taken_over", run_id=owned.run.id)
            owned.run.cancel("shutdown")
            owned.flushed.set()
            return
        terminal = owned.run.log.terminal
        if terminal is not None and owned.stream.top >= terminal.seq:
            owned.flushed.set()

    async def _renew(self, owned: _Owned) -> None:
        """Renew the run's lease until :meth:`finish` takes it back: through its save too,
        so a save that waits for a store outage never lets the lease lapse (another
        process would take the run for a dead owner's)."""
        run = owned.run
        while self._owned.get(run.id) is owned:
            await trio.sleep(self.lease_s / 3)
            if self._owned.get(run.id) is not owned:
                return  # finished meanwhile: the lease was handed on or released
            try:
                renewed = await self.leases.renew(run.session_id, run.id)
            except REDIS_DOWN as exc:
                self._lost(exc)
                continue  # the writer ends the run; the lease may still be saved
            if not renewed:
                log.warning("cluster.lease_lost", run_id=run.id)
                run.cancel("shutdown")
                return

    async def finish(self, run: Run, *, hand_on: bool = True) -> tuple[Queued, str] | None:
        """After the run's answer is saved: once its terminal event is in its stream, mark
        it settled, and hand the session on in one step: to a new run id for the next
        queued message (returned with it: play it here under that id), or to nobody
        (None; also when the session was no longer ours).

        Cancellation: the caller's shielded cleanup runs it; a cancel leaves the lease to
        expire and the sweep to settle the run.
        """
        owned = self._owned.pop(run.id, None)
        if owned is None:
            return None  # never owned here: nothing of it is in Redis
        await owned.flushed.wait()
        run.unsubscribe(owned.sub)
        successor_id = uuid.uuid4().hex
        try:
            await owned.stream.settle()
            await self._client.hdel(self._runs_key, [run.id])
            if not hand_on:  # shutting down: the queue is the caller's to save
                await self.leases.release(run.session_id, run.id)
                return None
            passed = await self.queues.pass_on(run.session_id, run.id, successor_id)
            self._recount.set()
        except REDIS_DOWN as exc:
            self._lost(exc)
            return None  # its lease expires by itself; a sweep settles its stream
        if passed is False:
            log.warning("cluster.lease_lost_at_end", run_id=run.id)
        if isinstance(passed, bool) or passed is None:
            return None
        return passed, successor_id

    # -- runs played elsewhere ---------------------------------------------------------
    async def watch(self, session_id: str, run_id: str, *, task_status: trio.TaskStatus[Watched]) -> None:  # noqa: ASYNC114
        """Follow a run played elsewhere: ``started`` at once with its :class:`RemoteRun`
        (a follower subscribes now and gets every event as it is read; an attach or a
        resume waits for ``remote.first`` so its replay has the run's ``stream_start``),
        then feed its subscribers until it is settled.

        A lost Redis ends the mirror here with an ``error`` naming Redis (its owner ends
        the run itself the same way), so its readers get a terminal event at once.

        Cancellation: only reads; a cancel ends the mirror (its subscribers get no more).
        """
        remote = RemoteRun(run_id, session_id)
        reader = StreamReader(self._client, self.keys, run_id)
        reader.log = remote.mirror
        task_status.started(remote)
        while not remote.mirror.settled:
            try:
                new = await reader.read(block_ms=1000)
            except REDIS_DOWN as exc:
                self._lost(exc)
                self._end_lost_mirror(remote, exc)
                break
            if new:
                remote.first.set()
                remote.publish(new)
        remote.first.set()
        remote.sync_subscribers()
        remote.done.set()

    def _end_lost_mirror(self, remote: RemoteRun, exc: BaseException) -> None:
        """The run's log is gone with Redis: close what it left open and end it with an
        ``error`` naming Redis, on this mirror only (its owner ends its own run)."""
        mirror = remote.mirror
        if mirror.events and not mirror.finished:
            log_ = rebuild(mirror.events, remote.id)
            closing = log_.error(redis_lost_message(exc))
            mirror.extend(closing)
            remote.publish(closing)
        mirror.settled = True

    # -- stop requests and notices -----------------------------------------------------
    async def request_stop(self, session_id: str, run_id: str, reason: str) -> None:
        """A ``stop`` notice: the process playing the run cancels it when it hears it."""
        with _redis_errors():
            await self.bus.publish(Notice("stop", session_id, run_id, reason=reason))

    async def stop_live(self, session_id: str, reason: str) -> tuple[Holder | None, bool]:
        """One atomic script: who holds the session, whether its run is still live, and,
        if it is and another process plays it, the stop notice, sent in the same step."""
        keys = [self.keys.lease(session_id), self.keys.bus]
        args: list[str | int] = [self.owner, reason, self.keys.log(""), BUS_MAXLEN, session_id]
        with _redis_errors():
            got: list[str | int] | None = await self._stop_live(keys=keys, args=args)
        if not got:
            return None, False
        return Holder.parse(str(got[0])), bool(got[1])

    async def close_followers(self, session_id: str, code: int, reason: str) -> None:
        with _redis_errors():
            await self.bus.publish(Notice("close", session_id, owner=self.owner, reason=reason, code=code))

    # -- queues ------------------------------------------------------------------------
    async def queued(self, session_id: str) -> list[Queued]:
        with _redis_errors():
            return await self.queues.view(session_id)

    async def enqueue(self, session_id: str, queued: Queued, at: int, *, holder: Holder | None, length: int) -> bool:
        self._recount.set()
        with _redis_errors():
            return await self.queues.insert(session_id, queued, at, holder=holder, length=length)

    async def forget_queue(self, session_id: str) -> list[Queued]:
        self._recount.set()
        with _redis_errors():
            return await self.queues.forget(session_id)

    # -- dead owners -------------------------------------------------------------------
    async def _orphan_saved(self, run_id: str, session_id: str, answer_id: str, run_log: RunLog) -> bool:
        """Save an orphan's answer through ``on_orphan``, bounded; False if the store
        refused it or did not answer in time (the run stays unsettled: the next sweep
        saves it again, so an answer refused during a store outage is kept once it is back).

        Cancellation: shielded and bounded (a sweep's cleanup of a dead owner's run).
        """
        with trio.move_on_after(ORPHAN_SAVE_S, shield=True) as scope:
            try:
                await self._on_orphan(session_id, answer_id, run_log)
            except StoreError as exc:
                log.error("cluster.orphan_save_failed", run_id=run_id, error=str(exc))
                return False
        if scope.cancelled_caught:
            log.error("cluster.orphan_save_timed_out", run_id=run_id, timeout_s=ORPHAN_SAVE_S)
            return False
        return True

    async def sweep(self) -> list[str]:
        """End every run whose owner's lease is gone (once in the cluster); the ids ended
        here. Each is saved through ``on_orphan`` and then marked settled; one whose save
        fails stays unsettled and is saved at a later sweep."""
        ended: list[str] = []
        runs: dict[str, str] = await self._client.hgetall(self._runs_key)
        for run_id, value in runs.items():
            session_id, _, answer_id = value.partition(" ")
            holder = await self.leases.holder(session_id)
            if holder is not None and holder.run_id == run_id:
                continue
            if run_id in self._owned:
                continue  # ours and still finishing: finish() settles it
            closed = await end_orphan(self._client, self.keys, run_id, max_events=self._max_events)
            if closed is None:
                # Ended already: if its owner died between its terminal event and settling
                # it, save what it wrote (interrupted: the owner never saved it) and settle it.
                unsettled = await ended_unsettled(self._client, self.keys, run_id)
                if unsettled is not None and not await self._orphan_saved(run_id, session_id, answer_id, unsettled):
                    continue  # the store refused: the next sweep tries again
                with contextlib.suppress(coredis.exceptions.ResponseError):  # settled meanwhile
                    await RunStream(self._client, self.keys, run_id, self._max_events).settle()
                await self._client.hdel(self._runs_key, [run_id])
                continue
            log.info("cluster.orphan_ended", run_id=run_id, session_id=session_id)
            ended.append(run_id)
            if await self._orphan_saved(run_id, session_id, answer_id, closed):
                with trio.move_on_after(ORPHAN_SAVE_S, shield=True):
                    await RunStream(self._client, self.keys, run_id, self._max_events).settle()
                    await self._client.hdel(self._runs_key, [run_id])
        return ended


def owner_name() -> str:
    """This process's name in holders and notices: host, pid, and a random part (a pid
    is reused after a restart; a restarted process must not take a dead one's runs)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def open_redis_broker(settings: Settings) -> AsyncIterator[RedisBroker]:
    """The Redis broker of ``settings.redis_url``, with its own connection pool.

    Raises:
        RedisUnavailable: Redis does not answer at startup (a startup failure).
    """
    async with connect(settings.redis_url) as client:
        yield RedisBroker(
            client, Keys(), owner_name(), lease_s=settings.lease_s, max_run_events=settings.max_run_events
        )

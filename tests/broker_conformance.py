"""The conformance suite every :class:`~navi_trio.broker.Broker` must pass.

In the style of trio's ``trio.testing.check_two_way_stream``: one coroutine,
:func:`check_broker`, given a factory of fresh brokers, runs each part of the contract
written in ``navi_trio/broker.py`` against a new broker. ``tests/test_broker.py`` runs it on
the in-process broker and on the Redis broker (a real redis-server); a broker whose
processes can be apart also passes :func:`check_across_processes`, given a factory of
two brokers on the same shared state.

Only the seam is used, plus real runs (``Run``) and outboxes that record what they are
offered (a connection's side). Waits for another process (a notice on its way) are
bounded polls of what the broker makes observable, never a fixed sleep.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio
import trio.testing

from navi_trio.admission import Queued
from navi_trio.broker import Broker, Holder, Notice, Watched
from navi_trio.catchup import CatchUp
from navi_trio.events import Event, RunLog, check_grammar
from navi_trio.fanout import Subscriber
from navi_trio.lifecycle import How, Run, RunRequest

BrokerFactory = Callable[[], AbstractAsyncContextManager[Broker]]
PairFactory = Callable[[], AbstractAsyncContextManager[tuple[Broker, Broker]]]

#: Bound on waiting for what another process (or the bus) delivers.
DELIVERY_S = 5.0


def request(session_id: str, content: str = "hi", user_id: str | None = None) -> RunRequest:
    return RunRequest(session_id, user_id, content, content)


class Recorder:
    """What a broker hands its registry: notices and orphaned answers."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self.orphans: list[tuple[str, str, RunLog]] = []

    def notice(self, notice: Notice) -> None:
        self.notices.append(notice)

    async def orphan(self, session_id: str, answer_id: str, run_log: RunLog) -> None:
        self.orphans.append((session_id, answer_id, run_log))


class RecordingOutbox:
    """An outbox of ``size`` frames with its writer: :meth:`drain` writes what is queued,
    then catches up lagging subscriptions, as a connection's writer does."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self.queued: list[Event | str] = []
        self.lagging: CatchUp[Subscriber] = CatchUp()
        self.written: list[dict[str, Any]] = []

    def offer(self, frame: Event | str) -> bool:
        if len(self.queued) >= self.size:
            return False
        self.queued.append(frame)
        return True

    def wake(self) -> None:
        pass

    def fall_behind(self, sub: Subscriber) -> None:
        self.lagging.append(sub)

    @property
    def behind(self) -> bool:
        return bool(self.lagging)

    def drain(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            while self.queued:
                item = self.queued.pop(0)
                out.append(json.loads(item.wire if isinstance(item, Event) else item))
            caught = self.lagging.next_frame()
            if caught is None:
                break
            out.append(json.loads(caught[0]))
        self.written += out
        return out


def run_events(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(f["type"], f["seq"]) for f in frames if "seq" in f]


async def eventually(what: str, condition: Callable[[], bool]) -> None:
    """Wait (bounded) until ``condition()`` holds: a notice or a read on its way."""
    with trio.fail_after(DELIVERY_S):
        while not condition():  # noqa: ASYNC110 (another process's delivery: no event to wait on)
            await trio.sleep(0.005)
    assert condition(), what


@asynccontextmanager
async def served(make: BrokerFactory) -> AsyncIterator[tuple[Broker, Recorder]]:
    """A fresh broker, bound to a recorder and served, as a registry would use it."""
    rec = Recorder()
    async with make() as broker, trio.open_nursery() as nursery:
        broker.bind(rec.notice, rec.orphan)
        await nursery.start(broker.serve)
        yield broker, rec
        nursery.cancel_scope.cancel()


async def owned_run(broker: Broker, session_id: str, content: str = "hi") -> Run:
    """A run claimed and owned through ``broker``, its ``stream_start`` published."""
    run = Run(request(session_id, content))
    assert await broker.claim(session_id, run.id)
    await broker.own(run)
    run.start()
    return run


def contents(queue: list[Queued]) -> list[tuple[str, bool]]:
    return [(q.request.content, q.interrupted) for q in queue]


# -- the parts of the contract -------------------------------------------------------------


async def check_ownership(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        assert await broker.holder("a") is None
        assert await broker.claim("a", "r1")
        assert not await broker.claim("a", "r2"), "a session holds one run at a time"
        assert await broker.holder("a") == Holder("r1", broker.owner)
        assert await broker.claim("b", "r3"), "sessions are held apart"
        assert await broker.holder("b") == Holder("r3", broker.owner)


async def check_concurrent_claims(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        won: list[str] = []

        async def claim(run_id: str) -> None:
            if await broker.claim("a", run_id):
                won.append(run_id)

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(claim, f"r{i}")
        assert len(won) == 1, "of ten claims racing, exactly one wins"
        assert await broker.holder("a") == Holder(won[0], broker.owner)


async def check_finish_frees_or_hands_on(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        run = await owned_run(broker, "a")
        run.end(How.COMPLETED)
        assert await broker.finish(run) is None, "nothing waited: the session is free"
        assert await broker.holder("a") is None
        again = await owned_run(broker, "a")
        assert await broker.holder("a") == Holder(again.id, broker.owner), "a freed session can be claimed"
        holder = Holder(again.id, broker.owner)
        assert await broker.enqueue("a", Queued(request("a", "next")), 0, holder=holder, length=0)
        again.end(How.COMPLETED)
        passed = await broker.finish(again)
        assert passed is not None, "the next queued message's run takes the session"
        queued, successor_id = passed
        assert queued.request.content == "next"
        assert successor_id not in (run.id, again.id)
        assert await broker.holder("a") == Holder(successor_id, broker.owner), "handed on in the same step"
        assert await broker.queued("a") == []
        # The successor's end with hand_on=False (shutting down): freed, the queue left.
        successor = Run(queued.request, id=successor_id)
        await broker.own(successor)
        successor.start()
        mine = Holder(successor_id, broker.owner)
        assert await broker.enqueue("a", Queued(request("a", "later")), 0, holder=mine, length=0)
        successor.end(How.COMPLETED)
        assert await broker.finish(successor, hand_on=False) is None
        assert await broker.holder("a") is None
        assert contents(await broker.forget_queue("a")) == [("later", False)], "the queue is the caller's"


async def check_a_finish_of_a_run_that_lost_its_session_changes_nothing(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        run = await owned_run(broker, "a")
        run.end(How.COMPLETED)
        assert await broker.finish(run) is None
        other = await owned_run(broker, "a")
        assert await broker.finish(run) is None, "finishing twice is harmless"
        assert await broker.holder("a") == Holder(other.id, broker.owner), "and leaves the new holder"


async def check_queues(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        assert await broker.queued("a") == []
        run = await owned_run(broker, "a")
        h = Holder(run.id, broker.owner)
        q1, q2, q3 = (Queued(request("a", c)) for c in ("1", "2", "3"))
        qi = Queued(request("a", "i"), interrupted=True)
        assert await broker.enqueue("a", q1, 0, holder=h, length=0)
        assert await broker.enqueue("a", q2, 1, holder=h, length=1)
        assert await broker.enqueue("a", qi, 0, holder=h, length=2), "inserted at the front"
        assert await broker.enqueue("a", q3, 3, holder=h, length=3)
        assert contents(await broker.queued("a")) == [("i", True), ("1", False), ("2", False), ("3", False)]
        looked_holder, looked_queue = await broker.look("a")
        assert looked_holder == h, "look: the holder and the queue in one step"
        assert contents(looked_queue) == contents(await broker.queued("a"))
        assert await broker.look("b") == (None, [])
        # What admission saw no longer holds: nothing changes.
        assert not await broker.enqueue("a", Queued(request("a", "x")), 0, holder=h, length=2), "a stale length"
        stranger = Holder("someone-else", broker.owner)
        assert not await broker.enqueue("a", Queued(request("a", "x")), 0, holder=stranger, length=4), "a stale holder"
        assert not await broker.enqueue("a", Queued(request("a", "x")), 0, holder=None, length=4), "not free"
        assert len(await broker.queued("a")) == 4
        assert await broker.queued("b") == [], "queues are per session"
        forgotten = await broker.forget_queue("a")
        assert contents(forgotten) == [("i", True), ("1", False), ("2", False), ("3", False)], "oldest first"
        assert await broker.queued("a") == []
        assert await broker.forget_queue("a") == []


async def check_a_queued_message_keeps_what_its_run_needs(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        run = await owned_run(broker, "a")
        sent = RunRequest("a", "u1", "shown", "original", ["data:image/png;base64,AAAA"], conn_id="c1")
        h = Holder(run.id, broker.owner)
        assert await broker.enqueue("a", Queued(sent, interrupted=True), 0, holder=h, length=0)
        (got,) = await broker.queued("a")
        assert got.interrupted
        for field in ("session_id", "user_id", "content", "original_content", "images", "conn_id"):
            assert getattr(got.request, field) == getattr(sent, field), field


async def check_stop_requests(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        run = await owned_run(broker, "a")
        await broker.request_stop("a", "not-a-run", "user")  # nothing plays it: nothing happens
        await broker.request_stop("a", run.id, "deleted")
        await eventually("the stop reached the run", lambda: run.cancel_scope.cancel_called)
        assert run.stop_reason == "deleted"
        await broker.request_stop("a", run.id, "shutdown")
        run.end(How.CANCELLED)
        assert run.stop_reason == "deleted", "the first reason given is the one it ends with"
        assert await broker.finish(run) is None
        await broker.request_stop("a", run.id, "user")  # over: harmless


async def check_stop_live_looks_at_the_run_played_here(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        assert await broker.stop_live("a", "user") == (None, False), "nobody holds it"
        run = await owned_run(broker, "a")
        run.emit_text("x")
        assert await broker.stop_live("a", "user") == (Holder(run.id, broker.owner), True)
        assert not run.cancel_scope.cancel_called, "a run played here is the caller's to cancel"
        run.end(How.COMPLETED)
        with trio.fail_after(DELIVERY_S):
            while (await broker.stop_live("a", "user"))[1]:  # noqa: ASYNC110 (the terminal event on its way)
                await trio.sleep(0.005)
        assert await broker.stop_live("a", "user") == (Holder(run.id, broker.owner), False), "over: not live"
        assert not run.cancel_scope.cancel_called
        assert await broker.finish(run) is None
        assert await broker.stop_live("a", "user") == (None, False)


async def check_run_started_notices(make: BrokerFactory) -> None:
    async with served(make) as (broker, rec):
        run = await owned_run(broker, "a")

        def heard() -> bool:
            return any(n.kind == "run_started" and n.run_id == run.id for n in rec.notices)

        await eventually("every process hears of the run", heard)
        (notice,) = [n for n in rec.notices if n.run_id == run.id]
        assert (notice.session_id, notice.owner) == ("a", broker.owner), "named with its session and owner"


async def check_queued_count(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        assert broker.queued_count == 0
        run = await owned_run(broker, "a")
        h = Holder(run.id, broker.owner)
        for i in range(3):
            assert await broker.enqueue("a", Queued(request("a", str(i))), i, holder=h, length=i)
        await eventually("what waits behind this process's runs is counted", lambda: broker.queued_count == 3)
        await broker.forget_queue("a")
        await eventually("and uncounted once gone", lambda: broker.queued_count == 0)


async def check_healthy(make: BrokerFactory) -> None:
    async with served(make) as (broker, _):
        assert broker.healthy


CHECKS: tuple[Callable[[BrokerFactory], Awaitable[None]], ...] = (
    check_ownership,
    check_concurrent_claims,
    check_finish_frees_or_hands_on,
    check_a_finish_of_a_run_that_lost_its_session_changes_nothing,
    check_queues,
    check_a_queued_message_keeps_what_its_run_needs,
    check_stop_requests,
    check_stop_live_looks_at_the_run_played_here,
    check_run_started_notices,
    check_queued_count,
    check_healthy,
)


async def check_broker(make: BrokerFactory) -> None:
    """Run every part of the broker contract, each against a fresh broker from ``make``."""
    for check in CHECKS:
        await check(make)


# -- brokers whose processes can be apart ---------------------------------------------------


@asynccontextmanager
async def served_pair(make: PairFactory) -> AsyncIterator[tuple[tuple[Broker, Recorder], tuple[Broker, Recorder]]]:
    ra, rb = Recorder(), Recorder()
    async with make() as (a, b), trio.open_nursery() as nursery:
        a.bind(ra.notice, ra.orphan)
        b.bind(rb.notice, rb.orphan)
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        yield (a, ra), (b, rb)
        nursery.cancel_scope.cancel()


async def check_one_run_per_session_across_processes(make: PairFactory) -> None:
    async with served_pair(make) as ((a, _), (b, _)):
        run = await owned_run(a, "s")
        assert not await b.claim("s", "b-run"), "the other process sees the session held"
        assert await b.holder("s") == Holder(run.id, a.owner)
        assert a.owner != b.owner
        # b queues behind a's run; a's end hands the session to that message's run, on a.
        assert await b.enqueue("s", Queued(request("s", "from b")), 0, holder=Holder(run.id, a.owner), length=0)
        run.end(How.COMPLETED)
        passed = await a.finish(run)
        assert passed is not None
        assert passed[0].request.content == "from b"
        assert await b.holder("s") == Holder(passed[1], a.owner)


async def check_watch_from_another_process(make: PairFactory) -> None:
    async with served_pair(make) as ((a, _), (b, rb)):
        run = await owned_run(a, "s")
        await eventually("b hears of a's run", lambda: any(n.run_id == run.id for n in rb.notices))
        run.emit_text("a")
        run.emit_text("b")
        async with trio.open_nursery() as nursery:
            view: Watched = await nursery.start(b.watch, "s", run.id)
            live = RecordingOutbox()
            view.subscribe(live)  # type: ignore[attr-defined]  # a view is a fan-out
            with trio.fail_after(DELIVERY_S):
                await view.first.wait()
            run.emit_tool_started("clock", {})
            run.emit_tool_call("noon", success=True)
            run.end(How.COMPLETED)
            await eventually("the view reads the run to its end", lambda: view.over)
            assert not view.done.is_set(), "over, not settled: its answer is not saved yet"
            attach = RecordingOutbox()
            view.subscribe(attach, replay=True)  # type: ignore[attr-defined]
            assert await a.finish(run) is None
            with trio.fail_after(DELIVERY_S):
                await view.done.wait()
        got = live.drain()
        expected = [(e.type, e.seq) for e in run.log.events]
        assert run_events(got) == expected, "every event once, in seq order"
        check_grammar(run_events(got))
        replayed = attach.drain()
        assert replayed[0]["type"] == "stream_start"
        assert replayed[1]["type"] == "replay_start"
        assert run_events(replayed)[-1] == expected[-1], "an attach replays the run to its terminal event"
        # A stop asked of b reaches the run a plays (b names it by id).
        other = await owned_run(a, "t")
        await b.request_stop("t", other.id, "user")
        await eventually("a stop from b reaches a's run", lambda: other.cancel_scope.cancel_called)


async def check_stop_live_from_another_process(make: PairFactory) -> None:
    async with served_pair(make) as ((a, _), (b, rb)):
        run = await owned_run(a, "s")
        await eventually("a's run is in its stream", lambda: any(n.run_id == run.id for n in rb.notices))
        assert await b.stop_live("s", "deleted") == (Holder(run.id, a.owner), True)
        await eventually("the stop reached a's run in the same step", lambda: run.cancel_scope.cancel_called)
        assert run.stop_reason == "deleted"
        run.end(How.CANCELLED)
        assert await a.finish(run) is None
        later = await owned_run(a, "t")
        later.end(How.COMPLETED)
        async with trio.open_nursery() as nursery:
            view: Watched = await nursery.start(b.watch, "t", later.id)
            await eventually("b reads a's run to its terminal event", lambda: view.over)
            assert await b.stop_live("t", "user") == (Holder(later.id, a.owner), False), "over: not live"
            assert await a.finish(later) is None
            with trio.fail_after(DELIVERY_S):
                await view.done.wait()
        assert await b.stop_live("t", "user") == (None, False)
        assert later.stop_reason is None, "a run already over is not asked to stop"
        stops = [n for n in rb.notices if n.kind == "stop"]
        assert [n.run_id for n in stops] == [run.id], "one stop notice, for the live run only"


async def check_close_notices_reach_other_processes(make: PairFactory) -> None:
    async with served_pair(make) as ((a, _), (_, rb)):
        await a.close_followers("s", 4004, "Session deleted")
        await eventually("b hears the close", lambda: any(n.kind == "close" for n in rb.notices))
        (notice,) = [n for n in rb.notices if n.kind == "close"]
        assert (notice.session_id, notice.code, notice.reason, notice.owner) == ("s", 4004, "Session deleted", a.owner)


CROSS_PROCESS_CHECKS: tuple[Callable[[PairFactory], Awaitable[None]], ...] = (
    check_one_run_per_session_across_processes,
    check_watch_from_another_process,
    check_stop_live_from_another_process,
    check_close_notices_reach_other_processes,
)


async def check_across_processes(make: PairFactory) -> None:
    """The parts of the contract that only brokers spanning processes can show."""
    for check in CROSS_PROCESS_CHECKS:
        await check(make)

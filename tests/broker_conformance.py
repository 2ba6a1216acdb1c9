"""The conformance suite every :class:`~navi_trio.broker.Broker` must pass.

In the style of trio's ``trio.testing.check_two_way_stream``: one coroutine,
:func:`check_broker`, given a factory of fresh brokers, runs each part of the contract
written in ``navi_trio/broker.py`` against a new broker. The in-process broker runs it in
``tests/test_broker.py``; a broker that spans processes runs the very same function.

Only the broker's own interface is used, plus real runs (``Run``) and outboxes that
record what they are offered (the connection's side of the seam).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio
import trio.testing

from navi_trio.admission import Queued
from navi_trio.broker import Broker
from navi_trio.catchup import CatchUp
from navi_trio.events import Event, check_grammar
from navi_trio.fanout import Subscriber
from navi_trio.lifecycle import How, Run, RunRequest

BrokerFactory = Callable[[], AbstractAsyncContextManager[Broker]]


def request(session_id: str, content: str = "hi", user_id: str | None = None) -> RunRequest:
    return RunRequest(session_id, user_id, content, content)


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


class RecordingFollower:
    def __init__(self, user_id: str | None = None) -> None:
        self.user_id = user_id
        self.started: list[Run] = []
        self.closes: list[tuple[int, str]] = []

    def run_started(self, run: Run) -> None:
        self.started.append(run)

    def request_close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


def run_events(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(f["type"], f["seq"]) for f in frames if "seq" in f]


# -- the parts of the contract -------------------------------------------------------------


async def check_ownership(make: BrokerFactory) -> None:
    async with make() as broker:
        a1, a2, b = Run(request("a")), Run(request("a")), Run(request("b"))
        assert broker.active("a") is None
        assert broker.runs == []
        assert broker.claim(a1)
        assert not broker.claim(a2), "a session holds one run at a time"
        assert broker.active("a") is a1
        assert broker.claim(b)
        assert {r.id for r in broker.runs} == {a1.id, b.id}
        broker.release(a2)  # not the holder: nothing happens
        assert broker.active("a") is a1
        broker.release(a1, a2)  # handed over in one step
        assert broker.active("a") is a2
        broker.release(a2)
        assert broker.active("a") is None
        assert broker.claim(a1), "a released session can be claimed again"
        broker.release(a1)
        broker.release(b)
        assert broker.runs == []


async def check_wait_idle(make: BrokerFactory) -> None:
    async with make() as broker:
        with trio.fail_after(1):
            await broker.wait_idle()  # idle from the start
        a, b = Run(request("a")), Run(request("b"))
        broker.claim(a)
        broker.claim(b)
        returned = trio.Event()

        async def waiter() -> None:
            await broker.wait_idle()
            returned.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not returned.is_set()
            broker.release(a)
            await trio.testing.wait_all_tasks_blocked()
            assert not returned.is_set(), "b still holds its session"
            a2 = Run(request("b"))
            broker.release(b, a2)  # a hand-over is not idle
            await trio.testing.wait_all_tasks_blocked()
            assert not returned.is_set()
            broker.release(a2)
            with trio.fail_after(1):
                await returned.wait()


async def check_followers_and_notices(make: BrokerFactory) -> None:
    async with make() as broker:
        f1, f2, other = RecordingFollower("u1"), RecordingFollower("u1"), RecordingFollower("u2")
        assert broker.follow("a", f1) is None
        broker.follow("a", f1)  # once, however often asked
        broker.follow("a", f2)
        broker.follow("b", other)
        assert broker.follower_count == 3
        assert broker.connections_of("u1") == 2
        assert broker.connections_of("u2") == 1
        assert broker.connections_of("nobody") == 0
        assert set(map(id, broker.followers("a"))) == {id(f1), id(f2)}
        run = Run(request("a"))
        broker.claim(run)
        broker.announce(run)
        assert f1.started == [run]
        assert f2.started == [run]
        assert other.started == []
        late = RecordingFollower()
        assert broker.follow("a", late) is run, "a late follower learns of the active run"
        broker.unfollow("a", f2)
        broker.unfollow("a", f2)  # twice is harmless
        run2 = Run(request("a"))
        broker.release(run, run2)
        broker.announce(run2)
        assert f1.started == [run, run2]
        assert f2.started == [run]
        assert late.started == [run2]
        assert broker.follower_count == 3
        for sid, f in (("a", f1), ("a", late), ("b", other)):
            broker.unfollow(sid, f)
        assert broker.follower_count == 0
        assert broker.followers("a") == []


async def check_fan_out(make: BrokerFactory) -> None:
    async with make() as broker:
        run = Run(request("a"))
        broker.claim(run)
        live = RecordingOutbox()
        broker.subscribe(run, live)
        run.start()
        run.emit_text("a")
        run.emit_text("b")
        # Attach mid-run: the run so far, then live events, with no gap and no duplicate.
        attach = RecordingOutbox()
        broker.subscribe(run, attach, replay=True)
        resume = RecordingOutbox()
        broker.subscribe(run, resume, after=2, replay=True)
        run.emit_tool_started("clock", {})
        run.emit_tool_call("noon", success=True)
        got_live = live.drain()
        assert run_events(got_live) == [(e.type, e.seq) for e in run.log.events]
        got_attach = attach.drain()
        assert got_attach[0]["type"] == "stream_start"
        assert got_attach[1] == {"type": "replay_start", "count": 1}  # "a" and "b" merged
        assert got_attach[2] == {"type": "stream_delta", "seq": 3, "delta": "ab"}
        assert got_attach[3] == {"type": "replay_end"}
        assert run_events(got_attach[4:]) == [("tool_started", 4), ("tool_call", 5)]
        got_resume = resume.drain()
        assert got_resume[0]["type"] == "stream_start", "a resume begins as every attach does"
        assert got_resume[1] == {"type": "replay_start", "count": 1}
        assert got_resume[2] == {"type": "stream_delta", "seq": 3, "delta": "b"}
        assert got_resume[3] == {"type": "replay_end"}
        assert run_events(got_resume[4:]) == [("tool_started", 4), ("tool_call", 5)]
        # A reader whose outbox is full is caught up from the log, merged, then re-armed.
        slow = RecordingOutbox(size=2)
        sub = broker.subscribe(run, slow)
        for d in "cdefg":
            run.emit_text(d)
        assert sub.lagging
        caught = slow.drain()
        assert not sub.lagging
        assert [f.get("delta") for f in caught] == ["c", "d", "efg"]
        assert [f["seq"] for f in caught] == [6, 7, 10]
        run.emit_text("h")
        assert slow.drain() == [{"type": "stream_delta", "seq": 11, "delta": "h"}]
        # Unsubscribed: nothing more.
        broker.unsubscribe(sub)
        run.emit_text("i")
        assert slow.drain() == []
        run.end(How.COMPLETED)
        assert run_events(got_live + live.drain()) == [(e.type, e.seq) for e in run.log.events]
        check_grammar(run_events(live.written))


async def check_stop_requests(make: BrokerFactory) -> None:
    async with make() as broker:
        assert broker.request_stop("a", "user") is None
        run = Run(request("a"))
        broker.claim(run)
        assert broker.request_stop("a", "deleted") is run
        assert run.cancel_scope.cancel_called
        assert broker.request_stop("a", "shutdown") is run
        assert run.stop_reason == "deleted", "the first reason given is the one it ends with"
        broker.release(run)
        assert broker.request_stop("a", "user") is None


async def check_queues(make: BrokerFactory) -> None:
    async with make() as broker:
        assert list(broker.queued("a")) == []
        assert broker.pop_queued("a") is None
        q1, q2, q3 = (Queued(request("a", c)) for c in ("1", "2", "3"))
        qi = Queued(request("a", "i"), interrupted=True)
        broker.enqueue("a", q1, 0)
        broker.enqueue("a", q2, 1)
        broker.enqueue("a", qi, 0)
        broker.enqueue("a", q3, 3)
        broker.enqueue("b", Queued(request("b", "b1")), 0)
        assert [q.request.content for q in broker.queued("a")] == ["i", "1", "2", "3"]
        assert broker.pop_queued("a") == qi
        assert [q.request.content for q in broker.queued("a")] == ["1", "2", "3"]
        broker.forget_queue("b")
        assert list(broker.queued("b")) == []
        broker.enqueue("c", Queued(request("c", "c1")), 0)
        assert sorted(r.content for r in broker.take_all_queued()) == ["1", "2", "3", "c1"]
        assert list(broker.queued("a")) == []
        assert broker.pop_queued("c") is None


async def check_revocations_and_closes(make: BrokerFactory) -> None:
    async with make() as broker:
        anon = RecordingFollower(None)
        broker.follow("a", anon)
        assert not broker.has_user_connections()
        u1a, u1b, u2 = RecordingFollower("u1"), RecordingFollower("u1"), RecordingFollower("u2")
        broker.follow("a", u1a)
        broker.follow("b", u1b)
        broker.follow("b", u2)
        assert broker.has_user_connections()
        broker.revoke({"u1"})
        assert u1a.closes == [(4003, "Token revoked")]
        assert u1b.closes == [(4003, "Token revoked")]
        assert u2.closes == []
        assert anon.closes == []
        broker.close_followers("b", 4004, "Session deleted")
        assert u2.closes == [(4004, "Session deleted")]
        assert anon.closes == []
        broker.close_all_followers(1012, "Server restarting")
        assert anon.closes == [(1012, "Server restarting")]
        assert u2.closes[-1] == (1012, "Server restarting")


CHECKS = (
    check_ownership,
    check_wait_idle,
    check_followers_and_notices,
    check_fan_out,
    check_stop_requests,
    check_queues,
    check_revocations_and_closes,
)


async def check_broker(make: BrokerFactory) -> None:
    """Run every part of the broker contract, each against a fresh broker from ``make``."""
    for check in CHECKS:
        await check(make)

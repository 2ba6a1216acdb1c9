"""This process's table of runs and followers (``navi_trio/local.py``): what a connection
subscribes to, follows and is closed through, with real runs and outboxes that record
what they are offered (the connection's side)."""

from __future__ import annotations

import trio
import trio.testing

from navi_trio.events import check_grammar
from navi_trio.lifecycle import How, Run
from navi_trio.local import LocalRuns

from .broker_conformance import RecordingOutbox, request, run_events


class RecordingFollower:
    def __init__(self, user_id: str | None = None) -> None:
        self.user_id = user_id
        self.started: list[Run] = []
        self.closes: list[tuple[int, str]] = []

    def run_started(self, run: Run) -> None:
        self.started.append(run)

    def request_close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


# -- the table ------------------------------------------------------------------------------


async def test_ownership() -> None:
    local = LocalRuns()
    a1, a2, b = Run(request("a")), Run(request("a")), Run(request("b"))
    assert local.active("a") is None
    assert local.runs == []
    assert local.claim(a1)
    assert not local.claim(a2), "a session holds one run at a time"
    assert local.active("a") is a1
    assert local.claim(b)
    assert {r.id for r in local.runs} == {a1.id, b.id}
    local.release(a2)  # not the holder: nothing happens
    assert local.active("a") is a1
    local.release(a1, a2)  # handed over in one step
    assert local.active("a") is a2
    local.release(a2)
    assert local.active("a") is None
    assert local.claim(a1), "a released session can be claimed again"
    local.release(a1)
    local.release(b)
    assert local.runs == []


async def test_wait_idle() -> None:
    local = LocalRuns()
    with trio.fail_after(1):
        await local.wait_idle()  # idle from the start
    a, b = Run(request("a")), Run(request("b"))
    local.claim(a)
    local.claim(b)
    returned = trio.Event()

    async def waiter() -> None:
        await local.wait_idle()
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not returned.is_set()
        local.release(a)
        await trio.testing.wait_all_tasks_blocked()
        assert not returned.is_set(), "b still holds its session"
        a2 = Run(request("b"))
        local.release(b, a2)  # a hand-over is not idle
        await trio.testing.wait_all_tasks_blocked()
        assert not returned.is_set()
        local.release(a2)
        with trio.fail_after(1):
            await returned.wait()


async def test_followers_and_notices() -> None:
    local = LocalRuns()
    f1, f2, other = RecordingFollower("u1"), RecordingFollower("u1"), RecordingFollower("u2")
    assert local.follow("a", f1) is None
    local.follow("a", f1)  # once, however often asked
    local.follow("a", f2)
    local.follow("b", other)
    assert local.follower_count == 3
    assert local.connections_of("u1") == 2
    assert local.connections_of("u2") == 1
    assert local.connections_of("nobody") == 0
    assert set(map(id, local.followers("a"))) == {id(f1), id(f2)}
    run = Run(request("a"))
    local.claim(run)
    local.announce(run)
    assert f1.started == [run]
    assert f2.started == [run]
    assert other.started == []
    late = RecordingFollower()
    assert local.follow("a", late) is run, "a late follower learns of the active run"
    local.unfollow("a", f2)
    local.unfollow("a", f2)  # twice is harmless
    run2 = Run(request("a"))
    local.release(run, run2)
    local.announce(run2)
    assert f1.started == [run, run2]
    assert f2.started == [run]
    assert late.started == [run2]
    assert local.follower_count == 3
    for sid, f in (("a", f1), ("a", late), ("b", other)):
        local.unfollow(sid, f)
    assert local.follower_count == 0
    assert local.followers("a") == []


async def test_fan_out() -> None:
    local = LocalRuns()
    run = Run(request("a"))
    local.claim(run)
    live = RecordingOutbox()
    local.subscribe(run, live)
    run.start()
    run.emit_text("a")
    run.emit_text("b")
    # Attach mid-run: the run so far, then live events, with no gap and no duplicate.
    attach = RecordingOutbox()
    local.subscribe(run, attach, replay=True)
    resume = RecordingOutbox()
    local.subscribe(run, resume, after=2, replay=True)
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
    sub = local.subscribe(run, slow)
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
    local.unsubscribe(sub)
    run.emit_text("i")
    assert slow.drain() == []
    run.end(How.COMPLETED)
    assert run_events(got_live + live.drain()) == [(e.type, e.seq) for e in run.log.events]
    check_grammar(run_events(live.written))


async def test_revocations_and_closes() -> None:
    local = LocalRuns()
    anon = RecordingFollower(None)
    local.follow("a", anon)
    assert not local.has_user_connections()
    u1a, u1b, u2 = RecordingFollower("u1"), RecordingFollower("u1"), RecordingFollower("u2")
    local.follow("a", u1a)
    local.follow("b", u1b)
    local.follow("b", u2)
    assert local.has_user_connections()
    local.revoke({"u1"})
    assert u1a.closes == [(4003, "Token revoked")]
    assert u1b.closes == [(4003, "Token revoked")]
    assert u2.closes == []
    assert anon.closes == []
    local.close_followers("b", 4004, "Session deleted")
    assert u2.closes == [(4004, "Session deleted")]
    assert anon.closes == []
    local.close_all_followers(1012, "Server restarting")
    assert anon.closes == [(1012, "Server restarting")]
    assert u2.closes[-1] == (1012, "Server restarting")


async def test_a_stop_reaches_the_sessions_run_and_keeps_the_first_reason() -> None:
    local = LocalRuns()
    assert local.stop("a", "user") is None
    run = Run(request("a"))
    local.claim(run)
    assert local.stop("a", "deleted") is run
    assert run.cancel_scope.cancel_called
    assert local.stop("a", "shutdown") is run
    assert run.stop_reason == "deleted", "the first reason given is the one it ends with"
    local.release(run)
    assert local.stop("a", "user") is None

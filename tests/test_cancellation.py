"""Cancellation, disconnect, replay, resume, fan-out and shutdown, in virtual time.

Every test runs a real hypercorn server (``open_server``: memory store, 127.0.0.1:0) in
the test's own trio run under ``autojump_clock`` (STYLE 4.3, 4.5): virtual time is exact,
so schedules are asserted with ``==``. Times used are integers or binary fractions, so
the float arithmetic of the agent's schedule and of the assertions agree to the bit.

Each test checks the grammar of what every client saw, that no connection task outlives
its client, and that no run task outlives its run (STYLE 4.4). Settling uses
``wait_all_tasks_blocked`` and events (``run.done``), never a fixed sleep; the sleeps in
here are part of the scenarios (time that passes in the story).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import wrap_client_stream

from navi_trio.connection import Connection
from navi_trio.events import MERGE_MAX_CHARS, TERMINAL_TYPES
from navi_trio.fanout import Subscriber
from navi_trio.lifecycle import Run
from navi_trio.store.memory import MemoryStore

from .helpers import Client, Server, all_tasks, assert_grammar, open_server, run_events, script, task_names, text_of

# -- helpers -------------------------------------------------------------------------------


def log_of(run: Run) -> list[dict[str, Any]]:
    """The run's own log as the wire dicts a client would get."""
    return [json.loads(e.wire) for e in run.log.events]


def thinking_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "thinking_delta")


def split_runs(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A connection's run events, one list per run (each starts at its stream_start)."""
    runs: list[list[dict[str, Any]]] = []
    for e in run_events(events):
        if e["type"] == "stream_start":
            runs.append([])
        assert runs, f"{e} before any stream_start"
        runs[-1].append(e)
    return runs


async def recv_timed(c: Client) -> tuple[float, dict[str, Any]]:
    """Receive one event and the virtual time it arrived at."""
    event = await c.recv()
    return trio.current_time(), event


async def settled_tasks() -> set[trio.lowlevel.Task]:
    await trio.testing.wait_all_tasks_blocked()
    return set(all_tasks())


async def assert_no_connection_tasks(baseline: set[trio.lowlevel.Task] | None = None) -> None:
    """Once every client is gone: no ``ws-`` task, and (given a baseline taken before any
    client connected) no task beyond the baseline but run tasks (hypercorn's own included)."""
    now = await settled_tasks()
    assert task_names("ws-") == []
    if baseline is not None:
        extra = sorted(t.name for t in now - baseline if not t.name.startswith("run:"))
        assert not extra, f"tasks left behind: {extra}"


async def assert_no_run_tasks(*runs: Run) -> None:
    for run in runs:
        await run.done.wait()
        assert run.settled
        assert run.subscribers == []
    await trio.testing.wait_all_tasks_blocked()
    assert task_names("run:") == []


async def session_with_baseline(server: Server) -> tuple[str, set[trio.lowlevel.Task]]:
    sid = await server.new_session()
    return sid, await settled_tasks()


def connection_of(server: Server, sid: str, *, exclude: set[Connection] | None = None) -> Connection:
    """The one server-side Connection following ``sid`` that is not in ``exclude``."""
    followers = server.registry.local.followers(sid)
    conns = [f for f in followers if isinstance(f, Connection) and f not in (exclude or set())]
    assert len(conns) == 1, conns
    return conns[0]


def subscription(conn: Connection, run: Run) -> Subscriber:
    subs = [s for s in conn.subscriptions if s.run is run]
    assert len(subs) == 1
    return subs[0]


@asynccontextmanager
async def connect_abrupt(server: Server, sid: str) -> AsyncIterator[Client]:
    """A client whose TCP connection just goes away on exit: no WebSocket close frame."""
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, server.host, f"/ws/sessions/{sid}")
        try:
            yield Client(ws)
        finally:
            await stream.aclose()


#: ``stream_end`` carries the whole answer: tens of MB in the slow-subscriber tests, over
#: trio-websocket's 1 MiB default.
BIG_MESSAGE = 64 * 1024 * 1024
#: trio-websocket reads 4 KiB at a time by default. Draining a socket in such small reads
#: can leave the kernel without a TCP window update to send, so the server's ``send_all``
#: waits for a timer (zero-window probe): real time, during which every task is blocked
#: and ``autojump_clock`` leaps ahead (seen: a 26 MB frame "took" 800 virtual seconds).
#: Reading 1 MiB at a time drains the buffer in one go and the window update goes out.
BIG_READ = 1024 * 1024


@asynccontextmanager
async def connect_big(server: Server, sid: str) -> AsyncIterator[Client]:
    """``Server.connect`` for a client that accepts messages up to ``BIG_MESSAGE``."""
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            server.host,
            f"/ws/sessions/{sid}",
            max_message_size=BIG_MESSAGE,
            receive_buffer_size=BIG_READ,
        )
        try:
            yield Client(ws)
        finally:
            with trio.move_on_after(2, shield=True):
                await ws.aclose()


async def assert_only_heartbeat_next(c: Client, heartbeat_s: float, last_time: float) -> None:
    """Nothing of any run follows: the next frame is the heartbeat, ``heartbeat_s`` after
    the last frame (which arrived at ``last_time``)."""
    t, event = await recv_timed(c)
    assert event == {"type": "heartbeat"}
    assert t == last_time + heartbeat_s


# -- 1. disconnect mid-run -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["close_frame", "tcp_drop"])
async def test_disconnect_mid_run_is_not_a_stop(autojump_clock: trio.testing.MockClock, how: str) -> None:
    with trio.fail_after(300):
        async with open_server() as server:
            sid, baseline = await session_with_baseline(server)
            connect = server.connect if how == "close_frame" else lambda s: connect_abrupt(server, s)
            async with connect(sid) as c:
                assert (await c.recv())["type"] == "session_sync"
                await c.send_message(script({"text": "w ", "repeat": 50, "delay": 1}))
                start = await c.recv()
                assert start["type"] == "stream_start"
                for _ in range(3):
                    assert (await c.recv())["type"] == "stream_delta"
                run = server.registry.active(sid)
                assert run is not None
                assert run.id == start["run_id"]
                t_left = trio.current_time()

            await assert_no_connection_tasks(baseline)
            assert trio.current_time() == t_left
            # The run goes on, in the server nursery, with nobody subscribed.
            assert server.registry.active(sid) is run
            assert not run.done.is_set()
            assert run.subscribers == []
            assert server.registry.local.followers(sid) == []
            (run_task,) = [t for t in all_tasks() if t.name == f"run:{run.id}"]
            assert run_task.parent_nursery is server.registry._nursery

            await run.done.wait()
            assert trio.current_time() == t_left - 2 + 49  # deltas at start + 0..49 s, read the 3rd at +2
            full = log_of(run)
            assert_grammar(full, merged=False)
            assert full[-1] == {"type": "stream_end", "seq": 52, "content": "w " * 50}
            assert sum(e["type"] == "stream_delta" for e in full) == 50
            assert run.stop_reason is None
            # What the client saw is a prefix of the log.
            seen = run_events(c.received)
            assert seen == full[: len(seen)]
            assert len(seen) >= 4
            await assert_no_run_tasks(run)
            store = server.registry.store
            assert isinstance(store, MemoryStore)
            answer = store.messages[sid][-1]
            assert (answer.status, answer.content) == ("complete", "w " * 50)


# -- 2. replay equals what the first client saw --------------------------------------------

RICH_SCRIPT = script(
    {"think": "let me look this up"},
    {"text": "a", "repeat": 5, "delay": 1},
    {"tool": "search", "args": {"q": "trio"}, "result": "found", "delay": 2},
    {"compress": True},
    {"text": "b", "repeat": 5, "delay": 1},
)


async def test_replay_equals_what_the_first_client_saw(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(300):
        async with open_server() as server:
            sid, baseline = await session_with_baseline(server)
            async with server.connect(sid) as a:
                assert (await a.recv())["type"] == "session_sync"
                await a.send_message(RICH_SCRIPT)
                # A follows from the start; attach B once A has seen three "a" deltas.
                while text_of(a.received) != "aaa":
                    await a.recv()
                run = server.registry.active(sid)
                assert run is not None
                async with server.connect(sid) as b:
                    b_got = await b.until_terminal()
                    assert (await b.recv()) == {"type": "session_sync"}  # after the terminal
                a_got = run_events(await a.until_terminal())
            a_run = run_events(a.received)
            await assert_no_connection_tasks(baseline)
            await assert_no_run_tasks(run)

        assert_grammar(a_run, merged=False)
        assert a_run == log_of(run)  # a reader that keeps up gets the log, event by event
        assert a_got[-1]["type"] == "stream_end"

        # B: stream_start, replay_start {count}, the replay, replay_end, then live.
        types = [e["type"] for e in b_got]
        assert types[:2] == ["stream_start", "replay_start"]
        i_end = types.index("replay_end")
        assert b_got[1]["count"] == i_end - 2
        assert all("seq" in e for e in b_got[2:i_end])
        assert [e for e in b_got if "seq" not in e] == [b_got[1], b_got[i_end]]
        assert b_got[0] == a_run[0]
        assert_grammar(b_got)  # seqs strictly increase, one terminal, nothing after it
        assert text_of(b_got) == text_of(a_run) == "aaaaabbbbb"
        assert thinking_of(b_got) == thinking_of(a_run)
        assert b_got[-1] == a_run[-1]
        # Everything but merged deltas is the same event with the same seq.
        others = [e for e in a_run if e["type"] not in ("stream_delta", "thinking_delta")]
        assert [e for e in run_events(b_got) if e["type"] not in ("stream_delta", "thinking_delta")] == others


# -- 3. resume without gap or duplicate ----------------------------------------------------


async def test_resume_after_seq_has_no_gap_or_duplicate(autojump_clock: trio.testing.MockClock) -> None:
    steps: list[dict[str, Any]] = []
    for i in range(20):
        steps += [{"text": f"w{i} "}, {"sleep": 1}]
    expected = "".join(f"w{i} " for i in range(20))
    with trio.fail_after(300):
        async with open_server() as server:
            sid, baseline = await session_with_baseline(server)
            async with server.connect(sid) as a:
                assert (await a.recv())["type"] == "session_sync"
                await a.send_message(script(*steps))
                a_part = [await a.recv() for _ in range(7)]  # stream_start + 6 deltas
            rid = a_part[0]["run_id"]
            n = a_part[-1]["seq"]
            assert [e["seq"] for e in a_part] == list(range(1, 8))
            assert n == 7
            await assert_no_connection_tasks(baseline)
            run = server.registry.active(sid)
            assert run is not None
            assert run.id == rid

            await trio.sleep(3.5)  # offline for a while: the run goes on without us
            async with server.connect(sid, query=f"run_id={rid}&after={n}") as b:
                b_got = await b.until_terminal()
                assert (await b.recv()) == {"type": "session_sync"}
            await assert_no_connection_tasks(baseline)
            await assert_no_run_tasks(run)

        types = [e["type"] for e in b_got]
        # A resume begins as every attach does: stream_start (seq 1), then the replay.
        assert types[:2] == ["stream_start", "replay_start"]
        assert b_got[0] == {"type": "stream_start", "seq": 1, "run_id": rid}
        assert types.count("stream_start") == 1
        i_end = types.index("replay_end")
        assert b_got[1]["count"] == i_end - 2 >= 1
        b_part = run_events(b_got)[1:]
        seqs = [e["seq"] for e in b_part]
        assert all(s > n for s in seqs)
        assert seqs == sorted(set(seqs))
        assert text_of(a_part) + text_of(b_part) == expected
        assert b_part[-1] == {"type": "stream_end", "seq": run.log.last_seq, "content": expected}
        assert_grammar(a_part + b_part)


async def test_resume_of_a_finished_run_syncs(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with open_server() as server:
            sid, baseline = await session_with_baseline(server)
            async with server.connect(sid) as a:
                assert (await a.recv())["type"] == "session_sync"
                await a.send_message(script({"text": "x", "repeat": 3, "delay": 1}))
                assert (await a.recv())["type"] == "stream_start"
                run = server.registry.active(sid)
                assert run is not None
                await a.until_terminal()
                got = a.received[1:]
            await assert_no_run_tasks(run)
            assert_grammar(got, merged=False)
            async with server.connect(sid, query=f"run_id={got[0]['run_id']}&after=2") as b:
                assert (await b.recv()) == {"type": "session_sync"}
                t = trio.current_time()
                await assert_only_heartbeat_next(b, server.app.settings.heartbeat_s, t)
            await assert_no_connection_tasks(baseline)
            assert task_names("run:") == []


async def test_resume_of_an_ended_run_while_another_runs(autojump_clock: trio.testing.MockClock) -> None:
    """The run the client knew is over and another one is active: session_sync (reload the
    history), then the active run from its stream_start, replayed, then live."""
    with trio.fail_after(300):
        async with open_server() as server:
            sid, baseline = await session_with_baseline(server)
            async with server.connect(sid) as other:
                assert (await other.recv())["type"] == "session_sync"
                async with server.connect(sid) as a:
                    assert (await a.recv())["type"] == "session_sync"
                    await a.send_message(script({"text": "one", "repeat": 3, "delay": 1}))
                    first = [await a.recv(), await a.recv()]  # stream_start, a delta
                run1 = server.registry.active(sid)
                assert run1 is not None
                await run1.done.wait()  # nobody left on it: it ends by itself
                assert_grammar(await other.until_terminal(), merged=False)
                await other.send_message(script({"text": "two", "repeat": 4, "delay": 1}))
                assert (await other.recv())["type"] == "stream_start"
                assert (await other.recv())["type"] == "stream_delta"
                run2 = server.registry.active(sid)
                assert run2 is not None
                await trio.sleep(1.5)
                query = f"run_id={first[0]['run_id']}&after={first[-1]['seq']}"
                async with server.connect(sid, query=query) as b:
                    assert (await b.recv()) == {"type": "session_sync"}
                    got = await b.until_terminal()
                    assert (await b.recv()) == {"type": "session_sync"}
                other_run2 = await other.until_terminal()
            await assert_no_connection_tasks(baseline)
            await assert_no_run_tasks(run1, run2)

        assert [e["type"] for e in got[:2]] == ["stream_start", "replay_start"]
        assert got[0]["run_id"] == run2.id != run1.id
        assert_grammar(got)
        assert text_of(got) == "two" * 4
        assert got[-1] == other_run2[-1] == log_of(run2)[-1]


# -- 4. two tabs ---------------------------------------------------------------------------


async def test_two_tabs_see_identical_events(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(300):
        async with open_server() as server:
            sid, baseline = await session_with_baseline(server)
            async with server.connect(sid) as t1, server.connect(sid) as t2:
                assert (await t1.recv())["type"] == "session_sync"
                assert (await t2.recv())["type"] == "session_sync"
                # A run started from tab 1, then one from tab 2: both tabs follow both.
                await t1.send_message(RICH_SCRIPT)
                first1 = await t1.until_terminal()
                first2 = await t2.until_terminal()
                await t2.send_message(script({"text": "c", "repeat": 3, "delay": 1}))
                second2 = await t2.until_terminal()
                second1 = await t1.until_terminal()
                t_end = trio.current_time()
                hb = server.app.settings.heartbeat_s
                await assert_only_heartbeat_next(t1, hb, t_end)
                await assert_only_heartbeat_next(t2, hb, t_end)
            await assert_no_connection_tasks(baseline)
            assert task_names("run:") == []

        assert first1 == first2
        assert second1 == second2
        for got in (first1, second1):
            assert_grammar(got, merged=False)
        assert first1[0]["run_id"] != second1[0]["run_id"]
        assert text_of(first1) == "aaaaabbbbb"
        assert text_of(second1) == "ccc"
        assert t1.received[:-1] == t2.received[:-1]  # everything, session_sync to heartbeat


# -- 5. interrupt and enqueue --------------------------------------------------------------


async def test_interrupt_and_enqueue_order_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(300):
        async with open_server() as server:
            sid, baseline = await session_with_baseline(server)
            timed: dict[str, list[tuple[float, dict[str, Any]]]] = {"c1": [], "c2": []}

            async def read_three_runs(name: str, c: Client) -> None:
                terminals = sum(e["type"] in TERMINAL_TYPES for _, e in timed[name])
                while terminals < 3:
                    t, e = await recv_timed(c)
                    timed[name].append((t, e))
                    terminals += e["type"] in TERMINAL_TYPES

            async with server.connect(sid) as c1, server.connect(sid) as c2:
                assert (await c1.recv())["type"] == "session_sync"
                assert (await c2.recv())["type"] == "session_sync"
                await c1.send_message(script({"text": "a", "repeat": 100, "delay": 1}))
                for _ in range(4):  # stream_start and the deltas at +0, +1, +2
                    timed["c1"].append(await recv_timed(c1))
                run_a = server.registry.active(sid)
                assert run_a is not None
                await trio.sleep(0.5)
                t_interrupt = trio.current_time()
                await c1.send_message(script({"text": "b", "repeat": 5, "delay": 1}), if_running="interrupt")
                # c2 waits for run B to start, then queues run C behind it.
                while True:
                    t, e = await recv_timed(c2)
                    timed["c2"].append((t, e))
                    if e["type"] == "stream_start" and e["run_id"] != run_a.id:
                        break
                run_b = server.registry.active(sid)
                assert run_b is not None
                assert run_b is not run_a
                await c2.send_message(script({"text": "c", "repeat": 3, "delay": 1}), if_running="enqueue")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_three_runs, "c1", c1)
                    nursery.start_soon(read_three_runs, "c2", c2)
            await assert_no_connection_tasks(baseline)
            assert server.registry.active(sid) is None  # every run is over
            await assert_no_run_tasks(run_a, run_b)

        views = {}
        for name, got in timed.items():
            events = [e for _, e in got]
            assert all("seq" in e for e in events), f"{name} got a non-run frame: {events}"
            runs = split_runs(events)
            assert len(runs) == 3
            for r in runs:
                assert_grammar(r, merged=False)
            a, b, c = runs
            assert len({a[0]["run_id"], b[0]["run_id"], c[0]["run_id"]}) == 3
            assert a[0]["run_id"] == run_a.id
            assert b[0]["run_id"] == run_b.id
            assert a[-1] == {"type": "stream_stopped", "seq": len(a), "content": "aaa", "reason": "user"}
            assert b[-1] == {"type": "stream_end", "seq": 7, "content": "bbbbb"}
            assert c[-1] == {"type": "stream_end", "seq": 5, "content": "ccc"}
            # Exact times: the stop lands when the interrupt arrives, B starts right then,
            # C starts the instant B ends.
            when = {id(e): t for t, e in got}
            t_b_end = t_interrupt + 4 * 1.0
            assert when[id(a[-1])] == t_interrupt
            assert when[id(b[0])] == t_interrupt
            assert when[id(b[-1])] == t_b_end
            assert when[id(c[0])] == t_b_end
            assert when[id(c[-1])] == t_b_end + 2 * 1.0
            # The terminal of each run comes before the next stream_start.
            order = [e["type"] for e in events]
            assert order.index("stream_stopped") < order.index("stream_start", 1)
            views[name] = events
        assert views["c1"] == views["c2"]


# -- 6. heartbeat timing -------------------------------------------------------------------


async def test_heartbeat_timing_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(600):
        async with open_server(heartbeat_s=15.0) as server:
            sid, baseline = await session_with_baseline(server)
            async with server.connect(sid) as c:
                assert (await c.recv())["type"] == "session_sync"
                t0 = trio.current_time()
                t1, e1 = await recv_timed(c)
                t2, e2 = await recv_timed(c)
                assert e1 == e2 == {"type": "heartbeat"}
                assert t1 - t0 == 15.0
                assert t2 - t1 == 15.0

                # A delta every 10 s: never 15 s of silence, so no heartbeat.
                await c.send_message(script({"text": "d", "repeat": 5, "delay": 10}))
                got = []
                while not got or got[-1][1]["type"] not in TERMINAL_TYPES:
                    got.append(await recv_timed(c))
                events = [e for _, e in got]
                assert_grammar(events, merged=False)
                assert all(e["type"] != "heartbeat" for e in events)
                assert [t - t2 for t, e in got if e["type"] == "stream_delta"] == [0.0, 10.0, 20.0, 30.0, 40.0]
                t_end = got[-1][0]
                assert t_end - t2 == 40.0
                t3, e3 = await recv_timed(c)
                assert e3 == {"type": "heartbeat"}
                assert t3 - t_end == 15.0

                # A run that goes quiet for 40 s: heartbeats 15 and 30 s after its last event.
                await c.send_message(script({"text": "a"}, {"sleep": 40}, {"text": "b"}))
                got = []
                while not got or got[-1][1]["type"] not in TERMINAL_TYPES:
                    got.append(await recv_timed(c))
                assert [(t - t3, e["type"]) for t, e in got] == [
                    (0.0, "stream_start"),
                    (0.0, "stream_delta"),
                    (15.0, "heartbeat"),
                    (30.0, "heartbeat"),
                    (40.0, "stream_delta"),
                    (40.0, "stream_end"),
                ]
                assert_grammar([e for _, e in got], merged=False)
            await assert_no_connection_tasks(baseline)
            assert task_names("run:") == []


# -- 7. slow subscriber --------------------------------------------------------------------
#
# These two tests move tens of MB through loopback TCP. Under ``autojump_threshold=0`` a
# real-time TCP stall (the kernel waiting on a timer before it lets ``send_all`` go on)
# leaves every task blocked, and the clock leaps ahead while bytes are in flight: measured,
# a 26 MB frame "took" 800 virtual seconds, and 1 run in 5 broke. So while bulk data moves
# the clock only jumps after ``STALL_GUARD_S`` real seconds of idleness (a hang still ends
# in ``TooSlowError``), and the test moves it by hand, one tick of the run's schedule after
# the fast reader got each delta. The run's schedule, not the readers, decides the times.

#: Half the merge bound: two chunks fill one merged frame (a frame never grows past the
#: bound, so with chunks of the full bound a lagging reader could see no merging at all).
BIG_CHUNK = "x" * (MERGE_MAX_CHARS // 2)
BIG_REPEAT = 400
BIG_DELAY = 1 / 128  # a binary fraction: the schedule's float arithmetic is exact
STALL_GUARD_S = 5.0


async def read_paced(
    c: Client,
    clock: trio.testing.MockClock,
    *,
    deltas: int,
    on_event: Callable[[dict[str, Any]], None] = lambda e: None,
) -> list[tuple[float, dict[str, Any]]]:
    """Read ``c`` (a reader that keeps up) until ``deltas`` deltas arrived, advancing the
    clock by one ``BIG_DELAY`` after each delta but the last (the run emitted that delta and
    went to sleep in the same step, so it is asleep by now), so the clock ends at the time
    of the last delta read.
    Returns every event with the virtual time it arrived at."""
    got: list[tuple[float, dict[str, Any]]] = []
    seen = 0
    while seen < deltas:
        t, e = await recv_timed(c)
        got.append((t, e))
        on_event(e)
        assert e["type"] not in TERMINAL_TYPES, e
        if e["type"] == "stream_delta":
            seen += 1
            if seen < deltas:
                clock.jump(BIG_DELAY)
    return got


async def test_slow_subscriber_never_slows_the_run_or_others(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(600):
        # 26 MB of text: over the scripted agent's default bound of 10 million characters.
        async with open_server(script_max_chars=BIG_REPEAT * len(BIG_CHUNK)) as server:
            outbox_size = server.app.settings.outbox_size
            sid, baseline = await session_with_baseline(server)
            async with connect_big(server, sid) as s:
                assert (await s.recv())["type"] == "session_sync"
                s_conn = connection_of(server, sid)
                # S reads nothing from here on, until F is done.
                async with connect_big(server, sid) as f:
                    assert (await f.recv())["type"] == "session_sync"
                    autojump_clock.autojump_threshold = STALL_GUARD_S
                    with trio.fail_after(60):
                        await f.send_message(script({"text": BIG_CHUNK, "repeat": BIG_REPEAT, "delay": BIG_DELAY}))
                        t0, start = await recv_timed(f)
                        assert start["type"] == "stream_start"
                        run = server.registry.active(sid)
                        assert run is not None
                        s_sub = subscription(s_conn, run)
                        max_used = 0
                        s_lagged_at: list[int] = []

                        def watch_s(e: dict[str, Any]) -> None:
                            nonlocal max_used
                            max_used = max(max_used, s_conn._outbox_recv.statistics().current_buffer_used)
                            if s_sub.lagging and not s_lagged_at:
                                s_lagged_at.append(e["seq"])

                        f_got = [(t0, start)]
                        f_got += await read_paced(f, autojump_clock, deltas=BIG_REPEAT, on_event=watch_s)
                        f_got.append(await recv_timed(f))
                        watch_s(f_got[-1][1])
                        await run.done.wait()
                    # F got every event at the instant the run's schedule says: nothing waited for S.
                    deltas = [t for t, e in f_got if e["type"] == "stream_delta"]
                    assert deltas == [t0 + i * BIG_DELAY for i in range(BIG_REPEAT)]
                    assert f_got[-1][0] == t0 + (BIG_REPEAT - 1) * BIG_DELAY
                    f_events = [e for _, e in f_got]
                    assert_grammar(f_events, merged=False)
                    assert f_events == log_of(run)
                    assert f_events[-1]["type"] == "stream_end"
                    # S fell behind, and the server never held more than its bound for it.
                    assert s_lagged_at
                    assert s_lagged_at[0] < BIG_REPEAT
                    assert s_sub.lagging
                    assert s_sub in s_conn.lagging
                    assert max_used <= outbox_size
                    assert s_conn._outbox_recv.statistics().current_buffer_used <= outbox_size
                    assert not s_sub.prelude
                    assert run.subscribers == []  # the run keeps no reference to S
                # Now S reads: the same text, the same terminal, seqs strictly increasing.
                with trio.fail_after(1):
                    s_got = await s.until_terminal()
                t_s_end = trio.current_time()
                assert t_s_end == f_got[-1][0]  # catching up took no virtual time
                autojump_clock.autojump_threshold = 0
                assert_grammar(s_got)
                assert text_of(s_got) == BIG_CHUNK * BIG_REPEAT
                assert s_got[-1] == f_events[-1]
                assert len(s_got) < len(f_events)  # some deltas reached S merged
                # The client can read the last frame before the server's writer loops once
                # more and re-arms S: settle first (autojump does not advance meanwhile).
                await trio.testing.wait_all_tasks_blocked()
                assert not s_sub.lagging
                await assert_only_heartbeat_next(s, server.app.settings.heartbeat_s, t_s_end)
            await assert_no_connection_tasks(baseline)
            await assert_no_run_tasks(run)


# -- 8. stop from a second connection while the first lags ---------------------------------


async def test_stop_from_other_connection_while_one_lags(autojump_clock: trio.testing.MockClock) -> None:
    repeat, stop_after = 1000, 200
    with trio.fail_after(600):
        async with open_server(script_max_chars=repeat * len(BIG_CHUNK)) as server:
            sid, baseline = await session_with_baseline(server)
            async with connect_big(server, sid) as lag:
                assert (await lag.recv())["type"] == "session_sync"
                lag_conn = connection_of(server, sid)
                async with connect_big(server, sid) as t:
                    assert (await t.recv())["type"] == "session_sync"
                    autojump_clock.autojump_threshold = STALL_GUARD_S
                    with trio.fail_after(60):
                        await t.send_message(script({"text": BIG_CHUNK, "repeat": repeat, "delay": BIG_DELAY}))
                        t0, start = await recv_timed(t)
                        run = server.registry.active(sid)
                        assert run is not None
                        assert start["run_id"] == run.id
                        lag_sub = subscription(lag_conn, run)
                        await read_paced(t, autojump_clock, deltas=stop_after)
                        assert lag_sub.lagging
                        t_stop = trio.current_time()
                        assert t_stop == t0 + (stop_after - 1) * BIG_DELAY
                        await t.send({"type": "stop"})
                        t_got = await t.until_terminal()
                        assert trio.current_time() == t_stop
                        await run.done.wait()
                        assert trio.current_time() == t_stop
                        assert lag_sub.lagging
                        lag_got = await lag.until_terminal()
                    t_lag_end = trio.current_time()
                    assert t_lag_end == t_stop
                    autojump_clock.autojump_threshold = 0
                    hb = server.app.settings.heartbeat_s
                    await assert_only_heartbeat_next(lag, hb, t_lag_end)
                    await assert_only_heartbeat_next(t, hb, t_stop)
            await assert_no_connection_tasks(baseline)
            await assert_no_run_tasks(run)

        full = log_of(run)
        assert_grammar(full, merged=False)
        content = BIG_CHUNK * stop_after
        terminal = {"type": "stream_stopped", "seq": stop_after + 2, "content": content, "reason": "user"}
        assert full[-1] == terminal
        t_view = run_events(t.received)
        assert t_view == full
        assert t_got[-1] == terminal
        for view in (t_view, run_events(lag.received)):
            assert_grammar(view)
            assert sum(e["type"] in TERMINAL_TYPES for e in view) == 1
            assert view[-1] == terminal
            assert text_of(view) == content
        assert lag_got[-1] == terminal


# -- 9. shutdown ---------------------------------------------------------------------------


async def test_shutdown_stops_run_after_grace_and_closes_1012(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(300):
        async with open_server() as server:
            grace = server.app.settings.grace_s
            assert grace == 1.0
            sid, _ = await session_with_baseline(server)
            idle_sid = await server.new_session()
            async with server.connect(sid) as c, server.connect(idle_sid) as idle:
                assert (await c.recv())["type"] == "session_sync"
                assert (await idle.recv())["type"] == "session_sync"
                await c.send_message(script({"text": "w ", "repeat": 100, "delay": 1}))
                for _ in range(4):  # stream_start, the deltas at +0, +1, +2
                    await c.recv()
                run = server.registry.active(sid)
                assert run is not None
                await trio.sleep(0.5)  # between two deltas, so the grace ends between two too
                t_shutdown = trio.current_time()
                server.shutdown()
                got = await c.until_terminal()
                t_stopped = trio.current_time()
                assert t_stopped == t_shutdown + grace
                assert await c.until_closed() == 1012
                assert await idle.until_closed() == 1012
                assert trio.current_time() == t_stopped
            await trio.testing.wait_all_tasks_blocked()
            assert task_names("ws-") == []
            await assert_no_run_tasks(run)
            store = server.registry.store
            assert isinstance(store, MemoryStore)
            user, answer = store.messages[sid]
            idle_messages = store.messages[idle_sid]
        assert task_names("run:") == []

        assert_grammar(c.received, merged=False)
        partial = "w " * 4  # the deltas at +0, +1, +2 and +3; the grace ended at +3.5
        assert text_of(c.received) == partial
        assert got[-1] == {"type": "stream_stopped", "seq": 6, "content": partial, "reason": "shutdown"}
        assert run_events(c.received) == log_of(run)
        assert [e["type"] for e in c.received if "seq" not in e] == ["session_sync"]
        assert user.role == "user"
        assert (answer.role, answer.status, answer.content) == ("assistant", "interrupted", partial)
        assert idle_messages == []


async def test_shutdown_completes_with_a_client_that_never_reads() -> None:
    """A client that stopped reading (its socket buffers full) must not hold the server up.

    Hypercorn writes inside a shielded ``send_all`` that no cancel reaches; the listening
    socket's ``TCP_USER_TIMEOUT`` (``send_timeout_s``) makes the kernel fail that write.
    Real clock: the timeout is the kernel's. The run stops after the grace, the reading
    client gets 1012, and the server is down within grace + save + send timeout + margin.
    """
    released = trio.Event()
    s_ready = trio.Event()

    async def slow_client(server: Server, sid: str) -> None:
        async with connect_big(server, sid) as s:
            assert (await s.recv())["type"] == "session_sync"
            s_ready.set()
            await released.wait()  # never reads again

    with trio.fail_after(30):
        async with trio.open_nursery() as outer:
            t0 = trio.current_time()
            async with open_server(
                grace_s=0.5, save_timeout_s=1.0, send_timeout_s=1.0, script_max_chars=300 * len(BIG_CHUNK)
            ) as server:
                sid = await server.new_session()
                outer.start_soon(slow_client, server, sid)
                await s_ready.wait()
                s_conn = connection_of(server, sid)
                async with connect_big(server, sid) as f:
                    assert (await f.recv())["type"] == "session_sync"
                    await f.send_message(script({"text": BIG_CHUNK, "repeat": 300}, {"sleep": 1000}))
                    got = await f.until("stream_start")
                    run = server.registry.active(sid)
                    assert run is not None
                    while not subscription(s_conn, run).lagging:  # bounded by fail_after
                        got.append(await f.recv())
                    t0 = trio.current_time()
                    server.shutdown()
                    got += await f.until_terminal()
                    assert got[-1]["type"] == "stream_stopped" and got[-1]["reason"] == "shutdown"
                    assert await f.until_closed() == 1012
                await run.done.wait()
            down_after = trio.current_time() - t0
            released.set()
    assert down_after < 0.5 + 1.0 + 1.0 + 3.0, down_after


@pytest.mark.parametrize("offset", [-BIG_DELAY, 0.0, None])
async def test_stop_racing_completion_gives_one_terminal(
    autojump_clock: trio.testing.MockClock, offset: float | None
) -> None:
    """A stop just before, at, or just after the last delta: exactly one terminal event,
    the saved answer agrees with it, and the connection can start the next run at once."""
    with trio.fail_after(60):
        async with open_server() as server:
            sid, baseline = await session_with_baseline(server)
            async with server.connect(sid) as c:
                assert (await c.recv())["type"] == "session_sync"
                await c.send_message(script({"text": "a", "repeat": 3, "delay": 1}))
                t0 = trio.current_time()
                start = await c.recv()
                run = server.registry.active(sid)
                assert run is not None
                assert run.id == start["run_id"]
                if offset is None:
                    await c.until_terminal()  # after the run's own stream_end
                else:
                    await trio.sleep_until(t0 + 2.0 + offset)
                await c.send({"type": "stop"})
                await run.done.wait()
                await c.send_message(script({"text": "next"}))
                while sum(e.get("type") == "stream_start" for e in c.received) < 2:
                    await c.recv()
                nxt = await c.until_terminal()
                runs = split_runs(c.received)
            await assert_no_connection_tasks(baseline)
            await assert_no_run_tasks(run)
            store = server.registry.store
            assert isinstance(store, MemoryStore)
            answers = [m for m in store.messages[sid] if m.role == "assistant"]

        assert len(runs) == 2
        assert runs[0][0]["run_id"] == run.id
        assert runs[1][-1] == nxt[-1] == {"type": "stream_end", "seq": 3, "content": "next"}
        first = runs[0]
        assert first == log_of(run)
        assert_grammar(first, merged=False)
        terminal = first[-1]
        if offset is not None and offset < 0:
            assert terminal == {"type": "stream_stopped", "seq": 4, "content": "aa", "reason": "user"}
        elif offset is None:
            assert terminal == {"type": "stream_end", "seq": 5, "content": "aaa"}
        else:  # the same instant as the last delta: either outcome, never both
            assert terminal["type"] in ("stream_end", "stream_stopped")
        status = {"stream_end": "complete", "stream_stopped": "stopped"}[terminal["type"]]
        assert (answers[0].status, answers[0].content) == (status, terminal["content"])
        # A stop that came after the run's end is answered: nothing was left to stop.
        late = [{"type": "error", "message": "No active run to stop."}] if terminal["type"] == "stream_end" else []
        assert [e for e in c.received if "seq" not in e] == [{"type": "session_sync"}, *late]


async def test_shutdown_during_a_tool_closes_it_as_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with open_server() as server:
            grace = server.app.settings.grace_s
            sid, _ = await session_with_baseline(server)
            async with server.connect(sid) as c:
                assert (await c.recv())["type"] == "session_sync"
                await c.send_message(script({"text": "a"}, {"tool": "search", "args": {"q": 1}, "delay": 100}))
                while not c.received or c.received[-1]["type"] != "tool_started":
                    await c.recv()
                run = server.registry.active(sid)
                assert run is not None
                t_shutdown = trio.current_time()
                server.shutdown()
                got = await c.until_terminal()
                assert trio.current_time() == t_shutdown + grace
                assert await c.until_closed() == 1012
            await assert_no_run_tasks(run)
            store = server.registry.store
            assert isinstance(store, MemoryStore)
            answer = store.messages[sid][-1]
        assert task_names("ws-") == []

        assert_grammar(c.received, merged=False)
        assert got[-2:] == [
            {
                "type": "tool_call",
                "seq": 4,
                "tool": "search",
                "args": {"q": 1},
                "result": "cancelled",
                "success": False,
                "is_subagent": False,
            },
            {"type": "stream_stopped", "seq": 5, "content": "a", "reason": "shutdown"},
        ]
        assert (answer.status, answer.content) == ("interrupted", "a")
        assert answer.tool_calls == [{"tool": "search", "args": {"q": 1}, "result": "cancelled", "success": False}]

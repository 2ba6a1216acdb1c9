"""Two processes' nodes on one real redis-server (``navi_trio/cluster/broker.py``).

Each node has its own Redis connection and key view, as two navi-trio processes would;
the runs are real :class:`~navi_trio.lifecycle.Run` objects played by the test (it is the
agent), the readers are the conformance suite's recording outboxes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio
import trio.lowlevel
import trio.testing

from navi_trio.cluster.broker import RedisBroker, RemoteRun
from navi_trio.cluster.redis import Keys, connect
from navi_trio.cluster.stream import StreamReader
from navi_trio.events import check_grammar
from navi_trio.lifecycle import How, Run

from .broker_conformance import Recorder, RecordingOutbox, request, run_events
from .redis_server import RedisServer


@contextlib.asynccontextmanager
async def node(
    server: RedisServer, keys: Keys, owner: str, lease_s: float = 10.0
) -> AsyncIterator[tuple[RedisBroker, Recorder]]:
    rec = Recorder()
    async with connect(server.url) as client, trio.open_nursery() as nursery:
        n = RedisBroker(client, keys, owner, lease_s=lease_s, max_run_events=1000)
        n.bind(rec.notice, rec.orphan)
        await nursery.start(n.serve)
        yield n, rec
        nursery.cancel_scope.cancel()


async def test_a_run_is_followed_live_and_attached_from_another_process(
    redis_server: RedisServer, redis_keys: Keys
) -> None:
    async with node(redis_server, redis_keys, "A") as (a, _), node(redis_server, redis_keys, "B") as (b, b_rec):
        run = Run(request("s"))
        assert await a.claim("s", run.id)
        assert not await b.claim("s", "another-run")
        local = RecordingOutbox()
        run.subscribe(local)
        await a.own(run)
        with trio.fail_after(5):
            while not any(n.kind == "run_started" for n in b_rec.notices):
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(0.001)
        started = next(n for n in b_rec.notices if n.kind == "run_started")
        assert (started.session_id, started.run_id, started.owner) == ("s", run.id, "A")
        async with trio.open_nursery() as nursery:
            remote: RemoteRun = await nursery.start(b.watch, "s", run.id)
            follower = RecordingOutbox()
            remote.subscribe(follower)
            slow = RecordingOutbox(size=2)  # falls behind: caught up from the mirror, merged
            remote.subscribe(slow)
            run.start()
            run.play()
            for i in range(40):
                run.emit_text(f"w{i} ")
                if i % 10 == 0:
                    await trio.lowlevel.checkpoint()
            run.emit_tool_started("search", {"q": "x"})
            run.emit_tool_call("ok", success=True)
            run.emit_text("end")
            run.end(How.COMPLETED)
            assert await a.finish(run) is None
            run.settle()
            with trio.fail_after(5):
                await remote.done.wait()
        assert follower.drain() == local.drain()  # the same frames, live, on the other process
        slow_frames = slow.drain()
        check_grammar(run_events(slow_frames))
        assert "".join(f.get("delta", "") for f in slow_frames if f["type"] == "stream_delta") == run.log.content
        assert len(slow_frames) < len(local.written)  # merged
        attach = RecordingOutbox()
        remote.subscribe(attach, replay=True)
        frames = attach.drain()
        assert [f["type"] for f in frames[:2]] == ["stream_start", "replay_start"]
        assert frames[-2]["type"] == "replay_end" and frames[-1]["type"] == "session_sync"
        resume = RecordingOutbox()
        remote.subscribe(resume, replay=True, after=40)
        got = [f.get("seq") for f in resume.drain() if "seq" in f]
        assert got == [1, *range(41, run.log.last_seq + 1)]
        assert await b.holder("s") is None  # freed


async def test_a_stop_from_another_process_answers_once_the_run_is_settled(
    redis_server: RedisServer, redis_keys: Keys
) -> None:
    saved: list[str] = []
    async with (
        node(redis_server, redis_keys, "A") as (a, _),
        node(redis_server, redis_keys, "B") as (b, _),
        connect(redis_server.url) as reader,
    ):
        run = Run(request("s"))
        assert await a.claim("s", run.id)
        await a.own(run)

        async def play() -> None:
            run.start()
            run.play()
            run.emit_text("partial")
            with run.cancel_scope:
                await trio.sleep_forever()
            run.end(How.CANCELLED)
            await trio.sleep(0.05)  # the answer's save takes a while
            saved.append(run.log.content)
            await a.finish(run)
            run.settle()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(play)
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(5):
                holder, live = await b.stop_live("s", "user")
                assert holder is not None and live
                await StreamReader(reader, redis_keys, holder.run_id).read_until_settled()
            assert holder.run_id == run.id
            assert saved == ["partial"], "the stop answered before the answer was saved"
            assert run.stop_reason == "user"
            assert run.log.terminal is not None and run.log.terminal.type == "stream_stopped"
        assert await b.stop_live("s", "user") == (None, False)  # nothing runs now


LEASE_S = 0.3


async def dies_playing(server: RedisServer, keys: Keys, run: Run, *, ended: bool) -> None:
    """Node A plays ``run`` (some text; its terminal event too if ``ended``) and dies once
    node-side readers have all of it: its tasks end, its lease is no longer renewed."""
    async with node(server, keys, "A", LEASE_S) as (a, _), node(server, keys, "W") as (w, _):
        assert await a.claim("s", run.id)
        await a.own(run)
        async with trio.open_nursery() as nursery:
            remote: RemoteRun = await nursery.start(w.watch, "s", run.id)
            run.start()
            run.play()
            run.emit_text("some text")
            if ended:
                run.end(How.COMPLETED)
            with trio.fail_after(5):
                while remote.mirror.last_seq < run.log.last_seq:  # noqa: ASYNC110  # read from Redis
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def settled_by(b: RedisBroker, run: Run) -> RemoteRun:
    """The run as ``b`` reads it, once settled (by ``b``'s sweep) within the lease."""
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        remote: RemoteRun = await nursery.start(b.watch, "s", run.id)
        with trio.fail_after(LEASE_S * 10):
            await remote.done.wait()
    assert trio.current_time() - start < LEASE_S * 3
    return remote


async def test_a_dead_owners_run_is_ended_by_another_process_within_the_lease(
    redis_server: RedisServer, redis_keys: Keys
) -> None:
    async with node(redis_server, redis_keys, "B", LEASE_S) as (b, b_rec):
        run = Run(request("s"))
        await dies_playing(redis_server, redis_keys, run, ended=False)
        terminal = (await settled_by(b, run)).mirror.terminal
        assert terminal is not None and terminal.type == "stream_stopped"
        assert '"reason":"shutdown"' in terminal.wire
        [(session_id, answer_id, log)] = b_rec.orphans
        assert (session_id, answer_id, log.content) == ("s", run.answer_id, "some text")
        assert await b.claim("s", "next-run")  # the session is free again


async def test_a_run_whose_owner_died_after_its_terminal_event_is_settled_by_another(
    redis_server: RedisServer, redis_keys: Keys
) -> None:
    async with node(redis_server, redis_keys, "B", LEASE_S) as (b, b_rec):
        run = Run(request("s"))
        await dies_playing(redis_server, redis_keys, run, ended=True)
        terminal = (await settled_by(b, run)).mirror.terminal  # a stop waiting on it returns
        assert terminal is not None and terminal.type == "stream_end"
        [(_, answer_id, log)] = b_rec.orphans  # its answer, never saved by its owner: saved from the log
        assert (answer_id, log.content) == (run.answer_id, "some text")


async def test_appends_survive_a_redis_that_forgot_its_scripts(redis_server: RedisServer, redis_keys: Keys) -> None:
    """The appender names its script by SHA (no ``SCRIPT EXISTS`` trip per pipeline); a
    Redis that lost its scripts (restarted, ``SCRIPT FLUSH``) gets it loaded again and
    nothing of the run is lost."""
    async with node(redis_server, redis_keys, "A") as (a, _), connect(redis_server.url) as admin:
        run = Run(request("s"))
        assert await a.claim("s", run.id)
        await a.own(run)
        run.start()
        run.play()
        run.emit_text("before ")
        with trio.fail_after(5):
            while await admin.xlen(redis_keys.log(run.id)) < 2:  # noqa: ASYNC110 (Redis's view: no event here)
                await trio.sleep(0.001)
        await admin.script_flush()
        run.emit_text("after")
        run.end(How.COMPLETED)
        assert await a.finish(run) is None
        reader = StreamReader(admin, redis_keys, run.id)
        with trio.fail_after(5):
            mirror = await reader.read_until_settled()
        assert [e.seq for e in mirror.events] == [e.seq for e in run.log.events]
        assert "".join(e.delta or "" for e in mirror.events) == "before after"

"""A run's log as a Redis Stream (``navi_trio/cluster/stream.py``), against a real redis-server."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from navi_trio.catchup import Cursor
from navi_trio.cluster.redis import Client, Keys
from navi_trio.cluster.stream import (
    ENDED_TTL_S,
    MirrorLog,
    RunStream,
    RunTakenOver,
    StreamReader,
    end_orphan,
    rebuild,
)
from navi_trio.events import Event, RunLog


def sample_log(run_id: str = "r1", deltas: int = 30) -> RunLog:
    log = RunLog(run_id)
    log.start()
    for i in range(deltas):
        log.thinking_delta(f"t{i} ")
    for i in range(deltas):
        log.text_delta(f"w{i} ")
    log.tool_started("search", {"q": "x"})
    log.tool_call("found", success=True)
    log.text_delta("done")
    return log


def catch_up_frames(log: RunLog | MirrorLog, after: int | None) -> list[str]:
    """What a reader attaching (``after`` None) or resuming after seq ``after`` is written."""
    cursor = Cursor()
    cursor.start_replay(log, after)  # type: ignore[arg-type]  # a MirrorLog walks as a RunLog
    frames = []
    for _ in range(10_000):
        frame = cursor.next_frame(log, settled=False)  # type: ignore[arg-type]
        if frame is None:
            return frames
        frames.append(frame)
    raise AssertionError("catch-up did not end")


async def test_entries_are_the_seq_and_a_reader_mirrors_the_log(redis: Client, redis_keys: Keys) -> None:
    log = sample_log()
    writer = RunStream(redis, redis_keys, "r1", max_events=1000)
    await writer.append(log.events[:10])
    await writer.append(log.events[10:])
    entries = await redis.xrange(redis_keys.log("r1"), "-", "+")
    assert [e.identifier for e in entries] == [f"0-{ev.seq}" for ev in log.events]

    reader = StreamReader(redis, redis_keys, "r1")
    got = await reader.read(count=7)
    assert [ev.seq for ev in got] == list(range(1, 8))
    await reader.read()  # from its cursor: the rest, nothing twice
    assert [(e.seq, e.type, e.wire, e.delta) for e in reader.log.events] == [
        (e.seq, e.type, e.wire, e.delta) for e in log.events
    ]
    # The catch-up (merging included) is the same from the mirror as from the log itself.
    for after in (None, 1, 5, 31, 45, len(log.events)):
        assert catch_up_frames(reader.log, after) == catch_up_frames(log, after)


async def test_a_blocked_reader_wakes_on_append_and_a_cancel_just_ends_its_wait(
    redis: Client, redis_keys: Keys
) -> None:
    log = sample_log(deltas=2)
    writer = RunStream(redis, redis_keys, "r1", max_events=1000)
    reader = StreamReader(redis, redis_keys, "r1")
    got: list[list[Event]] = []

    async def follow() -> None:
        got.append(await reader.read(block_ms=30_000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        await writer.append(log.events[:3])
    assert [ev.seq for ev in got[0]] == [1, 2, 3]

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    assert len(got) == 1 and reader.log.last_seq == 3
    await writer.append(log.events[3:])  # the client still works after the cancelled XREAD
    assert [ev.seq for ev in await reader.read(block_ms=1000)] == list(range(4, len(log.events) + 1))


async def test_appends_are_fenced_and_settle_ends_the_stream_with_a_ttl(redis: Client, redis_keys: Keys) -> None:
    log = sample_log(deltas=1)
    writer = RunStream(redis, redis_keys, "r1", max_events=1000)
    await writer.append(log.events)
    stale = RunStream(redis, redis_keys, "r1", max_events=1000)  # thinks the stream is empty
    with pytest.raises(RunTakenOver):
        await stale.append(log.events[:1])
    closing = log.end()
    await writer.append(closing)
    more = Event(closing[-1].seq + 1, "stream_delta", "{}", "x")
    with pytest.raises(RunTakenOver):  # nothing after the terminal event
        await writer.append([more])
    assert await redis.ttl(writer.key) == -1  # no TTL while the run is not settled
    await writer.settle()
    assert 0 < await redis.ttl(writer.key) <= ENDED_TTL_S

    reader = StreamReader(redis, redis_keys, "r1")
    mirror = await reader.read_until_settled(block_ms=1000)
    assert mirror.settled
    assert mirror.terminal is not None and mirror.terminal.type == "stream_end"
    assert mirror.last_seq == log.last_seq


async def test_the_stream_is_bounded(redis: Client, redis_keys: Keys) -> None:
    log = RunLog("r1")
    log.start()
    for i in range(999):
        log.text_delta(str(i))
    writer = RunStream(redis, redis_keys, "r1", max_events=4)
    for i in range(0, 1000, 50):
        await writer.append(log.events[i : i + 50])
    assert await redis.xlen(writer.key) < 300  # MAXLEN ~ 68: whole nodes of 100 entries trimmed


async def test_an_orphaned_run_is_ended_once_and_its_owner_is_fenced_off(redis: Client, redis_keys: Keys) -> None:
    log = RunLog("r1")
    log.start()
    log.text_delta("Hello, ")
    log.text_delta("world")
    log.thinking_delta("hmm")
    log.tool_started("search", {"q": "x"})
    owner = RunStream(redis, redis_keys, "r1", max_events=1000)
    await owner.append(log.events)
    played = log.last_seq

    ended = await end_orphan(redis, redis_keys, "r1", max_events=1000)
    assert ended is not None
    assert ended.content == "Hello, world"
    assert ended.terminal is not None and ended.terminal.type == "stream_stopped"
    assert await end_orphan(redis, redis_keys, "r1", max_events=1000) is None  # once in the cluster
    with pytest.raises(RunTakenOver):
        await owner.append(log.tool_call("late", success=True))

    reader = StreamReader(redis, redis_keys, "r1")
    await reader.read()
    types = [e.type for e in reader.log.events[played - 1 :]]
    assert types == ["tool_started", "tool_call", "stream_stopped"]
    assert '"reason":"shutdown"' in reader.log.events[-1].wire
    assert 0 < await redis.ttl(redis_keys.log("r1")) <= ENDED_TTL_S


async def test_a_run_that_ended_is_no_orphan(redis: Client, redis_keys: Keys) -> None:
    log = sample_log(deltas=1)
    log.stopped("user")
    await RunStream(redis, redis_keys, "r1", max_events=1000).append(log.events)
    assert await end_orphan(redis, redis_keys, "r1", max_events=1000) is None
    assert await end_orphan(redis, redis_keys, "never-logged", max_events=1000) is None


def test_rebuild_replays_the_grammar() -> None:
    log = sample_log()
    again = rebuild(log.events, "r1")
    assert [e.wire for e in again.events] == [e.wire for e in log.events]
    assert again.content == log.content and again.thinking_text == log.thinking_text
    with pytest.raises(ValueError, match="does not replay"):
        rebuild([*log.events[:2], log.events[3]], "r1")

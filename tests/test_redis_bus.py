"""The cluster's notices (``navi_trio/cluster/bus.py``), against a real redis-server."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from navi_trio.cluster.bus import Bus, Notice
from navi_trio.cluster.redis import Client, Keys


async def test_every_listener_hears_every_notice_after_it_started_in_order(redis: Client, redis_keys: Keys) -> None:
    bus = Bus(redis, redis_keys)
    await bus.publish(Notice("stop", "before", "r0", reason="user"))  # before anyone listened
    heard: dict[str, list[Notice]] = {"a": [], "b": []}
    sent = [
        Notice("run_started", "s1", "r1", owner="p1"),
        Notice("stop", "s1", "r1", reason="deleted"),
        Notice("close", "s1", reason="Session deleted", code=4004),
    ]
    async with trio.open_nursery() as nursery:
        for name in heard:
            await nursery.start(bus.listen, heard[name].append)
        for notice in sent:
            await bus.publish(notice)
        for _ in range(1000):  # bounded: until both heard all three
            if all(len(h) == len(sent) for h in heard.values()):
                break
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert heard["a"] == sent
    assert heard["b"] == sent


async def test_an_unknown_notice_is_refused(redis: Client, redis_keys: Keys) -> None:
    with pytest.raises(ValueError, match="unknown notice"):
        await Bus(redis, redis_keys).publish(Notice("explode", "s1"))

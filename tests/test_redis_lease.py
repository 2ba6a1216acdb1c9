"""The lease (``navi_trio/cluster/lease.py``) against a real redis-server."""

from __future__ import annotations

import trio

from navi_trio.cluster.lease import Holder, Leases
from navi_trio.cluster.redis import Client, Keys


async def test_a_claim_succeeds_once_per_session(redis: Client, redis_keys: Keys) -> None:
    a = Leases(redis, redis_keys, "proc-a")
    b = Leases(redis, redis_keys, "proc-b")
    assert await a.claim("s1", "run-1")
    assert not await b.claim("s1", "run-2")
    assert not await a.claim("s1", "run-3")
    assert await b.claim("s2", "run-4")  # another session is free
    assert await b.holder("s1") == Holder("run-1", "proc-a")
    ttl = await redis.pttl(redis_keys.lease("s1"))
    assert 0 < ttl <= a.lease_ms


async def test_two_processes_racing_for_a_session_one_wins(redis: Client, redis_keys: Keys) -> None:
    wins: list[str] = []

    async def race(owner: str) -> None:
        if await Leases(redis, redis_keys, owner).claim("s", f"run-{owner}"):
            wins.append(owner)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(race, f"p{i}")
    assert len(wins) == 1


async def test_only_the_owner_renews_hands_over_and_releases(redis: Client, redis_keys: Keys) -> None:
    a = Leases(redis, redis_keys, "proc-a", lease_s=5)
    b = Leases(redis, redis_keys, "proc-b", lease_s=5)
    assert await a.claim("s", "r1")
    await redis.pexpire(redis_keys.lease("s"), 1000)
    assert not await b.renew("s", "r1")  # same run id, another process: not its lease
    assert not await a.renew("s", "other-run")
    assert await redis.pttl(redis_keys.lease("s")) <= 1000
    assert await a.renew("s", "r1")
    assert await redis.pttl(redis_keys.lease("s")) > 1000
    assert not await b.release("s", "r1")
    assert not await b.hand_over("s", "r1", "r2")
    assert await a.hand_over("s", "r1", "r2")
    assert await a.holder("s") == Holder("r2", "proc-a")
    assert not await a.release("s", "r1")  # handed over: r1 no longer holds it
    assert await a.release("s", "r2")
    assert await a.holder("s") is None
    assert await b.claim("s", "r3")


async def test_a_lease_nobody_renews_expires(redis: Client, redis_keys: Keys) -> None:
    dead = Leases(redis, redis_keys, "dead", lease_s=0.05)
    alive = Leases(redis, redis_keys, "alive")
    assert await dead.claim("s", "r1")
    for _ in range(200):  # bounded: 50 ms lease, polled for up to ~2 s
        if await alive.holder("s") is None:
            break
        await trio.sleep(0.01)
    assert await alive.holder("s") is None
    assert not await dead.renew("s", "r1")  # too late: expired leases are not revived
    assert await alive.claim("s", "r2")
    assert not await dead.release("s", "r1")
    assert await alive.holder("s") == Holder("r2", "alive")

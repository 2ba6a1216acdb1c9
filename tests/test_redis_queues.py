"""Queues as Redis lists (``navi_trio/cluster/queues.py``), against a real redis-server."""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

from navi_trio.admission import Queued
from navi_trio.cluster.lease import Holder, Leases
from navi_trio.cluster.queues import Queues, dump, load
from navi_trio.cluster.redis import Client, Keys
from navi_trio.lifecycle import RunRequest


def queued(content: str, *, interrupted: bool = False) -> Queued:
    return Queued(RunRequest("s", "u1", content, content, upload_dir=Path("/tmp/x")), interrupted=interrupted)


def same(a: Queued, b: Queued) -> bool:
    """Equal but for the arrival time (each process's own clock)."""
    return attrs.evolve(a.request, received_at=0.0) == attrs.evolve(b.request, received_at=0.0) and (
        a.interrupted == b.interrupted
    )


def test_a_queued_message_survives_the_trip() -> None:
    q = Queued(RunRequest("s", None, "c", "o", ["img"], 7, ["a.txt"], Path("/d")), interrupted=True)
    assert same(load(dump(q)), q)
    assert same(load(dump(queued("x"))), queued("x"))
    assert not same(load(dump(queued("x"))), queued("y"))


async def test_insert_only_if_what_admission_saw_still_holds(redis: Client, redis_keys: Keys) -> None:
    leases = Leases(redis, redis_keys, "p1")
    queues = Queues(redis, redis_keys, "p1", leases.lease_ms)
    assert await leases.claim("s", "r1")
    holder = Holder("r1", "p1")
    assert await queues.insert("s", queued("a"), 0, holder=holder, length=0)
    assert await queues.insert("s", queued("c"), 1, holder=holder, length=1)
    assert await queues.insert("s", queued("b", interrupted=True), 0, holder=holder, length=2)
    assert [q.request.content for q in await queues.view("s")] == ["b", "a", "c"]
    assert not await queues.insert("s", queued("late"), 3, holder=holder, length=2)  # the queue moved
    assert not await queues.insert("s", queued("late"), 3, holder=Holder("r0", "p1"), length=3)  # so did the holder
    assert not await queues.insert("s", queued("late"), 0, holder=None, length=3)
    assert len(await queues.view("s")) == 3


async def test_pass_on_hands_the_session_to_the_next_message_or_frees_it(redis: Client, redis_keys: Keys) -> None:
    leases = Leases(redis, redis_keys, "p1")
    other = Leases(redis, redis_keys, "p2")
    queues = Queues(redis, redis_keys, "p1", leases.lease_ms)
    assert await leases.claim("s", "r1")
    await queues.insert("s", queued("next"), 0, holder=Holder("r1", "p1"), length=0)
    assert await Queues(redis, redis_keys, "p2", leases.lease_ms).pass_on("s", "r1", "x") is False  # not p2's
    nxt = await queues.pass_on("s", "r1", "r2")
    assert isinstance(nxt, Queued) and nxt.request.content == "next"
    assert not await other.claim("s", "r9")  # no gap: r2 holds it at once
    assert await leases.holder("s") == Holder("r2", "p1")
    assert await queues.pass_on("s", "r2", "r3") is None
    assert await leases.holder("s") is None
    assert await queues.pass_on("s", "r2", "r3") is False


async def test_racing_inserts_from_two_processes_keep_every_message_once(redis: Client, redis_keys: Keys) -> None:
    """Each process looks, decides (at the back), and retries when the queue moved."""
    leases = Leases(redis, redis_keys, "p1")
    assert await leases.claim("s", "r1")
    holder = Holder("r1", "p1")

    async def send(owner: str, n: int) -> None:
        queues = Queues(redis, redis_keys, owner, leases.lease_ms)
        for i in range(n):
            for _ in range(100):  # bounded retries
                length = len(await queues.view("s"))
                if await queues.insert("s", queued(f"{owner}-{i}"), length, holder=holder, length=length):
                    break
            else:
                raise AssertionError("never got in")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, "p1", 10)
        nursery.start_soon(send, "p2", 10)
    contents = [q.request.content for q in await Queues(redis, redis_keys, "p1", 1000).view("s")]
    assert sorted(contents) == sorted([f"p1-{i}" for i in range(10)] + [f"p2-{i}" for i in range(10)])
    assert [c for c in contents if c.startswith("p1")] == [f"p1-{i}" for i in range(10)]  # each in its order


async def test_forget_drops_the_queue_and_says_what_it_held(redis: Client, redis_keys: Keys) -> None:
    queues = Queues(redis, redis_keys, "p1", 1000)
    await queues.insert("s", queued("a"), 0, holder=None, length=0)
    await queues.insert("s", queued("b"), 1, holder=None, length=1)
    assert [q.request.content for q in await queues.forget("s")] == ["a", "b"]
    assert await queues.view("s") == []

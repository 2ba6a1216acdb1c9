#!/usr/bin/env python3
"""CPU per event of the cluster's run-log path against the in-process fan-out.

What a run costs per event when its log goes through Redis (issue #12): the owner's
mirror (a subscriber of its run whose task appends batches to the run's stream), a
second node that follows the run from the stream into a :class:`RemoteRun` with one
subscriber, and redis-server itself, against the same run with one local subscriber.
Both in one Python process (two nodes with their own Redis connections, as two
processes would have), so the figure is the CPU of this process plus redis-server's,
per event, the two modes interleaved. No WebSocket, no hypercorn: this is the cost the
cluster adds, not a server's whole cost per event (``bench/per_event_cpu.py``).

    python bench/cluster_mirror.py --events 20000 --reps 3

Starts its own redis-server on a loopback port (Debian package ``redis-server``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import trio
import trio.lowlevel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from navi_trio.cluster.broker import RedisBroker  # noqa: E402
from navi_trio.cluster.redis import Keys, connect  # noqa: E402
from navi_trio.lifecycle import How, Run, RunRequest  # noqa: E402
from tests.redis_server import running_redis  # noqa: E402

BURST = 8  # the scripted agent yields every 8 deltas


class CountingOutbox:
    def __init__(self) -> None:
        self.count = 0

    def offer(self, frame: object) -> bool:
        self.count += 1
        return True

    def wake(self) -> None:
        pass

    def fall_behind(self, sub: object) -> None:
        raise AssertionError

    @property
    def behind(self) -> bool:
        return False


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def play(run: Run, events: int) -> None:
    run.start()
    run.play()
    for i in range(events):
        run.emit_text("word ")
        if i % BURST == BURST - 1:
            await trio.lowlevel.checkpoint()
    run.end(How.COMPLETED)


async def local_run(events: int) -> None:
    run = Run(RunRequest("s", None, "x", "x"))
    out = CountingOutbox()
    run.subscribe(out)
    await play(run, events)
    assert out.count == events + 2


async def cluster_run(url: str, prefix: str, events: int, follow: bool = True) -> None:
    keys = Keys(prefix)

    async with connect(url) as ca, connect(url) as cb, trio.open_nursery() as nursery:
        a = RedisBroker(ca, keys, "A", lease_s=10, max_run_events=events + 10)
        b = RedisBroker(cb, keys, "B", lease_s=10, max_run_events=events + 10)
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        run = Run(RunRequest("s", None, "x", "x"))
        local = CountingOutbox()
        run.subscribe(local)
        assert await a.claim("s", run.id)
        await a.own(run)
        out = CountingOutbox()
        if follow:
            remote = await nursery.start(b.watch, "s", run.id)
            remote.subscribe(out)
        await play(run, events)
        await a.finish(run)
        run.settle()
        if follow:
            await remote.done.wait()
            assert out.count == events + 2, out.count
        nursery.cancel_scope.cancel()


def measure(fn: object, redis_pid: int) -> tuple[float, float]:
    """(this process's CPU, redis-server's CPU) in seconds."""
    t0, r0 = time.process_time(), cpu_of(redis_pid)
    trio.run(fn)  # type: ignore[arg-type]
    return time.process_time() - t0, cpu_of(redis_pid) - r0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n = args.events
    with running_redis() as server:
        pid = server.pid
        local, cluster_py, cluster_redis, owner_py, owner_redis = [], [], [], [], []
        for rep in range(args.reps):
            py, rd = measure(functools.partial(local_run, n), pid)
            local.append((py + rd) / n)
            py, rd = measure(functools.partial(cluster_run, server.url, f"bench{rep}", n), pid)
            cluster_py.append(py / n)
            cluster_redis.append(rd / n)
            py, rd = measure(functools.partial(cluster_run, server.url, f"bench-own{rep}", n, False), pid)
            owner_py.append(py / n)
            owner_redis.append(rd / n)
        lo = statistics.median(local)
        cp, cr = statistics.median(cluster_py), statistics.median(cluster_redis)
        op, orr = statistics.median(owner_py), statistics.median(owner_redis)
        print(f"events per run: {n}, reps: {args.reps} (interleaved), medians, us CPU per event:")
        print(f"  in-process fan-out, 1 subscriber:             {lo * 1e6:8.2f}")
        print(
            f"  cluster (owner's mirror + a remote follower): {cp * 1e6:8.2f} navi-trio + {cr * 1e6:.2f} redis-server"
        )
        print(
            f"  cluster, the owner's mirror alone:            {op * 1e6:8.2f} navi-trio + {orr * 1e6:.2f} redis-server"
        )
        print(f"  added by the cluster path:                    {(cp + cr - lo) * 1e6:8.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Client-side CPU of one Redis round trip on Trio: coredis (the cluster's client) against
a bare Trio socket, and the run-log commands one at a time against batched.

Why: in cluster mode at a model's pace (``bench/cluster_cpu.py``) every run's batch is
one event, so the owner makes one append round trip per event per run and each follower
one ``XREAD`` per event per run. This shows what one such round trip costs in the client
and what batching the runs of a process into one round trip would cost instead, with
the cluster's own append script (``navi_trio.cluster.stream``) and ``connect``.

    python bench/redis_round_trips.py            # ~10 s
    python bench/redis_round_trips.py --runs 20 --events 300

Starts its own redis-server on a loopback port (``.ci/setup`` installs it); this process
on CPU 1, redis-server on CPU 0. CPU time is this process's (``time.process_time``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_setup import loadavg, redis

from navi_trio.cluster.redis import Client, connect
from navi_trio.cluster.stream import _APPEND

WIRE = '{"type":"stream_delta","delta":"xxxxxxxxxxxxxxxx"}'


async def cpu_us(n: int, body: Callable[[int], Awaitable[object]]) -> float:
    """Microseconds of this process's CPU per call of ``body`` (called ``n`` times, in turn)."""
    t0 = time.process_time()
    for i in range(n):
        await body(i)
    return (time.process_time() - t0) / n * 1e6


async def bare_socket(port: int, n: int) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:

        async def get(i: int) -> None:
            await stream.send_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
            await stream.receive_some(65536)  # the reply to a GET of a missing key fits one read

        return await cpu_us(n, get)


async def measure(url: str, port: int, runs: int, events: int) -> None:
    print(f"us of client CPU per call (per event: divided by the {runs} runs a batch holds)")
    print(f"  bare Trio socket, GET round trip:          {await bare_socket(port, events * runs):7.0f}")
    c: Client
    async with connect(url) as c:
        await c.set("k", "v")
        print(f"  coredis GET:                               {await cpu_us(events * runs, lambda i: c.get('k')):7.0f}")
        script = c.register_script(_APPEND)
        top = [0] * runs

        async def one_append_each(i: int) -> None:
            for k in range(runs):
                await script(keys=[f"one:{k}"], args=[top[k], 1_000_000, top[k] + 1, "stream_delta", WIRE])
                top[k] += 1

        per = await cpu_us(events, one_append_each) / runs
        print(f"  append script, one call per run per event: {per:7.0f} per event")
        top = [0] * runs

        async def pipelined(i: int) -> None:
            async with c.pipeline(transaction=False) as pipe:
                for k in range(runs):
                    args: list[int | str] = [top[k], 1_000_000, top[k] + 1, "stream_delta", WIRE]
                    pipe.evalsha(script.sha, keys=[f"pipe:{k}"], args=args)
                    top[k] += 1

        per = await cpu_us(events, pipelined) / runs
        print(f"  append script, {runs} runs in one pipeline:    {per:7.0f} per event")

        async def xread_each(i: int) -> None:
            for k in range(runs):
                await c.xread({f"one:{k}": f"0-{i}"}, count=1)

        per = await cpu_us(events, xread_each) / runs
        print(f"  XREAD of one event, one call per run:      {per:7.0f} per event")

        async def xread_all(i: int) -> None:
            await c.xread({f"one:{k}": f"0-{i}" for k in range(runs)}, count=1)

        per = await cpu_us(events, xread_all) / runs
        print(f"  XREAD of one event from {runs} runs at once:   {per:7.0f} per event")
    print(loadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="runs whose events one process writes or follows")
    ap.add_argument("--events", type=int, default=300, help="events per run")
    a = ap.parse_args()
    os.sched_setaffinity(0, {1})
    with redis("0") as server:
        trio.run(measure, server.url, server.port, a.runs, a.events)


if __name__ == "__main__":
    main()

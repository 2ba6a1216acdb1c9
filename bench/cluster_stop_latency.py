#!/usr/bin/env python3
"""Stop latency in a cluster: ``POST /sessions/{id}/stop`` asked of the process that plays
the run, against the same stop asked of another process (issue #12: p99 within 2x).

Two ``navi-trio serve`` processes share a redis-server and a PostgreSQL database (both
started here, from Debian's packages, as the tests start them; or ``--database-url``),
all pinned to CPU 0, this client on CPU 1. Each stop: a run starts a 30 s tool
on process A (client on A), then the stop is posted to A or to B, alternately; timed until
``stream_stopped`` reaches A's client and until the POST is answered (the answer comes
once the run's answer is saved). Loopback only; every loop is bounded.

For the tail, each stop also records the CPU time of the servers (both navi-trio processes
and redis-server) meanwhile, how long they spent runnable but waiting for a CPU (run-queue
wait, ``/proc/<pid>/task/*/schedstat``), and this client's wait. They share CPU 0, so they
wait for each other too, but at most about twice their own CPU time: a slow stop whose
servers waited far longer than they ran was slowed by other work on the machine.

    python bench/cluster_stop_latency.py               # 250 stops each way, ~30 s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import httpx2 as httpx
import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from cluster_setup import loadavg, postgres, redis  # noqa: E402

PIN = ["taskset", "-c", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


async def wait_port(port: int) -> None:
    for _ in range(400):  # bounded wait for the port
        try:
            await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
            return
        except OSError:
            await trio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def sched_s(pids: list[int]) -> tuple[float, float]:
    """Seconds the threads of ``pids`` have run on a CPU, and spent runnable but waiting
    for one (``/proc/<pid>/task/*/schedstat``, first two fields)."""
    ran = waited = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fields = (task / "schedstat").read_text().split()
                ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


class Stop(NamedTuple):
    on_socket: float  # POST sent -> stream_stopped on the run's socket (process A)
    answered: float  # POST sent -> its answer
    servers_ran: float  # CPU time of the servers and redis-server meanwhile
    servers_waited: float  # their run-queue wait meanwhile
    client_waited: float  # this client's run-queue wait meanwhile


async def stop_once(a: httpx.AsyncClient, asked: httpx.AsyncClient, port_a: int, servers: list[int]) -> Stop:
    tool = {"tool": "sleep", "args": {}, "result": "", "delay": 30}
    msg = json.dumps({"type": "message", "content": json.dumps({"script": [tool]})})
    sid = (await a.post("/sessions", json={})).json()["id"]
    answered: list[float] = []
    async with open_websocket_url(f"ws://127.0.0.1:{port_a}/ws/sessions/{sid}") as ws:
        await ws.send_message(msg)
        with trio.fail_after(10):
            while json.loads(await ws.get_message())["type"] != "tool_started":
                pass
            (ran0, waited0), (_, mine0) = sched_s(servers), sched_s([os.getpid()])
            t0 = trio.current_time()

            async def post() -> None:
                r = await asked.post(f"/sessions/{sid}/stop")
                assert r.json()["ok"] is True, r.text
                answered.append(trio.current_time() - t0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(post)
                while (m := json.loads(await ws.get_message()))["type"] != "stream_stopped":
                    if m["type"] == "error":
                        raise RuntimeError(m)
                on_socket = trio.current_time() - t0
            (ran1, waited1), (_, mine1) = sched_s(servers), sched_s([os.getpid()])
    return Stop(on_socket, answered[0], ran1 - ran0, waited1 - waited0, mine1 - mine0)


async def main(args: argparse.Namespace) -> None:
    print(f"{args.repeat} stops each way, alternating; at start: {loadavg()}", flush=True)
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(redis("0"))
        data = stack.enter_context(tempfile.TemporaryDirectory(prefix="navi-cstop-"))
        database_url = args.database_url
        if not database_url:
            database_url = stack.enter_context(stack.enter_context(postgres("0")).database())
        env = {k: v for k, v in os.environ.items() if not k.startswith("NAVI_")}
        env |= {"NAVI_REDIS_URL": redis_server.url, "NAVI_LOG_LEVEL": "warning", "NAVI_DATA_DIR": data}
        env["NAVI_DATABASE_URL"] = database_url
        ports = [free_port(), free_port()]
        navi = str(Path(sys.executable).parent / "navi-trio")
        procs = []
        for port in ports:
            cmd = [*PIN, navi, "serve", "--port", str(port)]
            procs.append(
                await trio.lowlevel.open_process(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        try:
            for port in ports:
                await wait_port(port)
            same: list[Stop] = []
            other: list[Stop] = []
            servers = [p.pid for p in procs] + [redis_server.pid]
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", trust_env=False, timeout=10) as a,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}", trust_env=False, timeout=10) as b,
            ):
                for _ in range(args.repeat):
                    same.append(await stop_once(a, a, ports[0], servers))
                    other.append(await stop_once(a, b, ports[0], servers))
        finally:
            for proc in procs:
                proc.terminate()
            with trio.move_on_after(10, shield=True):
                for proc in procs:
                    await proc.wait()
    p99: dict[str, tuple[float, float]] = {}
    for name, xs in (("same process", same), ("other process", other)):
        sock = [x.on_socket for x in xs]
        ans = [x.answered for x in xs]
        after = [x.answered - x.on_socket for x in xs]  # the answer's wait for the save, and its way back
        p99[name] = (pct(sock, 0.99), pct(ans, 0.99))
        print(
            f"{name:14s} stream_stopped p50 {pct(sock, 0.5) * 1e3:6.2f} ms p90 {pct(sock, 0.9) * 1e3:6.2f}"
            f" p99 {pct(sock, 0.99) * 1e3:6.2f} max {max(sock) * 1e3:6.2f};"
            f" POST answered p50 {pct(ans, 0.5) * 1e3:6.2f} ms p99 {pct(ans, 0.99) * 1e3:6.2f};"
            f" answer after stream_stopped p50 {pct(after, 0.5) * 1e3:5.2f} ms"
            f" (n={len(xs)}, mean {statistics.mean(sock) * 1e3:.2f} ms)"
        )
    print("where the time went, stream_stopped: servers' CPU time / their run-queue wait / the client's, in ms:")
    for name, xs in (("same process", same), ("other process", other)):
        tail = sorted(xs, key=lambda x: x.on_socket)[-max(1, math.ceil(len(xs) / 100)) :]
        mid = sorted(xs, key=lambda x: x.on_socket)[len(xs) // 2]
        print(
            f"  {name:14s} median stop {mid.on_socket * 1e3:.1f} ms ({mid.servers_ran * 1e3:.1f} /"
            f" {mid.servers_waited * 1e3:.1f} / {mid.client_waited * 1e3:.1f}); slowest 1 %: "
            + ", ".join(
                f"{x.on_socket * 1e3:.1f} ms ({x.servers_ran * 1e3:.1f} / {x.servers_waited * 1e3:.1f}"
                f" / {x.client_waited * 1e3:.1f})"
                for x in tail
            )
        )
    (s_sock, s_ans), (o_sock, o_ans) = p99["same process"], p99["other process"]
    print(
        f"p99 other/same: stream_stopped {o_sock / s_sock:.2f}, POST answered {o_ans / s_ans:.2f} (target <= 2)"
        f" | {loadavg()}"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=250, help="stops each way (250: ~30 s)")
    ap.add_argument("--database-url", default="", help="a PostgreSQL database (default: one started here)")
    os.sched_setaffinity(0, {1})  # this client on CPU 1, the servers on CPU 0
    trio.run(main, ap.parse_args())

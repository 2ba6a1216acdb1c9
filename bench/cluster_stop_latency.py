#!/usr/bin/env python3
"""Stop latency in a cluster: ``POST /sessions/{id}/stop`` asked of the process that plays
the run, against the same stop asked of another process (issue #12: p99 within 2x).

Two ``navi-trio serve`` processes share a redis-server and a PostgreSQL database (both
started here, from Debian's packages, as the tests start them; or ``--database-url``),
all pinned to CPU 0, this client on CPU 1. Each stop: a run starts a 30 s tool
on process A (client on A), then the stop is posted to A or to B, alternately; timed until
``stream_stopped`` reaches A's client and until the POST is answered (the answer comes
once the run's answer is saved). Loopback only; every loop is bounded.

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


async def stop_once(a: httpx.AsyncClient, asked: httpx.AsyncClient, port_a: int) -> tuple[float, float]:
    tool = {"tool": "sleep", "args": {}, "result": "", "delay": 30}
    msg = json.dumps({"type": "message", "content": json.dumps({"script": [tool]})})
    sid = (await a.post("/sessions", json={})).json()["id"]
    answered: list[float] = []
    async with open_websocket_url(f"ws://127.0.0.1:{port_a}/ws/sessions/{sid}") as ws:
        await ws.send_message(msg)
        with trio.fail_after(10):
            while json.loads(await ws.get_message())["type"] != "tool_started":
                pass
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
    return on_socket, answered[0]


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
            same: list[tuple[float, float]] = []
            other: list[tuple[float, float]] = []
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", trust_env=False, timeout=10) as a,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}", trust_env=False, timeout=10) as b,
            ):
                for _ in range(args.repeat):
                    same.append(await stop_once(a, a, ports[0]))
                    other.append(await stop_once(a, b, ports[0]))
        finally:
            for proc in procs:
                proc.terminate()
            with trio.move_on_after(10, shield=True):
                for proc in procs:
                    await proc.wait()
    p99: dict[str, tuple[float, float]] = {}
    for name, xs in (("same process", same), ("other process", other)):
        sock = [x[0] for x in xs]
        ans = [x[1] for x in xs]
        after = [x[1] - x[0] for x in xs]  # the answer's wait for the save, and its way back
        p99[name] = (pct(sock, 0.99), pct(ans, 0.99))
        print(
            f"{name:14s} stream_stopped p50 {pct(sock, 0.5) * 1e3:6.2f} ms p90 {pct(sock, 0.9) * 1e3:6.2f}"
            f" p99 {pct(sock, 0.99) * 1e3:6.2f} max {max(sock) * 1e3:6.2f};"
            f" POST answered p50 {pct(ans, 0.5) * 1e3:6.2f} ms p99 {pct(ans, 0.99) * 1e3:6.2f};"
            f" answer after stream_stopped p50 {pct(after, 0.5) * 1e3:5.2f} ms"
            f" (n={len(xs)}, mean {statistics.mean(sock) * 1e3:.2f} ms)"
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

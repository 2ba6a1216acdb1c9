#!/usr/bin/env python3
"""Soak: 1,000 idle connections with heartbeats plus 100 paced sessions, held for 60 s.

Starts ``navi-trio serve`` (SQLite, a short heartbeat) on a free loopback port, then from
one trio client process:

- opens ``--idle`` WebSockets on their own sessions and records when each heartbeat
  arrives; a heartbeat is *late* by (gap since the previous frame) - heartbeat_s;
- runs ``--sessions`` sessions that stream a stamped delta every ``--delay`` seconds, in
  runs of ``--run-deltas`` back to back for ``--seconds``, checking every delta arrives
  and every run ends with stream_end;
- samples the server's RSS every second.

Prints one JSON line: errors, max heartbeat lateness, event latency p50/p99, and RSS at
start, middle and end (flat = no growth beyond noise). Every loop is bounded in count
and time; traffic goes to 127.0.0.1 only.

    python bench/soak.py                      # the full 60 s run
    python bench/soak.py --seconds 10 --idle 200 --sessions 20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

STAMP = re.compile(r"\[t=(\d+\.\d+)\]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


async def main(a: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="navi-soak-"))
    navi = Path(sys.executable).parent / "navi-trio"
    env = {**os.environ, "NAVI_HEARTBEAT_S": str(a.heartbeat), "NAVI_LOG_LEVEL": "warning"}
    cmd = [str(navi), "serve", "--port", str(port), "--data-dir", str(data)]
    proc = await trio.lowlevel.open_process(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    errors: list[str] = []
    late: list[float] = []
    lat: list[float] = []
    rss: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as http:
            for _ in range(100):  # bounded wait for the server
                try:
                    await http.get("/healthz")
                    break
                except httpx.TransportError:
                    await trio.sleep(0.1)

            async def new_session() -> str:
                r = await http.post("/sessions", json={})
                return str(r.json()["id"])

            idle_ids = [await new_session() for _ in range(a.idle)]
            run_ids = [await new_session() for _ in range(a.sessions)]
            end_at = trio.current_time() + a.seconds + 5

            async def idle(sid: str) -> None:
                try:
                    async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/sessions/{sid}") as ws:
                        last = None
                        with trio.move_on_at(end_at):
                            while True:
                                msg = json.loads(await ws.get_message())
                                now = trio.current_time()
                                if msg["type"] == "heartbeat" and last is not None:
                                    late.append(now - last - a.heartbeat)
                                last = now
                except (ConnectionClosed, OSError) as exc:
                    errors.append(f"idle {sid}: {exc!r}")

            async def paced(sid: str) -> None:
                # Runs of --run-deltas deltas back to back until --seconds have passed: a run's
                # log is held until it ends, so flat memory across many runs means no leak.
                content = json.dumps(
                    {"script": [{"text": "x", "repeat": a.run_deltas, "delay": a.delay, "stamp": True}]}
                )
                stop_at = trio.current_time() + a.seconds
                try:
                    async with open_websocket_url(
                        f"ws://127.0.0.1:{port}/ws/sessions/{sid}", max_message_size=2**26
                    ) as ws:
                        await ws.get_message()  # session_sync
                        runs = 0
                        while trio.current_time() < stop_at and runs < 10_000:
                            runs += 1
                            await ws.send_message(json.dumps({"type": "message", "content": content}))
                            got = 0
                            with trio.fail_after(a.run_deltas * a.delay + 30):
                                while True:
                                    msg = json.loads(await ws.get_message())
                                    if msg["type"] == "stream_delta":
                                        t = time.time()
                                        stamps = STAMP.findall(msg["delta"])
                                        got += len(stamps)
                                        lat.extend(t - float(x) for x in stamps)
                                    elif msg["type"] in ("stream_end", "stream_stopped", "error"):
                                        break
                            if msg["type"] != "stream_end" or got != a.run_deltas:
                                errors.append(f"paced {sid}: {msg['type']} after {got}/{a.run_deltas} deltas")
                except (ConnectionClosed, OSError, trio.TooSlowError) as exc:
                    errors.append(f"paced {sid}: {exc!r}")

            async def sample() -> None:
                with trio.move_on_at(end_at):
                    while True:
                        rss.append(rss_mb(proc.pid))
                        await trio.sleep(1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                for sid in idle_ids:
                    nursery.start_soon(idle, sid)
                await trio.sleep(a.heartbeat)  # let the idle connections open and settle
                for sid in run_ids:
                    nursery.start_soon(paced, sid)
    finally:
        proc.terminate()
        with trio.move_on_after(30, shield=True):
            await proc.wait()
    mid = rss[len(rss) // 2] if rss else None
    return {
        "idle": a.idle,
        "sessions": a.sessions,
        "seconds": a.seconds,
        "errors": len(errors),
        "error_samples": errors[:3],
        "heartbeats": len(late),
        "heartbeat_late_max_s": round(max(late), 3) if late else None,
        "event_lat_p50_ms": round(pct(lat, 0.5) * 1000, 3) if lat else None,
        "event_lat_p99_ms": round(pct(lat, 0.99) * 1000, 3) if lat else None,
        "rss_mb_start_mid_end": [
            round(rss[0], 1) if rss else None,
            round(mid, 1) if mid else None,
            round(rss[-1], 1) if rss else None,
        ],
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--delay", type=float, default=0.02)
    p.add_argument("--run-deltas", type=int, default=100, help="deltas per run; runs follow each other")
    p.add_argument("--heartbeat", type=float, default=5.0)
    args = p.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(trio.run(main, args)))

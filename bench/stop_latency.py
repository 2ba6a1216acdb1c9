#!/usr/bin/env python3
"""Scenario 4 with a ``"thread": true`` tool: how long a stop takes when the run is
blocked in a worker thread, next to the seed baseline's stop of its (asyncio) tool.

Issue 6 asks stop latency p99 <= 1.0 x the seed "also with a thread tool". The seed's
scripted agent has no thread tools (it ignores ``"thread"``), so its figure is the stop of
a plain sleeping tool: the best case of the design it replaces. navi-trio is measured
with both tools. Like ``bench/harness/loadgen.py --stop-latency``: a run starts a 30 s
tool, the client waits for ``tool_started``, then times ``POST /sessions/{id}/stop`` until
``stream_stopped`` arrives on the socket. Servers are fresh processes, interleaved, pinned
to CPU 0; this client runs on CPU 1. Medians of ``--reps`` of p50/p99 over ``--repeat``
stops each. Loopback only; every loop is bounded.

    python bench/stop_latency.py --reps 3 --repeat 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx2 as httpx
import trio
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import baseline_python

ROOT = Path(__file__).resolve().parent.parent
#: The benchmark harness: load generator, scenario matrix and the seed's asyncio baseline.
HARNESS = ROOT / "bench" / "harness"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def server_cmd(kind: str, port: int, data: Path) -> tuple[list[str], Path]:
    pin = ["taskset", "-c", "0"]
    if kind == "navi":
        navi = Path(sys.executable).parent / "navi-trio"
        return [*pin, str(navi), "serve", "--port", str(port), "--data-dir", str(data), "--log-level", "warning"], ROOT
    py = baseline_python()  # .venv-bench, as bench/compare.py makes it
    cmd = [*pin, str(py), "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)]
    return [*cmd, "--log-level", "warning"], HARNESS / "seed_baseline"


async def measure(port: int, thread: bool, repeat: int) -> list[float]:
    """Seconds from POST /stop to ``stream_stopped``, one per stop."""
    tool = {"tool": "sleep", "args": {}, "result": "", "delay": 30, "thread": thread}
    msg = json.dumps({"type": "message", "content": json.dumps({"script": [tool]})})
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http:
        for _ in range(repeat):
            sid = (await http.post("/sessions", json={})).json()["id"]
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/sessions/{sid}") as ws:
                await ws.send_message(msg)
                with trio.fail_after(10):
                    while json.loads(await ws.get_message())["type"] != "tool_started":
                        pass
                    t0 = trio.current_time()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(http.post, f"/sessions/{sid}/stop")
                        while (m := json.loads(await ws.get_message()))["type"] != "stream_stopped":
                            if m["type"] == "error":
                                raise RuntimeError(m)
                        lat.append(trio.current_time() - t0)
    return lat


async def one(kind: str, thread: bool, repeat: int) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="navi-stop-") as data:
        cmd, cwd = server_cmd(kind, port, Path(data))
        proc = await trio.lowlevel.open_process(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):  # bounded wait for the port
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
            lat = await measure(port, thread, repeat)
        finally:
            proc.terminate()
            with trio.move_on_after(10, shield=True):
                await proc.wait()
    return {"p50_ms": round(pct(lat, 0.5) * 1000, 3), "p99_ms": round(pct(lat, 0.99) * 1000, 3)}


async def main(a: argparse.Namespace) -> None:
    cases = [("seed baseline", "baseline", False), ("navi-trio", "navi", False), ("navi-trio thread", "navi", True)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in cases}
    for _ in range(a.reps):  # interleaved: one rep of each case, then the next rep
        for name, kind, thread in cases:
            runs[name].append(await one(kind, thread, a.repeat))
    base = statistics.median(r["p99_ms"] for r in runs["seed baseline"])
    for name, _, _ in cases:
        p50 = statistics.median(r["p50_ms"] for r in runs[name])
        p99 = statistics.median(r["p99_ms"] for r in runs[name])
        print(f"{name:18} stop_p50_ms {p50:8.3f}  stop_p99_ms {p99:8.3f}  ratio {p99 / base:.2f}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20, help="stops per rep")
    args: Any = p.parse_args()
    os.sched_setaffinity(0, {1})
    trio.run(main, args)

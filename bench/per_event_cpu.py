#!/usr/bin/env python3
"""Server CPU per streamed event, below saturation: the seed baseline, the stack's floor
(``bench/floor_app.py`` on hypercorn's trio worker) and navi-trio, interleaved.

Why: scenario 6 (200 sessions x 50 deltas/s = 10,000 events/s) saturates one core for all
of them, and a saturated server's event latency measures where its queue sits more than
how fast it is. CPU per event at a load none of them saturates (50 sessions) is the cost
itself. Each figure is the difference of two runs (``--deltas`` 500 and 100, so server
start, session setup and connection costs cancel out) divided by the extra events.

    python bench/per_event_cpu.py --reps 3

Uses ``bench/harness/loadgen.py`` with the baseline's venv (``.venv-bench``, made by
``bench/compare.py``); servers pinned to CPU 0, the load generator to CPU 1. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import baseline_python

ROOT = Path(__file__).resolve().parent.parent
#: The benchmark harness: load generator, scenario matrix and the seed's asyncio baseline.
HARNESS = ROOT / "bench" / "harness"
BENCH_PY = baseline_python()  # .venv-bench, as bench/compare.py makes it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(kind: str, port: int, data: str) -> tuple[list[str], Path]:
    if kind == "baseline":
        cmd = [str(BENCH_PY), "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)]
        return [*cmd, "--log-level", "warning"], HARNESS / "seed_baseline"
    if kind == "floor":
        cmd = [sys.executable, "-m", "hypercorn", "--worker-class", "trio", "--bind", f"127.0.0.1:{port}"]
        return [*cmd, "bench.floor_app:app"], ROOT
    navi = Path(sys.executable).parent / "navi-trio"
    cmd = [str(navi), "serve", "--port", str(port), "--data-dir", data, "--log-level", "warning"]
    return cmd, ROOT


def server_pid(proc: subprocess.Popen[bytes]) -> int:
    """The process that serves: hypercorn's CLI runs its worker as a child."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for child in children:
        if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
            return int(child)
    return proc.pid


def cpu_s(kind: str, sessions: int, deltas: int) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="navi-cpu-") as data:
        cmd, cwd = command(kind, port, data)
        proc = subprocess.Popen(
            ["taskset", "-c", "0", *cmd], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            for _ in range(200):  # bounded wait for the port
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            time.sleep(0.3)  # hypercorn's worker process comes up after the port
            load = [str(BENCH_PY), str(HARNESS / "loadgen.py"), "--base", f"http://127.0.0.1:{port}"]
            load += ["--server-pid", str(server_pid(proc)), "--sessions", str(sessions), "--deltas", str(deltas)]
            load += ["--delay", "0.02", "--stamp"]
            out = subprocess.run(["taskset", "-c", "1", *load], capture_output=True, text=True, timeout=300, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if result.get("errors"):
                raise SystemExit(f"{kind}: load generator errors: {result}")
            return float(result["server_cpu_s"])
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sessions", type=int, default=50)
    a = p.parse_args()
    kinds = ["baseline", "floor", "navi"]
    per_event: dict[str, list[float]] = {k: [] for k in kinds}
    extra = a.sessions * (500 - 100)
    for _ in range(a.reps):
        for kind in kinds:  # interleaved
            per_event[kind].append((cpu_s(kind, a.sessions, 500) - cpu_s(kind, a.sessions, 100)) / extra * 1e6)
    base = statistics.median(per_event["baseline"])
    names = {"baseline": "seed baseline", "floor": "floor_app (hypercorn trio)", "navi": "navi-trio"}
    for kind in kinds:
        us = statistics.median(per_event[kind])
        runs = " ".join(f"{x:.0f}" for x in per_event[kind])
        print(f"{names[kind]:28} cpu_us_per_event {us:6.1f}  ratio {us / base:.2f}  (reps: {runs})", flush=True)


if __name__ == "__main__":
    main()

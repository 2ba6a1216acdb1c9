#!/usr/bin/env python3
"""Server CPU per delivered event in cluster mode against the single-process default,
interleaved in one run (issue #12: the cluster at most 1.3x the single-process figure).

The same workload both ways: ``--sessions`` sessions, each a scripted answer of many
stamped deltas paced 20 ms apart (a model's pace, so no reader falls behind and nothing
is merged), with its sender and one follower of the same session:

- **single**: one ``navi-trio serve`` with its default SQLite store; sender and follower
  both on it;
- **cluster**: two ``navi-trio serve`` processes sharing one redis-server and one
  PostgreSQL database; each session's sender on process A and its follower on process B
  (a load balancer with no sticky sessions), so every event crosses Redis.

Server CPU is utime + stime from ``/proc`` of every navi-trio process plus, in the cluster,
redis-server, summed; PostgreSQL's own CPU (its postmaster and every backend, reaped ones
included) is reported separately, since single-process SQLite runs inside navi-trio's own
process and counts there. Each figure is the difference of a ``--deltas``-delta run and a
``--deltas``/5 run on fresh processes (so server start, session setup and connection costs
cancel out) divided by the difference in events the clients received (sender + follower,
counted by the load generator), like ``bench/per_event_cpu.py``. The two modes alternate
in every rep, the order flipping from rep to rep; each rep prints its figures and the load
average, and the end the median ratio.

    python bench/cluster_cpu.py              # 4 reps, 10 sessions, 500 deltas: ~2.5 minutes
    python bench/cluster_cpu.py --reps 6 --sessions 20

Each rep line also shows the events the long runs delivered (single/cluster), the share
of deltas merged for a reader that fell behind, and how busy CPU 0 was (server CPU over
wall time): a mode near 100 % busy, or merging, is saturated, and its CPU per event is of
another regime (batches grow); lower ``--sessions`` then.

Servers, redis-server and PostgreSQL are pinned to CPU 0, the load generator
(``bench/harness/loadgen.py`` with ``--watch-base``, in ``.venv-bench``) to CPU 1.
Loopback only; every wait is bounded. Needs redis-server and PostgreSQL (``.ci/setup``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_setup import HARNESS, PgServer, Servers, loadavg, postgres, postmaster_pid, redis, tree_cpu_s
from compare import baseline_python

SERVER_CPUS = "0"
LOAD_CPUS = "1"


def load(sender: int, follower: int, sessions: int, deltas: int) -> dict[str, Any]:
    """One load generator run: ``sessions`` senders on ``sender``, a follower each on ``follower``."""
    cmd = [str(baseline_python()), str(HARNESS / "loadgen.py"), "--base", f"http://127.0.0.1:{sender}"]
    cmd += ["--watch-base", f"http://127.0.0.1:{follower}", "--watchers", "1", "--sessions", str(sessions)]
    cmd += ["--deltas", str(deltas), "--delay", "0.02", "--stamp"]
    out = subprocess.run(["taskset", "-c", LOAD_CPUS, *cmd], capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise SystemExit(f"load generator failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result.get("errors") or result.get("watchers_attached") != sessions:
        raise SystemExit(f"load generator errors: {result}")
    return result


def counts(r: dict[str, Any]) -> dict[str, float]:
    """What the clients received: events (every message), delta frames, and the wall time."""
    return {"events": float(r["events"]), "frames": float(r["delta_frames"]), "wall": float(r["wall_s"])}


def one(kind: str, pg: PgServer, sessions: int, deltas: int) -> dict[str, float]:
    """CPU seconds and events of one run on fresh processes: navi-trio, redis, postgres."""
    if kind == "single":
        with Servers("single", SERVER_CPUS) as servers:
            c0 = servers.cpu_s()
            r = load(servers.ports[0], servers.ports[0], sessions, deltas)
            navi = servers.cpu_s() - c0
            return {"navi": navi, "a": navi, "b": 0.0, "redis": 0.0, "pg": 0.0} | counts(r)
    with (
        redis(SERVER_CPUS) as rd,
        pg.database() as url,
        Servers("serve", SERVER_CPUS, count=2, redis_url=rd.url, database_url=url) as servers,
    ):
        pm, (a, b) = postmaster_pid(pg), servers.procs
        a0, b0, r0, p0 = tree_cpu_s(a.pid), tree_cpu_s(b.pid), tree_cpu_s(rd.pid), tree_cpu_s(pm)
        r = load(servers.ports[0], servers.ports[1], sessions, deltas)
        a1, b1 = tree_cpu_s(a.pid) - a0, tree_cpu_s(b.pid) - b0
        return {
            "navi": a1 + b1,
            "a": a1,
            "b": b1,
            "redis": tree_cpu_s(rd.pid) - r0,
            "pg": tree_cpu_s(pm) - p0,
        } | counts(r)


def per_event(kind: str, pg: PgServer, sessions: int, deltas: int) -> dict[str, float]:
    """Microseconds of CPU per event, by part: the long run minus the short one."""
    long = one(kind, pg, sessions, deltas)
    short = one(kind, pg, sessions, deltas // 5)
    extra = long["events"] - short["events"]
    us = {part: (long[part] - short[part]) / extra * 1e6 for part in ("navi", "a", "b", "redis", "pg")}
    # Saturation shows as merging (a reader behind gets deltas merged into fewer frames)
    # and as a server core near 100 % busy: the figures are then of another regime.
    merged = 1 - long["frames"] / (2 * sessions * deltas)
    busy = (long["navi"] + long["redis"] + long["pg"]) / long["wall"]
    return us | {"server": us["navi"] + us["redis"], "events": extra, "merged": merged, "busy": busy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--sessions", type=int, default=10, help="below saturation of one core in both modes")
    p.add_argument("--deltas", type=int, default=500, help="deltas of the long run (the short run has a fifth)")
    a = p.parse_args()
    baseline_python()  # make .venv-bench before the first figure, not inside it
    ratios, ratios_pg = [], []
    figures: dict[str, list[dict[str, float]]] = {"single": [], "cluster": []}
    print(
        f"{a.sessions} sessions x (sender + follower), {a.deltas} vs {a.deltas // 5} deltas at 50/s; us CPU per event"
    )
    with postgres(SERVER_CPUS) as pg:
        for rep in range(a.reps):
            order = ("single", "cluster") if rep % 2 == 0 else ("cluster", "single")
            got = {}
            for kind in order:  # interleaved, the order flipping each rep
                got[kind] = per_event(kind, pg, a.sessions, a.deltas)
                figures[kind].append(got[kind])
            s, c = got["single"], got["cluster"]
            ratios.append(c["server"] / s["server"])
            ratios_pg.append((c["server"] + c["pg"]) / s["server"])
            print(
                f"rep {rep + 1}: single {s['server']:6.1f} | cluster {c['server']:6.1f}"
                f" (navi-trio {c['navi']:6.1f} = sender's {c['a']:.1f} + follower's {c['b']:.1f};"
                f" redis-server {c['redis']:5.1f}), postgres {c['pg']:5.1f}"
                f" | ratio {ratios[-1]:.2f} (with postgres {ratios_pg[-1]:.2f})"
                f" | events {s['events']:.0f}/{c['events']:.0f}, merged {s['merged']:.0%}/{c['merged']:.0%},"
                f" CPU 0 busy {s['busy']:.0%}/{c['busy']:.0%} | {loadavg()}",
                flush=True,
            )
    med = {k: {part: statistics.median(f[part] for f in v) for part in v[0]} for k, v in figures.items()}
    print(
        f"median: single {med['single']['server']:.1f} us/event; cluster {med['cluster']['server']:.1f}"
        f" (navi-trio {med['cluster']['navi']:.1f}: sender's process {med['cluster']['a']:.1f},"
        f" follower's {med['cluster']['b']:.1f}; redis-server {med['cluster']['redis']:.1f}),"
        f" postgres {med['cluster']['pg']:.1f} more"
    )
    print(
        f"median ratio cluster/single {statistics.median(ratios):.2f} (target <= 1.3);"
        f" with postgres {statistics.median(ratios_pg):.2f}; reps: {' '.join(f'{r:.2f}' for r in ratios)} | {loadavg()}"
    )


if __name__ == "__main__":
    main()

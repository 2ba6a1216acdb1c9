#!/usr/bin/env python3
"""Capacity in model-paced sessions with 1 and 2 workers (issue #12): the single-process
default, the cluster with ``hypercorn --workers 1`` and with ``--workers 2``, interleaved
rung by rung, and from them the capacity per core.

The load and the rule are ``bench/harness/capacity.py``'s, imported from it: each rung runs
C sessions streaming 100 stamped deltas 20 ms apart (50 deltas/s, a model's pace) on a
fresh deployment, and is *held* when the lag users see stays at or under ``--lag-ms`` at
p99 with no error; a deployment's capacity is its largest rung held below the first it
fails. The rungs are run here rather than by ``capacity.py``'s own loop because that loop
starts a server by waiting for its port, and hypercorn's workers listen on the shared port
before their app has started, so the first worker up would take every connection of the
rung; here each deployment is started by ``bench/cluster_setup.py``, which waits until
every worker has started. (``capacity.py`` also runs the seed baseline at each rung;
``just bench`` compares with the seed.)

Deployments, each rung on fresh processes, a fresh redis-server and a fresh PostgreSQL
database (one PostgreSQL server for the whole run):

- ``single``: ``navi-trio serve``, SQLite (the default);
- ``workers1``: ``hypercorn --config python:navi_trio.hypercorn_conf --workers 1`` with
  ``NAVI_REDIS_URL`` and ``NAVI_DATABASE_URL``, as ``deploy/cluster-local.sh`` runs it;
- ``workers2``: the same with ``--workers 2``.

CPU accounting: this machine has 2 cores and the load generator needs one of them. Every
server-side process (navi-trio, hypercorn's workers, redis-server, PostgreSQL) is pinned to
CPU 0 and the load generator (``bench/harness/loadgen.py``, ``.venv-bench``) to CPU 1, so
every deployment gets exactly one core, Redis and PostgreSQL included: the sessions held
are the *measured capacity per core*. ``workers2`` on one core measures what splitting one
core's work over two processes costs; it cannot show two cores' worth. With ``--spread``
a fourth deployment, ``workers2-spread``, runs unpinned: both workers, Redis, PostgreSQL
*and the load generator* share both cores, so it is a lower bound of what two cores give,
not a measurement of it. Capacity on N cores is then an extrapolation, printed as such.

    python bench/cluster_capacity.py                       # ~3 minutes
    python bench/cluster_capacity.py --rungs 10 20 40 80 --spread

For each rung it prints lag p99, the time to the first delta (p99: part of the lag, the
run's start) and the event latency p99, the server's CPU use (server CPU time
over the rung's wall time: near 100 % is a saturated core), the load generator's, and for
two workers the connections each took. Loopback only; every wait is bounded. Needs
redis-server and PostgreSQL (``.ci/setup``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent / "harness"))  # after bench/: its compare.py wins
from capacity import held, rung_args  # type: ignore[import-not-found]
from cluster_setup import HARNESS, PgServer, Servers, loadavg, postgres, postmaster_pid, redis, tree_cpu_s
from compare import baseline_python
from run_bench import raise_nofile  # type: ignore[import-not-found]

KINDS = {
    "single": ("single", 1),
    "workers1": ("hypercorn", 1),
    "workers2": ("hypercorn", 2),
    "workers2-spread": ("hypercorn", 2),
}


def sockets(pid: int) -> int:
    """Open sockets of ``pid`` (its connections, listening socket and service clients)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return 0
    n = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


@contextlib.contextmanager
def deployment(name: str, pg: PgServer) -> Iterator[tuple[Servers, list[tuple[str, int]]]]:
    """The deployment ``name`` on fresh processes; with the (part, pid) to read CPU of."""
    kind, count = KINDS[name]
    cpus = "0-1" if name.endswith("-spread") else "0"
    if kind == "single":
        with Servers("single", cpus) as servers:
            yield servers, [("navi", p.pid) for p in servers.procs]
        return
    with (
        redis(cpus) as rd,
        pg.database() as url,
        Servers(kind, cpus, count=count, redis_url=rd.url, database_url=url) as servers,
    ):
        yield servers, [("navi", servers.procs[0].pid), ("redis", rd.pid), ("pg", postmaster_pid(pg))]


def rung(name: str, pg: PgServer, sessions: int) -> dict[str, Any]:
    """One rung of ``sessions`` on a fresh deployment ``name``: the load generator's result,
    plus the server's CPU by part and, per worker, the most connections it held at once."""
    with deployment(name, pg) as (servers, parts):
        workers = servers.worker_pids()
        idle = {w: sockets(w) for w in workers}
        peak = dict(idle)
        cpu0 = {part: tree_cpu_s(pid) for part, pid in parts}
        cmd = [str(baseline_python()), str(HARNESS / "loadgen.py"), "--base", f"http://127.0.0.1:{servers.ports[0]}"]
        cmd += rung_args(sessions)
        if not name.endswith("-spread"):
            cmd = ["taskset", "-c", "1", *cmd]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=raise_nofile)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # bounded: the loadgen's own bound is 300 s
            for w in workers:
                peak[w] = max(peak[w], sockets(w))
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=30)
        cpu = {part: tree_cpu_s(pid) - cpu0[part] for part, pid in parts}
    if proc.returncode:
        return {"errors": 1, "error_samples": [err[-500:]], "cpu": cpu, "conns": []}
    r: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return r | {"cpu": cpu, "conns": [peak[w] - idle[w] for w in workers]}


def line(name: str, sessions: int, r: dict[str, Any], ok: bool) -> str:
    wall = r.get("wall_s") or 0.0
    cpu = r["cpu"]
    parts = " + ".join(f"{k} {v / wall:.0%}" for k, v in cpu.items()) if wall else "-"
    busy = f"{sum(cpu.values()) / wall:.0%} ({parts})" if wall else "-"
    client = f"{r['client_cpu_s'] / wall:.0%}" if wall and "client_cpu_s" in r else "-"
    conns = f" connections per worker {'/'.join(map(str, r['conns']))}" if len(r["conns"]) > 1 else ""
    return (
        f"rung {sessions:4d} {name:15s} lag_p99_ms {r.get('lag_p99_ms')} ttfd_p99_ms {r.get('ttfd_p99_ms')}"
        f" event_lat_p99_ms {r.get('event_lat_p99_ms')}"
        f" errors {r.get('errors', 0)} server CPU {busy} loadgen CPU {client}{conns}"
        f" {'held' if ok else 'FAILED'} | {loadavg()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rungs", type=int, nargs="+", default=[10, 20, 30, 40, 60, 80, 100, 120, 150])
    p.add_argument("--lag-ms", type=float, default=100.0, help="p99 lag a rung may show and still be held")
    p.add_argument("--spread", action="store_true", help="also workers2 unpinned, sharing both cores with the loadgen")
    a = p.parse_args()
    baseline_python()  # make .venv-bench before the first rung
    names = ["single", "workers1", "workers2"] + (["workers2-spread"] if a.spread else [])
    cap = dict.fromkeys(names, 0)
    at_cap: dict[str, dict[str, Any]] = {}
    failed: set[str] = set()
    with postgres("0") as pg:
        for c in a.rungs:
            for name in names:  # interleaved: every deployment at this rung before the next rung
                if name in failed:
                    continue
                r = rung(name, pg, c)
                ok = held(r, a.lag_ms)
                print(line(name, c, r, ok), flush=True)
                if ok:
                    cap[name], at_cap[name] = c, r
                else:
                    failed.add(name)
            if failed == set(names):
                break
    print(
        "capacity (sessions held, p99 lag <= {:.0f} ms; '>=': it held the top rung): {}".format(
            a.lag_ms, ", ".join(f"{n} {'' if n in failed else '>='}{cap[n]}" for n in names)
        )
    )
    print("measured, server side pinned to one core (CPU 0), load generator on CPU 1:")
    for name in ("single", "workers1", "workers2"):
        print(f"  {name:9s} {cap[name]:4d} sessions per core ({cap[name] * 50} deltas/s)")
    for name in ("workers1", "workers2"):
        if name in at_cap:
            r = at_cap[name]
            per = {k: v / (r["events"] or 1) * 1e6 for k, v in r["cpu"].items()}
            print(
                f"  {name} at {cap[name]} sessions, us CPU per event: "
                + ", ".join(f"{k} {v:.0f}" for k, v in per.items())
            )
    if a.spread:
        print(f"  workers2-spread {cap['workers2-spread']:4d} sessions on 2 cores shared with the load generator")
    one = cap["workers1"]
    bound = ""
    if "workers1" in at_cap and at_cap["workers1"]["cpu"].get("redis"):
        r = at_cap["workers1"]
        redis_us = r["cpu"]["redis"] / r["events"] * 1e6
        most = 1e6 / redis_us / 50
        bound = f", up to ~{most:.0f} sessions, where redis-server ({redis_us:.0f} us per event) fills its core"
    print(
        f"extrapolated, not measured: N cores with a worker each hold ~N x {one} sessions (the measured per-core"
        f" figure, Redis and PostgreSQL counted in it){bound}; one process holds {cap['single']} however many cores."
    )


if __name__ == "__main__":
    main()

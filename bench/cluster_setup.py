"""What the cluster benchmarks share: the real services (a PostgreSQL cluster, redis-servers)
pinned to a CPU, navi-trio servers in either mode, and CPU time read from ``/proc``.

Why a module: ``bench/cluster_cpu.py`` and ``bench/cluster_capacity.py`` start the same
two deployments (the single-process default on SQLite, and the cluster on Redis and
PostgreSQL) and must start them the same way for their figures to compare.

PostgreSQL and redis-server come from Debian's packages (``.ci/setup`` installs them),
started by the test suite's helpers (``tests/pg.py``, ``tests/redis_server.py``): loopback
ports, temporary directories, no persistence worth the name. Plain blocking code: these
scripts orchestrate processes, they serve nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.pg import PgServer as PgServer  # noqa: E402  (re-exported for the scripts)
from tests.pg import running_postgres  # noqa: E402
from tests.redis_server import RedisServer, running_redis  # noqa: E402

#: The benchmark harness: load generator, capacity ladder and the seed's asyncio baseline.
HARNESS = ROOT / "bench" / "harness"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NAVI = Path(sys.executable).parent / "navi-trio"
HYPERCORN = Path(sys.executable).parent / "hypercorn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    """Until something accepts on ``port`` (bounded by ``timeout``); fails fast if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def pin(pid: int, cpus: str) -> None:
    """Pin every thread of ``pid`` to ``cpus``; its future children inherit it."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, stdout=subprocess.DEVNULL)


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and all its descendants, the ones it has reaped
    (its cutime/cstime) and the live ones (read recursively). PostgreSQL's backends come and
    go, hypercorn's workers are children of its master: both are counted."""
    try:
        f, kids = _stat(pid), children(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0  # gone meanwhile: its parent's cutime has it
    own = sum(int(x) for x in f[11:15]) / CLK_TCK  # utime stime cutime cstime
    return own + sum(tree_cpu_s(c) for c in kids)


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


@contextlib.contextmanager
def postgres(cpus: str) -> Iterator[PgServer]:
    """A throw-away PostgreSQL cluster (``tests/pg.py``), its postmaster pinned to ``cpus``."""
    with running_postgres() as pg:
        pin(postmaster_pid(pg), cpus)
        yield pg


def postmaster_pid(pg: PgServer) -> int:
    return int((pg.data / "postmaster.pid").read_text().split()[0])


@contextlib.contextmanager
def redis(cpus: str) -> Iterator[RedisServer]:
    """A fresh redis-server (no persistence), pinned to ``cpus``."""
    with running_redis() as server:
        pin(server.pid, cpus)
        yield server


class Servers:
    """The navi-trio processes of one deployment, started pinned to ``cpus``; their ports.

    ``kind`` is ``"single"`` (one ``navi-trio serve``, SQLite in a fresh data directory),
    ``"serve"`` (``count`` ``navi-trio serve`` processes, each on its own port, sharing
    ``redis_url`` and ``database_url``) or ``"hypercorn"`` (``hypercorn --workers count``
    with ``navi_trio.hypercorn_conf``, one port, as ``deploy/cluster-local.sh`` runs it).
    """

    def __init__(self, kind: str, cpus: str, count: int = 1, redis_url: str = "", database_url: str = "") -> None:
        self.kind, self.cpus, self.count = kind, cpus, count
        self.redis_url, self.database_url = redis_url, database_url
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self._data = tempfile.TemporaryDirectory(prefix="navi-bench-")

    def env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NAVI_", "PROMETHEUS_"))}
        env |= {"NAVI_LOG_LEVEL": "warning", "NAVI_DATA_DIR": self._data.name, "NAVI_PORT": str(port)}
        if self.kind != "single":
            env |= {"NAVI_REDIS_URL": self.redis_url, "NAVI_DATABASE_URL": self.database_url}
        return env

    def commands(self) -> list[tuple[int, list[str]]]:
        if self.kind == "single":
            port = free_port()
            return [(port, [str(NAVI), "serve", "--port", str(port)])]
        if self.kind == "serve":
            return [(p, [str(NAVI), "serve", "--port", str(p)]) for p in (free_port() for _ in range(self.count))]
        port = free_port()
        cmd = [str(HYPERCORN), "--config", "python:navi_trio.hypercorn_conf", "--workers", str(self.count)]
        return [(port, [*cmd, "navi_trio.asgi:app"])]

    def __enter__(self) -> Servers:
        try:
            for i, (port, cmd) in enumerate(self.commands()):
                log = Path(self._data.name) / f"server-{i}.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        ["taskset", "-c", self.cpus, *cmd],
                        cwd=ROOT,
                        env=self.env(port),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                self.procs.append(proc)
                self.ports.append(port)
                self.logs.append(log)
            for port, proc in zip(self.ports, self.procs, strict=True):
                wait_port(port, proc)
            if self.kind == "hypercorn":
                self._wait_workers()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_workers(self) -> None:
        """hypercorn's workers listen on the shared socket before their app has started, so
        the port accepts before they serve, and the first worker up would take every early
        connection: wait until each has logged "Running on" (after its app's startup)."""
        deadline = time.monotonic() + 60
        while (text := self.logs[0].read_text(errors="replace")).count("Running on") < self.count:
            if self.procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hypercorn's {self.count} workers did not all start: {text[-2000:]}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The processes that serve: each ``navi-trio serve``, or each hypercorn worker (not
        the resource tracker multiprocessing also starts)."""
        if self.kind != "hypercorn":
            return [p.pid for p in self.procs]
        kids = children(self.procs[0].pid)
        return [c for c in kids if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    def cpu_s(self) -> float:
        return sum(tree_cpu_s(p.pid) for p in self.procs)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._data.cleanup()

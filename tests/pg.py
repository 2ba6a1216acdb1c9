"""A real PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` in a temporary
directory, listening on a free loopback port, password authentication (scram) as in a
real deployment, so the tests see URLs that carry a password.

PostgreSQL missing is a failure, never a skip: ``.ci/setup`` installs it (the Debian
package ``postgresql``, listed in ``.ci/apt/postgres.txt``). As root, ``initdb`` refuses
to run, so the server runs as the ``postgres`` user that package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from navi_trio.store import MemoryStore, SqliteStore, Store
from navi_trio.store.postgres import PostgresStore

USER = "navi"
PASSWORD = "pw-n0t-in-l0gs"
#: Fast and throw-away: nothing here must survive a power cut.
SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    " -c max_connections=200 -c shared_buffers=32MB"
)


def bin_dir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl`` (newest version first)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError(
        "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH):"
        " run .ci/setup, which installs the Debian package postgresql"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgServer:
    """One PostgreSQL cluster; ``stop()`` and ``start()`` again for outage tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.bin = bin_dir()
        self.port = free_port()
        self.log = root / "server.log"
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root, and there is no postgres user to run PostgreSQL as") from None
            self._as_owner = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        cmd = [*self._as_owner, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "LC_ALL": "C"})
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr}{done.stdout}\n{log}")

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_owner:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()

    def start(self) -> None:
        self._run(
            str(self.bin / "pg_ctl"),
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.root} {SERVER_OPTIONS}",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")

    def url(self, dbname: str = "postgres", password: str = PASSWORD, schema: str = "") -> str:
        query = f"?options=-csearch_path%3D{schema}" if schema else ""
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{dbname}{query}"

    def _admin(self, sql: str) -> None:
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)  # type: ignore[arg-type]  # names made here, not input

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """An empty database for one test; its URL. A schema of its own in the database
        ``postgres`` (the URL sets ``search_path``): as empty as a new database, in a
        millisecond instead of a third of a second. Dropped afterwards."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE SCHEMA {name}")
        try:
            yield self.url(schema=name)
        finally:
            self._admin(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@contextlib.contextmanager
def running_postgres() -> Iterator[PgServer]:
    """A fresh cluster, started; stopped and removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="navi-pg-"))
    try:
        server = PgServer(root)
        server.init()
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(RuntimeError):
                server.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def store_target(request: pytest.FixtureRequest) -> str:
    """For a store fixture parametrized over ``"sqlite"``, ``"postgres"`` and ``"memory"``:
    the kind, or for PostgreSQL the URL of a new database (from the ``database_url``
    fixture, so the server starts only if some test asks for it)."""
    kind: str = request.param
    if kind == "postgres":
        url: str = request.getfixturevalue("database_url")
        return url
    return kind


@contextlib.asynccontextmanager
async def opened_store(target: str, tmp_path: Path) -> AsyncIterator[Store]:
    """The store ``target`` names (see :func:`store_target`), open for the block."""
    store: Store
    if target == "memory":
        store = MemoryStore()
    elif target == "sqlite":
        store = await SqliteStore.open(tmp_path / "data" / "navi.sqlite3")
    else:
        store = await PostgresStore.open(target)
    try:
        yield store
    finally:
        store.close()


def server_settings(target: str, data_dir: Path) -> dict[str, Any]:
    """``open_server`` settings for the store ``target`` names (see :func:`store_target`):
    its SQLite file is the one :func:`opened_store` opens for the same ``data_dir``'s parent."""
    if target in ("sqlite", "memory"):
        return {"store": target, "data_dir": data_dir}
    return {"store": "sqlite", "data_dir": data_dir, "database_url": target}

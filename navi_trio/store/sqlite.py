"""SQLite store: one connection, driven from worker threads, one call at a time.

Why threads: sqlite3 blocks, and no blocking call may run on the event loop. Calls go
through ``trio.to_thread.run_sync`` with a ``CapacityLimiter(1)`` (one connection,
strictly serialized; ``check_same_thread=False`` because trio may pick any worker
thread). ``abandon_on_cancel=True``: a caller's time bound (the shielded
``move_on_after`` of a run's cleanup) is honoured even if SQLite is stuck on a lock; the
abandoned call still holds the limiter until it finishes, so nothing overlaps.
``busy_timeout`` bounds how long SQLite itself waits on a lock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from ..errors import StoreError
from .base import NewRun, UploadsInDataDir
from .dbapi import DbApiStore, Dialect, begin

T = TypeVar("T")

#: sqlite3's ``?``, its own transactions, and its one error class for every constraint.
DIALECT = Dialect(
    placeholder="?",
    transaction=begin,
    is_foreign_key_violation=lambda exc: isinstance(exc, sqlite3.IntegrityError) and "FOREIGN KEY" in str(exc),
    is_unique_violation=lambda exc: isinstance(exc, sqlite3.IntegrityError),
)

#: Schema migrations, in order. ``PRAGMA user_version`` records how many have run; each
#: runs in its own transaction at start. Append, never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS sessions (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            user_id TEXT,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS messages (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            ord INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            thinking TEXT,
            tool_calls TEXT,
            status TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, ord)",
        "CREATE INDEX IF NOT EXISTS messages_running ON messages(status) WHERE status = 'running'",
    ),
    (
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        )""",
        """CREATE TABLE tokens (
            hash TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX sessions_by_user ON sessions(user_id)",
    ),
    (
        "ALTER TABLE sessions ADD COLUMN summary TEXT",
        "ALTER TABLE sessions ADD COLUMN summary_through INTEGER NOT NULL DEFAULT 0",
    ),
)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; return the version it is now at.

    Each step reads the version and applies the next migration inside one ``BEGIN
    IMMEDIATE`` transaction, so two processes starting on one new file cannot both apply it.
    """
    while True:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > len(MIGRATIONS):
                raise StoreError(f"the database is at schema version {version}, newer than this navi-trio knows")
            if version == len(MIGRATIONS):
                return int(version)
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")


class SqliteStore(DbApiStore, UploadsInDataDir):
    """One connection, one server process: the run registry is per process too (one run
    per session can only be guaranteed there), so the database has a single owner and
    session records can be cached in memory, saving a thread round-trip on every
    request and WebSocket connect (a stop reaches its run sooner)."""

    dialect = DIALECT

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        super().__init__()
        self._conn = conn
        self._path = path
        self._limiter = trio.CapacityLimiter(1)
        #: Worker threads using the connection now (a cancelled call's thread is
        #: abandoned, not stopped), and whether close() was asked meanwhile: the
        #: connection is closed by whoever is last, never under a running query (sqlite3
        #: closed under another thread's statement crashes the process).
        self._lock = threading.Lock()
        self._busy = 0
        self._closing = False

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (creating) the database at ``path``. Raises :class:`StoreError`."""

        def _open() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 2000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            try:
                migrate(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await trio.to_thread.run_sync(_open)
        except (sqlite3.Error, OSError, StoreError) as exc:
            read_only = path.parent.is_dir() and not os.access(path.parent, os.W_OK)
            hint = f" ({path.parent} is read-only)" if read_only else ""
            raise StoreError(f"cannot open database {path}: {exc}{hint}") from exc
        return cls(conn, path)

    async def _call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        def work() -> T:
            with self._lock:
                if self._closing:
                    raise sqlite3.ProgrammingError("the store is closed")
                self._busy += 1
            try:
                return fn(self._conn)
            except sqlite3.Error:
                if self._conn.in_transaction:
                    self._conn.rollback()
                raise
            finally:
                if self._leave():
                    self._conn.close()

        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"database error while {what}: {exc}") from exc

    async def _insert_runs(self, new_runs: list[NewRun]) -> None:
        def q(c: sqlite3.Connection) -> None:
            with begin(c):
                for new_run in new_runs:
                    (ord_,) = c.execute(
                        "SELECT COALESCE(MAX(ord), 0) FROM messages WHERE session_id = ?", (new_run.session_id,)
                    ).fetchone()
                    c.execute(
                        "INSERT INTO messages (id, session_id, ord, role, content, status, created_at)"
                        " VALUES (?, ?, ?, 'user', ?, 'complete', ?)",
                        (
                            new_run.user_message_id,
                            new_run.session_id,
                            ord_ + 1,
                            new_run.user_content,
                            new_run.created_at,
                        ),
                    )
                    c.execute(
                        "INSERT INTO messages"
                        " (id, session_id, ord, role, content, thinking, tool_calls, status, created_at)"
                        " VALUES (?, ?, ?, 'assistant', '', '', '[]', 'running', ?)",
                        (new_run.answer_id, new_run.session_id, ord_ + 2, new_run.created_at),
                    )

        await self._call("saving the user's message", q)

    async def health(self) -> str | None:
        await trio.lowlevel.checkpoint()
        return None

    def _leave(self) -> bool:
        """A worker thread is done with the connection: whether it must close it."""
        with self._lock:
            self._busy -= 1
            return self._closing and self._busy == 0

    def close(self) -> None:
        """Close the connection, now or, if an abandoned worker thread is still running a
        query on it, as that thread finishes. Synchronous and quick: safe in a cancelled
        ``finally``."""
        with self._lock:
            self._closing = True
            idle = self._busy == 0
        if idle:
            self._conn.close()

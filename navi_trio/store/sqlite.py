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

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from ..errors import SessionGone, StoreError
from .base import Answer, MessageRecord, NewRun, SessionRecord, UploadsInDataDir, User, digests_equal, utc_now
from .cache import SessionCache

T = TypeVar("T")

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


class SqliteStore(UploadsInDataDir):
    """One connection, one server process: the run registry is per process too (one run
    per session can only be guaranteed there), so the database has a single owner and
    session records can be cached in memory, saving a thread round-trip on every
    request and WebSocket connect (a stop reaches its run sooner)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path
        self._limiter = trio.CapacityLimiter(1)
        self._sessions = SessionCache()

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
            try:
                return fn(self._conn)
            except sqlite3.Error:
                if self._conn.in_transaction:
                    self._conn.rollback()
                raise

        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"database error while {what}: {exc}") from exc

    async def create_session(self, session_id: str, title: str, user_id: str | None) -> SessionRecord:
        rec = SessionRecord(session_id, title, user_id, utc_now())

        def q(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO sessions (id, title, user_id, created_at) VALUES (?, ?, ?, ?)",
                (rec.id, rec.title, rec.user_id, rec.created_at),
            )

        await self._call("creating a session", q)
        self._sessions.remember(rec)
        return rec

    def cached_session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.get(session_id)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        cached = self.cached_session(session_id)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached

        def q(c: sqlite3.Connection) -> SessionRecord | None:
            row = c.execute(
                "SELECT id, title, user_id, created_at FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            return SessionRecord(*row) if row else None

        rec = await self._call("reading a session", q)
        if rec is not None:
            self._sessions.remember(rec)
        return rec

    async def list_sessions(self, user_id: str | None, *, everyone: bool = False) -> list[SessionRecord]:
        def q(c: sqlite3.Connection) -> list[SessionRecord]:
            if everyone:
                rows = c.execute("SELECT id, title, user_id, created_at FROM sessions ORDER BY created_at, id")
            elif user_id is None:
                rows = c.execute(
                    "SELECT id, title, user_id, created_at FROM sessions WHERE user_id IS NULL ORDER BY created_at, id"
                )
            else:
                rows = c.execute(
                    "SELECT id, title, user_id, created_at FROM sessions WHERE user_id = ? ORDER BY created_at, id",
                    (user_id,),
                )
            return [SessionRecord(*r) for r in rows.fetchall()]

        return await self._call("listing sessions", q)

    async def delete_session(self, session_id: str) -> bool:
        self._sessions.forget(session_id)

        def q(c: sqlite3.Connection) -> bool:
            with c:
                c.execute("BEGIN")
                c.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
                cur = c.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            return cur.rowcount > 0

        return await self._call("deleting a session", q)

    async def list_messages(self, session_id: str) -> list[MessageRecord]:
        def q(c: sqlite3.Connection) -> list[MessageRecord]:
            rows = c.execute(
                "SELECT id, role, content, created_at, status, thinking, tool_calls FROM messages"
                " WHERE session_id = ? AND status != 'running' ORDER BY ord",
                (session_id,),
            ).fetchall()
            return [MessageRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None) for r in rows]

        return await self._call("listing messages", q)

    async def begin_run(self, new_run: NewRun) -> None:
        await self.begin_runs([new_run])

    async def begin_runs(self, new_runs: list[NewRun]) -> None:
        def q(c: sqlite3.Connection) -> None:
            with c:
                c.execute("BEGIN")
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

        try:
            await self._call("saving the user's message", q)
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError) and "FOREIGN KEY" in str(exc.__cause__):
                raise SessionGone("the session was deleted before saving the user's message") from None
            raise

    async def save_answer(self, answer: Answer) -> None:
        tool_calls = json.dumps(answer.tool_calls)

        def q(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE messages SET content = ?, thinking = ?, tool_calls = ?, status = ? WHERE id = ?",
                (answer.content, answer.thinking, tool_calls, answer.status, answer.id),
            )

        await self._call("saving the answer", q)

    async def checkpoint(self, answers: list[Answer]) -> None:
        rows = [(a.content, a.thinking, json.dumps(a.tool_calls), a.id) for a in answers]

        def q(c: sqlite3.Connection) -> None:
            with c:
                c.execute("BEGIN")
                # Only answers still running: a checkpoint queued behind a run's final save
                # must not turn it back into "running".
                c.executemany(
                    "UPDATE messages SET content = ?, thinking = ?, tool_calls = ? WHERE id = ? AND status = 'running'",
                    rows,
                )

        await self._call("saving answers in progress", q)

    async def recover_interrupted(self) -> int:
        def q(c: sqlite3.Connection) -> int:
            cur = c.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'running'")
            return cur.rowcount

        return await self._call("marking interrupted answers", q)

    async def load_context(self, session_id: str) -> tuple[str | None, list[dict[str, Any]]]:
        def q(c: sqlite3.Connection) -> tuple[str | None, list[dict[str, Any]]]:
            row = c.execute("SELECT summary, summary_through FROM sessions WHERE id = ?", (session_id,)).fetchone()
            summary, through = (row[0], row[1]) if row else (None, 0)
            rows = c.execute(
                "SELECT id, role, content FROM messages WHERE session_id = ? AND ord > ? AND status != 'running'"
                " ORDER BY ord",
                (session_id, through),
            ).fetchall()
            return summary, [{"id": r[0], "role": r[1], "content": r[2]} for r in rows]

        return await self._call("loading the conversation", q)

    async def save_summary(self, session_id: str, summary: str, through_message_id: str) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE sessions SET summary = ?, summary_through ="
                " (SELECT ord FROM messages WHERE id = ?) WHERE id = ?",
                (summary, through_message_id, session_id),
            )

        await self._call("saving the conversation summary", q)

    async def add_user(self, user: User, token_hash: str) -> None:
        def q(c: sqlite3.Connection) -> None:
            with c:
                c.execute("BEGIN")
                c.execute(
                    "INSERT INTO users (id, name, role, created_at) VALUES (?, ?, ?, ?)",
                    (user.id, user.name, user.role, user.created_at),
                )
                c.execute(
                    "INSERT INTO tokens (hash, user_id, created_at) VALUES (?, ?, ?)",
                    (token_hash, user.id, user.created_at),
                )

        try:
            await self._call("adding a user", q)
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise StoreError(f"a user named {user.name!r} exists already") from None
            raise

    async def list_users(self) -> list[User]:
        def q(c: sqlite3.Connection) -> list[User]:
            rows = c.execute("SELECT id, name, role, created_at, revoked_at FROM users ORDER BY created_at, name")
            return [User(r[0], r[1], r[2], r[3], r[4] is not None) for r in rows.fetchall()]

        return await self._call("listing users", q)

    async def revoke_user(self, name: str, revoked_at: str) -> User | None:
        def q(c: sqlite3.Connection) -> User | None:
            with c:
                c.execute("BEGIN")
                c.execute("UPDATE users SET revoked_at = COALESCE(revoked_at, ?) WHERE name = ?", (revoked_at, name))
                row = c.execute("SELECT id, name, role, created_at FROM users WHERE name = ?", (name,)).fetchone()
            return User(row[0], row[1], row[2], row[3], True) if row else None

        return await self._call("revoking a user", q)

    async def user_for_token_hash(self, token_hash: str) -> User | None:
        def q(c: sqlite3.Connection) -> User | None:
            row = c.execute(
                "SELECT u.id, u.name, u.role, u.created_at, u.revoked_at, t.hash FROM tokens t"
                " JOIN users u ON u.id = t.user_id WHERE t.hash = ?",
                (token_hash,),
            ).fetchone()
            if row is None or not digests_equal(row[5], token_hash):
                return None
            return User(row[0], row[1], row[2], row[3], row[4] is not None)

        return await self._call("checking a token", q)

    async def revoked_user_ids(self) -> set[str]:
        def q(c: sqlite3.Connection) -> set[str]:
            return {r[0] for r in c.execute("SELECT id FROM users WHERE revoked_at IS NOT NULL").fetchall()}

        return await self._call("reading revoked users", q)

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def health(self) -> str | None:
        await trio.lowlevel.checkpoint()
        return None

    def close(self) -> None:
        """Close the connection. Synchronous and quick: safe in a cancelled ``finally``."""
        self._conn.close()

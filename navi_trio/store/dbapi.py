"""The query code the database stores share: a store over a DB-API connection (sqlite3's,
psycopg's), with a small :class:`Dialect` for how the two differ in what is written
(placeholders, transactions, which errors mean a broken constraint).

Each store keeps its own connection handling in ``_call`` (SQLite: one connection, one
call at a time; PostgreSQL: a pool, its faults named) and what only it does (how a
message gets its place in the session, PostgreSQL's uploads and health checks). Shared
queries are written with ``?`` placeholders; :meth:`Dialect.sql` gives the driver's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Self, TypeVar

import attrs
import trio

from ..errors import SessionGone, StoreError
from .base import Answer, MessageRecord, NewRun, SessionRecord, User, digests_equal, utc_now
from .cache import SessionCache

T = TypeVar("T")
#: A DB-API connection: ``execute(sql, params)`` returns a cursor with ``fetchone``,
#: ``fetchall`` and ``rowcount``, and ``cursor()`` one with ``executemany``.
Conn = Any


@attrs.frozen
class Dialect:
    """What the shared queries need to know of a database and its driver."""

    #: The driver's placeholder (``?`` for sqlite3, ``%s`` for psycopg).
    placeholder: str
    #: A transaction on a connection in autocommit mode: committed at the end of the
    #: block, rolled back if it raises.
    transaction: Callable[[Conn], AbstractContextManager[Any]]
    #: Whether a driver error is a foreign key (a deleted session) or uniqueness violation.
    is_foreign_key_violation: Callable[[BaseException], bool]
    is_unique_violation: Callable[[BaseException], bool]
    #: Rewritten queries, by their ``?`` text.
    _cache: dict[str, str] = attrs.field(factory=dict, init=False, eq=False)

    def sql(self, text: str) -> Any:
        """``text`` with the driver's placeholders (typed ``Any``: psycopg wants a literal)."""
        if self.placeholder == "?":
            return text
        found = self._cache.get(text)
        if found is None:
            found = self._cache[text] = text.replace("?", self.placeholder)
        return found


@contextlib.contextmanager
def begin(conn: Conn) -> Iterator[None]:
    """sqlite3's transaction in autocommit mode (``isolation_level=None``)."""
    with conn:
        conn.execute("BEGIN")
        yield


class DbApiStore:
    """The store interface's queries, over ``_call`` (the subclass runs a function on a
    connection in a worker thread, and turns its driver's errors into
    :class:`StoreError` whose ``__cause__`` is the driver's error).

    Session records are cached: one process owns a session's runs (the run registry is
    per process), and a session is deleted through the store that caches it.
    """

    dialect: Dialect

    def __init__(self) -> None:
        self._sessions = SessionCache()

    async def _call(self, what: str, fn: Callable[[Conn], T]) -> T:
        raise NotImplementedError

    async def _insert_runs(self, new_runs: list[NewRun]) -> None:
        """Save each run's user message and its ``running`` answer, in this order, in one
        transaction (each message takes the next place in its session)."""
        raise NotImplementedError

    # -- sessions ----------------------------------------------------------------------
    async def create_session(self, session_id: str, title: str, user_id: str | None) -> SessionRecord:
        rec = SessionRecord(session_id, title, user_id, utc_now())
        sql = self.dialect.sql("INSERT INTO sessions (id, title, user_id, created_at) VALUES (?, ?, ?, ?)")

        def q(c: Conn) -> None:
            c.execute(sql, (rec.id, rec.title, rec.user_id, rec.created_at))

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
        sql = self.dialect.sql("SELECT id, title, user_id, created_at FROM sessions WHERE id = ?")

        def q(c: Conn) -> SessionRecord | None:
            row = c.execute(sql, (session_id,)).fetchone()
            return SessionRecord(*row) if row else None

        rec = await self._call("reading a session", q)
        if rec is not None:
            self._sessions.remember(rec)
        return rec

    async def list_sessions(self, user_id: str | None, *, everyone: bool = False) -> list[SessionRecord]:
        columns = "SELECT id, title, user_id, created_at FROM sessions"
        params: tuple[str, ...] = ()
        if everyone:
            sql = f"{columns} ORDER BY created_at, id"
        elif user_id is None:
            sql = f"{columns} WHERE user_id IS NULL ORDER BY created_at, id"
        else:
            sql, params = f"{columns} WHERE user_id = ? ORDER BY created_at, id", (user_id,)
        query = self.dialect.sql(sql)

        def q(c: Conn) -> list[SessionRecord]:
            return [SessionRecord(*r) for r in c.execute(query, params).fetchall()]

        return await self._call("listing sessions", q)

    async def delete_session(self, session_id: str) -> bool:
        """The session; its messages (and whatever else refers to it) go with it, in the
        same statement (``ON DELETE CASCADE``; SQLite's connection enforces foreign keys)."""
        self._sessions.forget(session_id)
        sql = self.dialect.sql("DELETE FROM sessions WHERE id = ?")

        def q(c: Conn) -> bool:
            return bool(c.execute(sql, (session_id,)).rowcount > 0)

        return await self._call("deleting a session", q)

    # -- messages and answers ----------------------------------------------------------
    async def list_messages(self, session_id: str) -> list[MessageRecord]:
        sql = self.dialect.sql(
            "SELECT id, role, content, created_at, status, thinking, tool_calls FROM messages"
            " WHERE session_id = ? AND status != 'running' ORDER BY ord"
        )

        def q(c: Conn) -> list[MessageRecord]:
            rows = c.execute(sql, (session_id,)).fetchall()
            return [MessageRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None) for r in rows]

        return await self._call("listing messages", q)

    async def begin_run(self, new_run: NewRun) -> None:
        await self.begin_runs([new_run])

    async def begin_runs(self, new_runs: list[NewRun]) -> None:
        try:
            await self._insert_runs(new_runs)
        except StoreError as exc:
            cause = exc.__cause__
            if cause is not None and self.dialect.is_foreign_key_violation(cause):  # a message racing its DELETE
                raise SessionGone("the session was deleted before saving the user's message") from None
            raise

    async def save_answer(self, answer: Answer) -> None:
        tool_calls = json.dumps(answer.tool_calls)
        sql = self.dialect.sql("UPDATE messages SET content = ?, thinking = ?, tool_calls = ?, status = ? WHERE id = ?")

        def q(c: Conn) -> None:
            c.execute(sql, (answer.content, answer.thinking, tool_calls, answer.status, answer.id))

        await self._call("saving the answer", q)

    async def checkpoint(self, answers: list[Answer]) -> None:
        rows = [(a.content, a.thinking, json.dumps(a.tool_calls), a.id) for a in answers]
        d = self.dialect
        # Only answers still running: a checkpoint queued behind a run's final save must
        # not turn it back into "running".
        sql = d.sql("UPDATE messages SET content = ?, thinking = ?, tool_calls = ? WHERE id = ? AND status = 'running'")

        def q(c: Conn) -> None:
            with d.transaction(c), contextlib.closing(c.cursor()) as cur:
                cur.executemany(sql, rows)  # pipelined by psycopg

        await self._call("saving answers in progress", q)

    async def recover_interrupted(self) -> int:
        def q(c: Conn) -> int:
            return int(c.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'running'").rowcount)

        return await self._call("marking interrupted answers", q)

    async def load_context(self, session_id: str) -> tuple[str | None, list[dict[str, Any]]]:
        d = self.dialect

        def q(c: Conn) -> tuple[str | None, list[dict[str, Any]]]:
            with d.transaction(c):  # the summary and the messages after it, as of one moment
                row = c.execute(d.sql("SELECT summary, summary_through FROM sessions WHERE id = ?"), (session_id,))
                row = row.fetchone()
                summary, through = (row[0], row[1]) if row else (None, 0)
                rows = c.execute(
                    d.sql(
                        "SELECT id, role, content FROM messages WHERE session_id = ? AND ord > ?"
                        " AND status != 'running' ORDER BY ord"
                    ),
                    (session_id, through),
                ).fetchall()
            return summary, [{"id": r[0], "role": r[1], "content": r[2]} for r in rows]

        return await self._call("loading the conversation", q)

    async def save_summary(self, session_id: str, summary: str, through_message_id: str) -> None:
        sql = self.dialect.sql(
            "UPDATE sessions SET summary = ?, summary_through ="
            " COALESCE((SELECT ord FROM messages WHERE id = ?), 0) WHERE id = ?"
        )

        def q(c: Conn) -> None:
            c.execute(sql, (summary, through_message_id, session_id))

        await self._call("saving the conversation summary", q)

    # -- users and tokens --------------------------------------------------------------
    async def add_user(self, user: User, token_hash: str) -> None:
        d = self.dialect

        def q(c: Conn) -> None:
            with d.transaction(c):
                c.execute(
                    d.sql("INSERT INTO users (id, name, role, created_at) VALUES (?, ?, ?, ?)"),
                    (user.id, user.name, user.role, user.created_at),
                )
                c.execute(
                    d.sql("INSERT INTO tokens (hash, user_id, created_at) VALUES (?, ?, ?)"),
                    (token_hash, user.id, user.created_at),
                )

        try:
            await self._call("adding a user", q)
        except StoreError as exc:
            if exc.__cause__ is not None and d.is_unique_violation(exc.__cause__):
                raise StoreError(f"a user named {user.name!r} exists already") from None
            raise

    async def list_users(self) -> list[User]:
        def q(c: Conn) -> list[User]:
            rows = c.execute("SELECT id, name, role, created_at, revoked_at FROM users ORDER BY created_at, name")
            return [User(r[0], r[1], r[2], r[3], r[4] is not None) for r in rows.fetchall()]

        return await self._call("listing users", q)

    async def revoke_user(self, name: str, revoked_at: str) -> User | None:
        d = self.dialect
        update = d.sql("UPDATE users SET revoked_at = COALESCE(revoked_at, ?) WHERE name = ?")
        select = d.sql("SELECT id, name, role, created_at FROM users WHERE name = ?")

        def q(c: Conn) -> User | None:
            with d.transaction(c):
                c.execute(update, (revoked_at, name))
                row = c.execute(select, (name,)).fetchone()
            return User(row[0], row[1], row[2], row[3], True) if row else None

        return await self._call("revoking a user", q)

    async def user_for_token_hash(self, token_hash: str) -> User | None:
        sql = self.dialect.sql(
            "SELECT u.id, u.name, u.role, u.created_at, u.revoked_at, t.hash FROM tokens t"
            " JOIN users u ON u.id = t.user_id WHERE t.hash = ?"
        )

        def q(c: Conn) -> User | None:
            row = c.execute(sql, (token_hash,)).fetchone()
            if row is None or not digests_equal(row[5], token_hash):
                return None
            return User(row[0], row[1], row[2], row[3], row[4] is not None)

        return await self._call("checking a token", q)

    async def revoked_user_ids(self) -> set[str]:
        def q(c: Conn) -> set[str]:
            return {r[0] for r in c.execute("SELECT id FROM users WHERE revoked_at IS NOT NULL").fetchall()}

        return await self._call("reading revoked users", q)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

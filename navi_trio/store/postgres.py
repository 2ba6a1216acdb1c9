"""PostgreSQL store (``NAVI_DATABASE_URL=postgresql://...``): the same interface as SQLite.

Why threads: psycopg 3's async API runs on asyncio only, not on Trio, so the store drives
psycopg's blocking API from worker threads (``trio.to_thread.run_sync``), one pooled
connection per thread (``psycopg_pool.ConnectionPool``). A ``CapacityLimiter`` as large as
the pool means a thread never waits inside psycopg for a free connection.

``abandon_on_cancel=True``, for the reason SQLite has it: a caller's time bound (the
shielded ``move_on_after`` of a run's cleanup, the checkpoint's bound) is honoured even
when PostgreSQL hangs (a lost host, a lock). The abandoned call keeps its limiter token
and its connection until it ends, and it does end: connects, waits for a pooled
connection, statements and a silent peer are all bounded (:data:`CONNECT_DEFAULTS`).

A fault of the server or the network becomes a :class:`StoreError` naming PostgreSQL and
its host (never the password): the run registry ends runs that lose a checkpoint with an
``error`` that says so and retries refused final answers until they are in.
"""

from __future__ import annotations

import logging
import math
import select
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any, Final, LiteralString, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.errors
import structlog
import trio
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .. import uploads
from ..errors import SessionGone, StoreError
from .base import NewRun
from .dbapi import DbApiStore, Dialect

T = TypeVar("T")
log = structlog.get_logger("navi_trio.store.postgres")
# psycopg_pool logs each failed reconnect through the standard library, in plain text,
# outside our structured log: the store logs the outage once, and its end, instead.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())
Conn = psycopg.Connection[tuple[Any, ...]]

#: Schema migrations, in order; ``schema_version`` records how many have run. They run at
#: start, all in one transaction under an advisory lock, so processes starting at once on
#: one new database apply each exactly once. Append, never edit a released one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            user_id TEXT,
            created_at TEXT NOT NULL,
            summary TEXT,
            summary_through BIGINT NOT NULL DEFAULT 0
        )""",
        # ord: one sequence for every session; ordered within a session, as SQLite's is.
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            ord BIGINT GENERATED ALWAYS AS IDENTITY,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            thinking TEXT,
            tool_calls TEXT,
            status TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX messages_by_session ON messages(session_id, ord)",
        "CREATE INDEX messages_running ON messages(status) WHERE status = 'running'",
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
        # Every process reads an upload from here (its data dir holds copies). ``stamp``
        # is its version (see uploads.py); no compression, so a fetch reads it in slices
        # (``substring``) without decompressing the whole value for each.
        """CREATE TABLE uploads (
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            size BIGINT NOT NULL,
            stamp BIGINT NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (session_id, name)
        )""",
        "ALTER TABLE uploads ALTER COLUMN data SET STORAGE EXTERNAL",
    ),
)

#: The key of the advisory lock that serializes migrations (any constant; "navi" in ASCII).
MIGRATION_LOCK: Final = 0x6E617669

#: How long a store call waits for a connection (the pool's own wait, which is the whole
#: wait while PostgreSQL is down): below the default ``save_timeout_s`` (5 s), so a refused
#: final save is a StoreError the registry retries, not a cancelled call.
POOL_TIMEOUT_S: Final = 2.0

#: Bounds on every connection: the connect, a peer that stops answering (TCP keepalives,
#: ``tcp_user_timeout`` in ms) and a statement (:data:`SERVER_OPTIONS`), so an abandoned
#: worker thread ends. What the URL sets itself wins.
CONNECT_DEFAULTS: Final[dict[str, Any]] = {
    "connect_timeout": "3",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "navi-trio",
}
#: Added to the URL's own ``options``.
SERVER_OPTIONS: Final = "-c statement_timeout=30000"

#: How long the start waits for the pool's first connection (the migration's connection
#: has just succeeded, so this is a backstop).
POOL_OPEN_TIMEOUT_S: Final = 10.0

#: How often ``health()`` asks the server itself.
HEALTH_CHECK_S: Final = 1.0

#: Connections per process (and worker threads doing store calls at once).
POOL_SIZE: Final = 4

#: An upload is fetched in slices of this size: a fetch holds one slice in memory.
FETCH_CHUNK: Final = 1024 * 1024
#: Session ids looked up at once by a sweep of upload copies.
SWEEP_BATCH: Final = 1000


def _transaction(conn: Conn) -> AbstractContextManager[Any]:
    return conn.transaction()


#: psycopg's ``%s``, its transactions, and its error class for each constraint.
DIALECT: Final = Dialect(
    placeholder="%s",
    transaction=_transaction,
    is_foreign_key_violation=lambda exc: isinstance(exc, psycopg.errors.ForeignKeyViolation),
    is_unique_violation=lambda exc: isinstance(exc, psycopg.errors.UniqueViolation),
)

#: How long the pool tries to replace one lost connection before it gives that try up.
#: Why short: psycopg_pool retries a failed connect with a delay that doubles (1, 2, 4,
#: 8 ... s, its own and not configurable) for this long (its default: 5 minutes), so after
#: an outage of a minute its next try could come a minute after PostgreSQL is back, and
#: ``/healthz`` would say 503 all that time. Given up, the try is made again, at once, by
#: the next call that waits for a connection (the pool grows on demand), so the store
#: sees PostgreSQL back within about this long of it answering, however long it was away.
RECONNECT_TIMEOUT_S: Final = 2.0


def describe(url: str) -> str:
    """``PostgreSQL at host:port/dbname`` for messages and logs: never the password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "PostgreSQL (an invalid NAVI_DATABASE_URL)"
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or "5432")
    dbname = str(params.get("dbname") or params.get("user") or "")
    return f"PostgreSQL at {host}:{port}/{dbname}"


def conninfo(url: str) -> str:
    """``url`` with :data:`CONNECT_DEFAULTS` for what it leaves unset, and
    :data:`SERVER_OPTIONS` after its own ``options``. Raises ``psycopg.ProgrammingError``
    for a URL that does not parse."""
    params: dict[str, Any] = {**CONNECT_DEFAULTS, **psycopg.conninfo.conninfo_to_dict(url)}
    params["options"] = f"{params.get('options') or ''} {SERVER_OPTIONS}".strip()
    return psycopg.conninfo.make_conninfo("", **params)


def _reason(exc: BaseException, password: str) -> str:
    """The first line of a psycopg message, the password blanked should it ever appear."""
    if isinstance(exc, PoolTimeout):  # the pool's own words name a pool, not a cause
        return "no connection could be made or taken from the pool in time"
    if isinstance(exc, PoolClosed):
        return "the store is closed"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text.replace(password, "***") if password else text


def _is_unavailable(exc: BaseException) -> bool:
    """The server or the network failed (as opposed to a statement the database refused)."""
    return isinstance(exc, psycopg.OperationalError) and not isinstance(
        exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable
    )


def _alive(conn: Conn) -> bool:
    """False if the server has closed this idle connection (see ``PostgresStore._connection``)."""
    try:
        if not select.select([conn.fileno()], [], [], 0)[0]:
            return True
        ConnectionPool.check_connection(conn)
    except (psycopg.Error, OSError, ValueError):
        return False
    return True


def migrate(conn: Conn) -> int:
    """Bring the schema up to date; return the version it is now at.

    The advisory lock is taken before anything else in the transaction, so a second
    process starting at the same moment waits, then finds the work done.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0
        else:
            version = int(row[0])
        if version > len(MIGRATIONS):
            raise StoreError(f"the database is at schema version {version}, newer than this navi-trio knows")
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS),))
    return len(MIGRATIONS)


def _fetch_uploads(folder: Path, session_id: str, names: Collection[str] | None, conn: Conn) -> None:
    """In a worker thread: write into ``folder`` the session's uploads (or ``names``) it
    lacks or holds in another version, one slice in memory at a time. What is fetched is
    read from one snapshot of the table, so a version replaced meanwhile is not mixed in.
    When nothing is missing (the common case: every run of a session asks) this is one
    statement."""
    if not uploads.stale(folder, _versions(conn, session_id, names)):
        return
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        for name, size, stamp in uploads.stale(folder, _versions(conn, session_id, names)):
            uploads.fetch_into(folder, name, stamp, _slices(conn, session_id, name, size))


def _versions(conn: Conn, session_id: str, names: Collection[str] | None) -> list[tuple[str, int, int]]:
    """``(name, size, stamp)`` of the session's uploads (or of ``names``)."""
    if names is None:
        cur = conn.execute("SELECT name, size, stamp FROM uploads WHERE session_id = %s", (session_id,))
    else:
        cur = conn.execute(
            "SELECT name, size, stamp FROM uploads WHERE session_id = %s AND name = ANY(%s)",
            (session_id, list(names)),
        )
    return [(r[0], r[1], r[2]) for r in cur.fetchall()]


def _sweep(data_dir: Path, conn: Conn) -> int:
    """In a worker thread: remove the upload folders in ``data_dir`` whose session is gone.
    A folder is made only for a session that exists (an upload or fetch needs it), and
    ids are never reused, so one whose session is not found now is garbage."""
    folders = uploads.session_folders(data_dir)
    gone = []
    for start in range(0, len(folders), SWEEP_BATCH):
        batch = folders[start : start + SWEEP_BATCH]
        ids = list({f.name for f in batch})
        found = {r[0] for r in conn.execute("SELECT id FROM sessions WHERE id = ANY(%s)", (ids,)).fetchall()}
        gone += [f for f in batch if f.name not in found]
    uploads.remove_folders(gone)
    return len(gone)


def _slices(conn: Conn, session_id: str, name: str, size: int) -> Iterator[bytes]:
    for start in range(0, size, FETCH_CHUNK):
        row = conn.execute(
            "SELECT substring(data FROM %s FOR %s) FROM uploads WHERE session_id = %s AND name = %s",
            (start + 1, FETCH_CHUNK, session_id, name),
            binary=True,
        ).fetchone()
        assert row is not None  # the snapshot holds it
        yield row[0]


def _in_one_transaction(sql: LiteralString, rows: Sequence[Sequence[Any]], conn: Conn) -> None:
    """``sql`` once for each of ``rows``, pipelined, all in one transaction."""
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(sql, rows)


class PostgresStore(DbApiStore):
    """A pool of connections to one database, shared by this process's calls.

    Session records are cached as SQLite caches them (:class:`DbApiStore`): a session is
    looked up through the store of the process that serves it, and deleted through it.
    """

    dialect = DIALECT

    def __init__(self, pool: ConnectionPool[Conn], where: str, password: str, data_dir: Path | None = None) -> None:
        super().__init__()
        self._pool = pool
        self._where = where
        self._password = password
        #: Where this process keeps its copies of uploads (None: where the caller says).
        self._data_dir = data_dir
        self._limiter = trio.CapacityLimiter(POOL_SIZE)
        #: Why the database could not be reached on the last call, or None once it answers.
        self.unavailable: str | None = None
        self._health_checked_at = -math.inf

    @classmethod
    async def open(
        cls, url: str, *, pool_timeout_s: float = POOL_TIMEOUT_S, data_dir: Path | None = None
    ) -> PostgresStore:
        """Connect, migrate, and open the pool. Raises :class:`StoreError` naming the
        server (``PostgreSQL at host:port/db``) if it cannot be reached or migrated.
        ``data_dir``: this process's, where it keeps its copies of uploads.

        Cancellation: the connect runs in a worker thread that is waited for (bounded by
        ``connect_timeout``), so nothing is left open behind a cancel.
        """
        where = describe(url)
        try:
            password = str(psycopg.conninfo.conninfo_to_dict(url).get("password") or "")
            info = conninfo(url)
        except psycopg.ProgrammingError:
            raise StoreError(f"{where}: NAVI_DATABASE_URL must look like postgresql://user@host/dbname") from None

        def _open() -> ConnectionPool[Conn]:
            with psycopg.connect(info, autocommit=True) as conn:
                migrate(conn)
            pool: ConnectionPool[Conn] = ConnectionPool(
                info,
                min_size=1,
                max_size=POOL_SIZE,
                kwargs={"autocommit": True},
                timeout=pool_timeout_s,
                reconnect_timeout=RECONNECT_TIMEOUT_S,
                open=False,
                name="navi-trio",
            )
            pool.open(wait=True, timeout=POOL_OPEN_TIMEOUT_S)
            return pool

        try:
            pool = await trio.to_thread.run_sync(_open)
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreError(f"cannot use {where}: {_reason(exc, password)}") from None
        return cls(pool, where, password, data_dir)

    def _connection(self) -> Conn:
        """In a worker thread: a pooled connection not known to be dead.

        Why: after PostgreSQL restarts, every idle pooled connection is dead, and using
        one fails the call (a checkpoint failing would end a healthy run). An idle
        connection has nothing to read unless the server has since said something (its
        ``FATAL`` goodbye, or EOF), so a zero-timeout poll of its socket tells, with no
        round trip; only then is it asked (``SELECT``-less empty query). A dead one is
        closed and given back (the pool replaces it) and the next is tried.
        """
        for _ in range(POOL_SIZE):
            conn = self._pool.getconn()
            if _alive(conn):
                return conn
            conn.close()
            self._pool.putconn(conn)
        return self._pool.getconn()  # every idle one was dead: this one is new

    async def _call(self, what: str, fn: Callable[[Conn], T]) -> T:
        def work() -> T:
            conn = self._connection()
            try:
                return fn(conn)
            finally:
                self._pool.putconn(conn)

        try:
            result = await trio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)
        except psycopg.Error as exc:  # the pool's errors too (PoolTimeout, PoolClosed)
            reason = _reason(exc, self._password)
            if _is_unavailable(exc):
                if self.unavailable is None:
                    log.error("store.database_unavailable", database=self._where, reason=reason, during=what)
                self.unavailable = f"{self._where} is unavailable: {reason}"
                raise StoreError(f"{self._where} is unavailable while {what}: {reason}") from exc
            raise StoreError(f"database error while {what}: {reason}") from exc
        if self.unavailable is not None:
            log.info("store.database_back", database=self._where)
            self.unavailable = None
        return result

    async def ping(self) -> bool:
        """True if PostgreSQL answers now (updates :attr:`unavailable`)."""
        try:
            await self._call("checking the database", lambda c: c.execute("SELECT 1").fetchone())
        except StoreError:
            return False
        return True

    async def health(self) -> str | None:
        """Asks the server at most every :data:`HEALTH_CHECK_S` (a load balancer's probes
        must not take the pool from the runs); while it is down an ask takes up to the
        pool's wait."""
        now = trio.current_time()
        if now - self._health_checked_at >= HEALTH_CHECK_S:
            self._health_checked_at = now
            await self.ping()
        else:
            await trio.lowlevel.checkpoint()
        return self.unavailable

    async def _insert_runs(self, new_runs: list[NewRun]) -> None:
        rows: list[tuple[str | None, ...]] = []
        for r in new_runs:
            rows.append((r.user_message_id, r.session_id, "user", r.user_content, None, None, "complete", r.created_at))
            rows.append((r.answer_id, r.session_id, "assistant", "", "", "[]", "running", r.created_at))

        # In this order: each row takes the next ord, so the answer follows its question.
        sql = (
            "INSERT INTO messages (id, session_id, role, content, thinking, tool_calls, status, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        )
        await self._call("saving the user's message", partial(_in_one_transaction, sql, rows))

    async def keep_upload(self, session_id: str, name: str, body: bytes, stamp: int) -> None:
        def q(c: Conn) -> None:
            # %b: the bytes go as they are (binary), not escaped into a second copy.
            c.execute(
                "INSERT INTO uploads (session_id, name, size, stamp, data) VALUES (%s, %s, %s, %s, %b)"
                " ON CONFLICT (session_id, name) DO UPDATE"
                " SET size = EXCLUDED.size, stamp = EXCLUDED.stamp, data = EXCLUDED.data",
                (session_id, name, len(body), stamp, body),
            )

        try:
            await self._call("saving an upload", q)
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.ForeignKeyViolation):  # an upload racing its DELETE
                raise SessionGone("the session was deleted before its upload was saved") from None
            raise

    async def local_uploads(self, folder: Path, session_id: str, names: Collection[str] | None = None) -> Path:
        """Fetches what this process's copy lacks (one query when it lacks nothing). A
        disk fault (full, read-only) is a :class:`StoreError` saying so."""
        if self._data_dir is not None:
            folder = uploads.rerooted(folder, self._data_dir)
        try:
            await self._call("fetching uploads", partial(_fetch_uploads, folder, session_id, names))
        except (OSError, uploads.BadUpload) as exc:
            raise StoreError(f"cannot copy this session's uploads into {folder}: {exc}") from exc
        return folder

    async def sweep_uploads(self) -> int:
        if self._data_dir is None:
            await trio.lowlevel.checkpoint()
            return 0
        try:
            return await self._call("sweeping uploads of deleted sessions", partial(_sweep, self._data_dir))
        except OSError as exc:
            raise StoreError(f"cannot sweep the uploads in {self._data_dir}: {exc}") from exc

    def close(self) -> None:
        """Close the pool: its connections and its maintenance threads (bounded wait,
        safe in a cancelled ``finally``). A call still running in an abandoned thread
        finds its connection closed and ends."""
        self._pool.close(timeout=1.0)

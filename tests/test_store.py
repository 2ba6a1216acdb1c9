"""The store interface (``navi_trio.store``): SQLite, PostgreSQL and the in-memory store
side by side (PostgreSQL: a real server, see ``tests/pg.py``).

Every implementation is driven through the same ``Store`` interface; the SQLite-only
tests cover what only a real database can do: survive a reopen, fail on a read-only
file with a :class:`StoreError` that says what failed, and never block the event loop
while SQLite waits on a lock (real clock: the store works in worker threads).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from navi_trio.errors import StoreError
from navi_trio.store import Answer, MemoryStore, NewRun, SqliteStore, Store, User
from navi_trio.store.postgres import MIGRATIONS as PG_MIGRATIONS
from navi_trio.store.postgres import POOL_SIZE, PostgresStore

from .pg import PASSWORD, PgServer, free_port, opened_store, running_postgres

T0 = "2026-01-01T00:00:00.000Z"


@pytest.fixture
def store(any_store: Store) -> Store:
    return any_store  # SQLite, PostgreSQL and the memory store (conftest.py)


#: For tests of the stores with a database (a schema, constraints, a file or a server).
databases = pytest.mark.parametrize("store_kind", ["sqlite", "postgres"], indirect=True)


def new_run(session_id: str, content: str, created_at: str = T0) -> NewRun:
    return NewRun(session_id, uuid.uuid4().hex, content, uuid.uuid4().hex, created_at)


def answer(run: NewRun, status: str, content: str = "", thinking: str = "", tool_calls: Any = ()) -> Answer:
    return Answer(run.answer_id, run.session_id, status, content, thinking, list(tool_calls))


async def play_run(store: Store, session_id: str, question: str, reply: str, status: str = "complete") -> NewRun:
    run = new_run(session_id, question)
    await store.begin_run(run)
    await store.save_answer(answer(run, status, reply))
    return run


# -- sessions ----------------------------------------------------------------------------


async def test_create_get_session(store: Store) -> None:
    with trio.fail_after(10):
        rec = await store.create_session("s1", "First", None)
        assert (rec.id, rec.title, rec.user_id) == ("s1", "First", None)
        assert rec.created_at.endswith("Z")
        got = await store.get_session("s1")
        assert got == rec
        assert got.as_dict() == {"id": "s1", "title": "First", "user_id": None, "created_at": rec.created_at}
        assert await store.get_session("nope") is None


async def test_cached_session_answers_without_a_scheduler_pass(store: Store) -> None:
    """What a stop looks up first: a record the store holds, with no checkpoint."""
    with trio.fail_after(10):
        rec = await store.create_session("s1", "First", None)
        with trio.testing.assert_no_checkpoints():
            assert store.cached_session("s1") == rec
            assert store.cached_session("nope") is None
        await store.delete_session("s1")
        assert store.cached_session("s1") is None


async def test_list_sessions_by_owner(store: Store) -> None:
    with trio.fail_after(10):
        await store.create_session("anon1", "a", None)
        await store.create_session("alice1", "b", "alice")
        await store.create_session("alice2", "c", "alice")
        await store.create_session("bob1", "d", "bob")
        await store.create_session("anon2", "e", None)

        def ids(records: list[Any]) -> set[str]:
            return {r.id for r in records}

        assert ids(await store.list_sessions(None)) == {"anon1", "anon2"}
        assert ids(await store.list_sessions("alice")) == {"alice1", "alice2"}
        assert ids(await store.list_sessions("bob")) == {"bob1"}
        assert ids(await store.list_sessions("carol")) == set()
        everyone = await store.list_sessions(None, everyone=True)
        assert ids(everyone) == {"anon1", "alice1", "alice2", "bob1", "anon2"}
        assert len(everyone) == 5
        assert all(r.user_id == "alice" for r in await store.list_sessions("alice"))


async def test_delete_session(store: Store) -> None:
    with trio.fail_after(10):
        await store.create_session("s1", "one", None)
        await store.create_session("s2", "two", None)
        assert await store.delete_session("s1") is True
        assert await store.get_session("s1") is None
        assert await store.delete_session("s1") is False
        assert await store.delete_session("never") is False
        assert [s.id for s in await store.list_sessions(None)] == ["s2"]
        assert await store.get_session("s2") is not None


# -- messages ----------------------------------------------------------------------------


async def test_begin_run_saves_user_message_and_hides_running_answer(store: Store) -> None:
    with trio.fail_after(10):
        await store.create_session("s1", "t", None)
        run = new_run("s1", "hello there")
        await store.begin_run(run)
        msgs = await store.list_messages("s1")
        assert [m.as_dict() for m in msgs] == [
            {
                "id": run.user_message_id,
                "role": "user",
                "content": "hello there",
                "created_at": T0,
                "status": "complete",
            }
        ]
        # A checkpoint of the running answer is still hidden.
        await store.save_answer(answer(run, "running", "partial so far", "hmm"))
        assert [m.role for m in await store.list_messages("s1")] == ["user"]


@pytest.mark.parametrize("status", ["complete", "stopped", "error", "interrupted"])
async def test_save_answer_updates_the_answer(store: Store, status: str) -> None:
    tool_calls = [
        {"tool": "calculator", "args": {"expression": "1+1"}, "result": "2", "success": True},
        {"tool": "t", "args": {}, "result": "cancelled", "success": False},
    ]
    with trio.fail_after(10):
        await store.create_session("s1", "t", None)
        run = new_run("s1", "question")
        await store.begin_run(run)
        await store.save_answer(answer(run, "running", "par", "thinking a"))
        await store.save_answer(answer(run, status, "partial — ünïcode ✓", "thinking a b", tool_calls))
        msgs = await store.list_messages("s1")
        assert [m.role for m in msgs] == ["user", "assistant"]
        a = msgs[1].as_dict()
        assert a == {
            "id": run.answer_id,
            "role": "assistant",
            "content": "partial — ünïcode ✓",
            "created_at": T0,
            "status": status,
            "thinking": "thinking a b",
            "tool_calls": tool_calls,
        }
        # Saving again overwrites rather than adding a message.
        await store.save_answer(answer(run, status, "final", "", []))
        msgs = await store.list_messages("s1")
        assert len(msgs) == 2
        assert (msgs[1].content, msgs[1].thinking or "", msgs[1].tool_calls or []) == ("final", "", [])


async def test_messages_oldest_first_across_runs(store: Store) -> None:
    with trio.fail_after(10):
        await store.create_session("a", "t", None)
        await store.create_session("b", "t", None)
        # Same timestamps everywhere: the order must not depend on created_at ties.
        await play_run(store, "a", "q1", "r1")
        await play_run(store, "b", "other q", "other r")
        await play_run(store, "a", "q2", "r2", status="stopped")
        await play_run(store, "a", "q3", "r3", status="interrupted")
        msgs = await store.list_messages("a")
        assert [(m.role, m.content) for m in msgs] == [
            ("user", "q1"),
            ("assistant", "r1"),
            ("user", "q2"),
            ("assistant", "r2"),
            ("user", "q3"),
            ("assistant", "r3"),
        ]
        assert [m.status for m in msgs] == ["complete", "complete", "complete", "stopped", "complete", "interrupted"]
        assert [(m.role, m.content) for m in await store.list_messages("b")] == [
            ("user", "other q"),
            ("assistant", "other r"),
        ]


async def test_running_answer_in_the_middle_keeps_the_order(store: Store) -> None:
    """A run whose answer is still running hides only that answer, not what follows."""
    with trio.fail_after(10):
        await store.create_session("s1", "t", None)
        await play_run(store, "s1", "q1", "r1")
        running = new_run("s1", "q2")
        await store.begin_run(running)
        assert [m.content for m in await store.list_messages("s1")] == ["q1", "r1", "q2"]
        await store.save_answer(answer(running, "stopped", "r2 partial"))
        await play_run(store, "s1", "q3", "r3")
        assert [m.content for m in await store.list_messages("s1")] == ["q1", "r1", "q2", "r2 partial", "q3", "r3"]


async def test_delete_removes_messages(store: Store) -> None:
    with trio.fail_after(10):
        await store.create_session("s1", "t", None)
        await store.create_session("s2", "t", None)
        run = await play_run(store, "s1", "q1", "r1")
        await play_run(store, "s2", "keep", "kept")
        assert await store.delete_session("s1") is True
        assert await store.list_messages("s1") == []
        # A late save of a deleted session's answer is harmless and brings nothing back.
        await store.save_answer(answer(run, "stopped", "late"))
        # A new session with the same id starts empty: the old messages are really gone.
        await store.create_session("s1", "again", None)
        assert await store.list_messages("s1") == []
        assert [m.content for m in await store.list_messages("s2")] == ["keep", "kept"]


async def test_list_messages_of_unknown_session_is_empty(store: Store) -> None:
    with trio.fail_after(10):
        assert await store.list_messages("nope") == []


async def test_begin_runs_of_several_sessions_in_one_call(store: Store) -> None:
    with trio.fail_after(10):
        for sid in ("a", "b", "c"):
            await store.create_session(sid, "t", None)
        await play_run(store, "b", "earlier", "reply")
        runs = [new_run(sid, f"q {sid}") for sid in ("a", "b", "c")]
        await store.begin_runs(runs)
        assert [m.content for m in await store.list_messages("a")] == ["q a"]
        assert [m.content for m in await store.list_messages("b")] == ["earlier", "reply", "q b"]
        for r in runs:
            await store.save_answer(answer(r, "complete", f"r {r.session_id}"))
        assert [m.content for m in await store.list_messages("c")] == ["q c", "r c"]


@databases
async def test_begin_runs_for_a_deleted_session_fails_and_writes_nothing(any_store: Store) -> None:
    with trio.fail_after(10):
        await any_store.create_session("kept", "t", None)
        with pytest.raises(StoreError, match="saving the user's message"):
            await any_store.begin_runs([new_run("kept", "q"), new_run("gone", "q")])
        assert await any_store.list_messages("kept") == []  # one transaction: all or nothing


async def test_checkpoint_saves_running_answers_and_recovery_interrupts_them(store: Store) -> None:
    with trio.fail_after(10):
        runs = []
        for i in range(3):
            await store.create_session(f"s{i}", "t", None)
            runs.append(new_run(f"s{i}", f"q{i}"))
        await store.begin_runs(runs)
        await store.save_answer(answer(runs[2], "complete", "finished"))
        await store.checkpoint([answer(r, "running", f"so far {i}", "th", [{"tool": "t"}]) for i, r in enumerate(runs)])
        assert [m.content for m in await store.list_messages("s0")] == ["q0"]  # still hidden
        assert await store.recover_interrupted() == 2
        assert await store.recover_interrupted() == 0
        for i in range(2):
            msgs = await store.list_messages(f"s{i}")
            assert (msgs[1].status, msgs[1].content, msgs[1].thinking) == ("interrupted", f"so far {i}", "th")
            assert msgs[1].tool_calls == [{"tool": "t"}]
        final = (await store.list_messages("s2"))[1]
        assert (final.status, final.content) == ("complete", "finished")  # the checkpoint left it alone


async def test_load_context_after_the_summary(store: Store) -> None:
    with trio.fail_after(10):
        await store.create_session("s1", "t", None)
        assert await store.load_context("s1") == (None, [])
        first = await play_run(store, "s1", "q1", "r1")
        second = await play_run(store, "s1", "q2", "r2")
        running = new_run("s1", "q3")
        await store.begin_run(running)
        summary, history = await store.load_context("s1")
        assert summary is None
        assert [(m["role"], m["content"]) for m in history] == [
            ("user", "q1"),
            ("assistant", "r1"),
            ("user", "q2"),
            ("assistant", "r2"),
            ("user", "q3"),
        ]
        assert history[0]["id"] == first.user_message_id
        await store.save_summary("s1", "they asked twice", second.user_message_id)
        summary, history = await store.load_context("s1")
        assert summary == "they asked twice"
        assert [m["content"] for m in history] == ["r2", "q3"]


async def test_users_and_tokens(store: Store) -> None:
    alice = User("id-alice", "alice", "admin", T0)
    bob = User("id-bob", "bob", "user", "2026-01-02T00:00:00.000Z")
    with trio.fail_after(10):
        await store.add_user(alice, "hash-a")
        await store.add_user(bob, "hash-b")
        with pytest.raises(StoreError, match="a user named 'alice' exists already"):
            await store.add_user(User("id-other", "alice", "user", T0), "hash-c")
        assert await store.user_for_token_hash("hash-c") is None  # the refused user left nothing
        assert await store.list_users() == [alice, bob]
        assert await store.user_for_token_hash("hash-a") == alice
        assert await store.user_for_token_hash("nope") is None
        assert await store.revoked_user_ids() == set()
        revoked = await store.revoke_user("bob", "2026-01-03T00:00:00.000Z")
        assert revoked == User("id-bob", "bob", "user", bob.created_at, True)
        assert await store.revoke_user("nobody", T0) is None
        assert await store.revoked_user_ids() == {"id-bob"}
        got = await store.user_for_token_hash("hash-b")
        assert got is not None and got.revoked
        assert [u.revoked for u in await store.list_users()] == [False, True]


# -- SQLite only ---------------------------------------------------------------------------


@databases
async def test_database_survives_reopen(store_kind: str, tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with opened_store(store_kind, tmp_path) as store:
            await store.create_session("s1", "kept", "alice")
            run = await play_run(store, "s1", "q1", "r1")
            await store.save_answer(
                answer(run, "complete", "r1", "th", [{"tool": "x", "args": {"a": 1}, "result": "ok", "success": True}])
            )
        async with opened_store(store_kind, tmp_path) as store:
            rec = await store.get_session("s1")
            assert rec is not None
            assert (rec.title, rec.user_id) == ("kept", "alice")
            msgs = await store.list_messages("s1")
            assert [m.content for m in msgs] == ["q1", "r1"]
            assert msgs[1].thinking == "th"
            assert msgs[1].tool_calls == [{"tool": "x", "args": {"a": 1}, "result": "ok", "success": True}]


async def test_sqlite_open_failure_is_a_store_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with trio.fail_after(10), pytest.raises(StoreError, match="cannot open database"):
        await SqliteStore.open(not_a_dir / "navi.sqlite3")


@contextlib.contextmanager
def read_only_files(path: Path) -> Iterator[None]:
    """chmod 0o444 the database and its -wal/-shm; restore on exit."""
    files = [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
    for p in files:
        p.chmod(0o444)
    try:
        yield
    finally:
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if p.exists():
                p.chmod(0o644)


async def make_read_only(store: SqliteStore) -> None:
    """As root, chmod changes nothing: make the connection itself refuse writes."""
    await trio.to_thread.run_sync(store._conn.execute, "PRAGMA query_only = ON")


async def test_sqlite_read_only_database_raises_store_error_on_write(tmp_path: Path) -> None:
    path = tmp_path / "navi.sqlite3"
    with trio.fail_after(20):
        async with await SqliteStore.open(path) as store:
            await store.create_session("s1", "t", None)
            run = new_run("s1", "q")
            await store.begin_run(run)
        with read_only_files(path) if os.geteuid() != 0 else contextlib.nullcontext():
            async with await SqliteStore.open(path) as store:
                if os.geteuid() == 0:
                    await make_read_only(store)
                # Reads still work.
                assert (await store.get_session("s1")) is not None
                assert [m.content for m in await store.list_messages("s1")] == ["q"]
                # Every write fails with a StoreError that says what failed, and why.
                with pytest.raises(StoreError, match=r"creating a session.*readonly"):
                    await store.create_session("s2", "t", None)
                with pytest.raises(StoreError, match=r"saving the user's message.*readonly"):
                    await store.begin_run(new_run("s1", "q2"))
                with pytest.raises(StoreError, match=r"saving the answer.*readonly"):
                    await store.save_answer(answer(run, "complete", "r"))
                with pytest.raises(StoreError, match=r"deleting a session.*readonly"):
                    await store.delete_session("s1")
                # Nothing half-written, nothing lost.
                assert await store.get_session("s2") is None
                assert [s.id for s in await store.list_sessions(None)] == ["s1"]
                assert [m.content for m in await store.list_messages("s1")] == ["q"]


async def test_sqlite_store_usable_after_failed_writes(tmp_path: Path) -> None:
    """A failed write leaves no transaction open: once writes are allowed again they work."""
    with trio.fail_after(20):
        async with await SqliteStore.open(tmp_path / "navi.sqlite3") as store:
            await store.create_session("s1", "t", None)
            await make_read_only(store)
            with pytest.raises(StoreError):
                await store.begin_run(new_run("s1", "q"))
            with pytest.raises(StoreError):
                await store.delete_session("s1")
            await trio.to_thread.run_sync(store._conn.execute, "PRAGMA query_only = OFF")
            assert not store._conn.in_transaction
            run = await play_run(store, "s1", "q", "r")
            assert [m.id for m in await store.list_messages("s1")] == [run.user_message_id, run.answer_id]


def hold_write_lock(path: Path, held: trio.Event, hold_s: float) -> None:
    """In a worker thread: take SQLite's write lock with another connection for ``hold_s``."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO sessions (id, title, user_id, created_at) VALUES ('locker', 'x', NULL, ?)",
            (T0,),
        )
        trio.from_thread.run_sync(held.set)
        time.sleep(hold_s)  # a real writer holding the lock (this thread, not the loop)
        conn.execute("COMMIT")
    finally:
        conn.close()


def hold_table_lock(url: str, held: trio.Event, hold_s: float) -> None:
    """In a worker thread: lock PostgreSQL's sessions table from another connection."""
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        conn.execute("INSERT INTO sessions (id, title, user_id, created_at) VALUES ('locker', 'x', NULL, %s)", (T0,))
        trio.from_thread.run_sync(held.set)
        time.sleep(hold_s)  # a real client holding the lock (this thread, not the loop)


async def hold_lock(nursery: trio.Nursery, store_kind: str, tmp_path: Path, hold_s: float) -> None:
    """Lock the sessions table from another connection for ``hold_s``; return once held."""
    held = trio.Event()
    if store_kind == "sqlite":
        nursery.start_soon(trio.to_thread.run_sync, hold_write_lock, tmp_path / "data" / "navi.sqlite3", held, hold_s)
    else:
        nursery.start_soon(trio.to_thread.run_sync, hold_table_lock, store_kind, held, hold_s)
    await held.wait()


@databases
async def test_database_never_blocks_the_event_loop(store_kind: str, tmp_path: Path) -> None:
    """While a store call waits ~0.3 s on a lock, another trio task keeps running."""
    hold_s = 0.3
    with trio.fail_after(20):
        async with opened_store(store_kind, tmp_path) as store:
            ticks: list[float] = []
            async with trio.open_nursery() as nursery:
                await hold_lock(nursery, store_kind, tmp_path, hold_s)

                async def ticker() -> None:
                    while True:
                        ticks.append(trio.current_time())
                        await trio.sleep(0.01)

                nursery.start_soon(ticker)
                t0 = trio.current_time()
                await store.create_session("mine", "t", None)  # must wait for the lock
                t1 = trio.current_time()
                nursery.cancel_scope.cancel()
            during = [t for t in ticks if t0 < t < t1]
            # It really waited on the lock (else the test proves nothing) ...
            assert t1 - t0 >= hold_s * 0.6, t1 - t0
            # ... and the loop kept ticking all along (a blocked loop gives ~0 ticks).
            assert len(during) >= 8, (len(during), t1 - t0)
            assert {s.id for s in await store.list_sessions(None)} == {"locker", "mine"}


@databases
async def test_database_time_bound_honoured_while_locked(store_kind: str, tmp_path: Path) -> None:
    """A caller's deadline is honoured even while the database waits on a lock, and the
    abandoned call does not overlap the next one: SQLite's limiter holds until it ends;
    PostgreSQL's next call waits for the same lock, then both are in."""
    with trio.fail_after(20):
        async with opened_store(store_kind, tmp_path) as store:
            async with trio.open_nursery() as nursery:
                await hold_lock(nursery, store_kind, tmp_path, 0.5)
                t0 = trio.current_time()
                with trio.move_on_after(0.05) as scope:
                    await store.create_session("abandoned", "t", None)
                assert scope.cancelled_caught
                assert trio.current_time() - t0 < 0.3
                await store.create_session("next", "t", None)
            ids = {s.id for s in await store.list_sessions(None)}
            assert {"locker", "next"} <= ids


def test_memory_and_sqlite_share_the_interface() -> None:
    names = [n for n in vars(Store) if not n.startswith("_")]
    assert set(names) >= {"create_session", "begin_run", "save_answer", "list_messages", "close"}
    for impl in (MemoryStore, SqliteStore, PostgresStore):
        for n in names:
            assert callable(getattr(impl, n, None)), f"{impl.__name__} lacks {n}"


# -- PostgreSQL only -----------------------------------------------------------------------


def schema_version(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version FROM schema_version").fetchall()


async def test_postgres_processes_starting_at_once_migrate_once(database_url: str) -> None:
    """Eight stores open on one new database at the same moment (as processes would):
    every one opens, the schema is created once, and all of them work on it."""
    stores: list[PostgresStore] = []

    async def open_one() -> None:
        stores.append(await PostgresStore.open(database_url))

    with trio.fail_after(60):
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(open_one)
            assert len(stores) == 8
            for i, s in enumerate(stores):
                await s.create_session(f"s{i}", "t", None)
            assert len(await stores[0].list_sessions(None)) == 8
        finally:
            for s in stores:
                s.close()
    assert await trio.to_thread.run_sync(schema_version, database_url) == [(len(PG_MIGRATIONS),)]


async def test_postgres_database_from_a_newer_version_is_refused(database_url: str) -> None:
    newer = len(PG_MIGRATIONS) + 1

    def set_version() -> None:
        with psycopg.connect(database_url) as conn:
            conn.execute("UPDATE schema_version SET version = %s", (newer,))

    with trio.fail_after(20):
        async with await PostgresStore.open(database_url) as store:
            await store.create_session("s1", "kept", None)
        await trio.to_thread.run_sync(set_version)
        with pytest.raises(StoreError, match=rf"schema version {newer}, newer than"):
            await PostgresStore.open(database_url)
    assert await trio.to_thread.run_sync(schema_version, database_url) == [(newer,)]  # untouched


async def test_postgres_unreachable_at_start_names_the_server_never_the_password(
    postgres: PgServer, log_events: list[dict[str, Any]]
) -> None:
    closed_port = free_port()
    secret = "s3cret-Pa55"
    with trio.fail_after(30):
        with pytest.raises(StoreError) as refused:
            await PostgresStore.open(f"postgresql://navi:{secret}@127.0.0.1:{closed_port}/navi")
        message = str(refused.value)
        assert message.startswith(f"cannot use PostgreSQL at 127.0.0.1:{closed_port}/navi: "), message
        assert "refused" in message.lower(), message
        # A wrong password: the server answers, and says no (without echoing it).
        with pytest.raises(StoreError) as denied:
            await PostgresStore.open(postgres.url(password=secret))
        message = str(denied.value)
        assert message.startswith(f"cannot use PostgreSQL at 127.0.0.1:{postgres.port}/postgres: "), message
        assert "password authentication failed" in message, message
    for exc in (refused.value, denied.value):
        assert secret not in str(exc)
        assert exc.__cause__ is None and exc.__suppress_context__  # no chained psycopg error to print
    assert not any(secret in str(e) for e in log_events)


async def test_postgres_a_malformed_url_is_a_store_error() -> None:
    with trio.fail_after(10), pytest.raises(StoreError, match="NAVI_DATABASE_URL must look like"):
        await PostgresStore.open("postgresql://host:notaport:/x?=")


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PgServer]:
    """A PostgreSQL server of this module's own, to stop and start again."""
    with running_postgres() as server:
        yield server


async def test_postgres_down_then_back(own_postgres: PgServer, log_events: list[dict[str, Any]]) -> None:
    """Stopped: each call fails soon (within the pool's wait) with a StoreError naming
    PostgreSQL and its host, and ``unavailable`` says so; the outage is logged once.
    Started again: the store works again with no reopen, and says so in the log."""
    with own_postgres.database() as url:
        async with await PostgresStore.open(url, pool_timeout_s=1.0) as store:
            await warm_pool(store)
            await store.create_session("before", "t", None)
            run = new_run("before", "q")
            await store.begin_run(run)
            assert store.unavailable is None
            await trio.to_thread.run_sync(own_postgres.stop)
            try:
                t0 = trio.current_time()
                with trio.fail_after(10), pytest.raises(StoreError) as refused:
                    await store.save_answer(answer(run, "complete", "kept"))
                assert trio.current_time() - t0 < 3.0
                where = f"PostgreSQL at 127.0.0.1:{own_postgres.port}/postgres"
                assert str(refused.value).startswith(f"{where} is unavailable while saving the answer"), refused.value
                assert store.unavailable is not None and store.unavailable.startswith(where)
                assert not await store.ping()
                problem = await store.health()
                assert problem is not None and problem.startswith(where)
            finally:
                await trio.to_thread.run_sync(own_postgres.start)
            with trio.fail_after(30):
                while True:  # bounded by fail_after: the pool reconnects with a backoff
                    try:
                        await store.save_answer(answer(run, "complete", "kept"))
                        break
                    except StoreError:
                        await trio.sleep(0.2)
            assert store.unavailable is None
            assert await store.ping()
            assert await store.health() is None
            assert [m.content for m in await store.list_messages("before")] == ["q", "kept"]
            for _ in range(2 * POOL_SIZE):  # once one call works, no dead connection is left
                assert await store.get_session("nope") is None
    where = f"PostgreSQL at 127.0.0.1:{own_postgres.port}/postgres"
    outage = [(e["event"], e["database"]) for e in log_events if e["event"].startswith("store.database_")]
    assert outage == [("store.database_unavailable", where), ("store.database_back", where)]
    assert not any(PASSWORD in str(e) for e in log_events)


async def warm_pool(store: PostgresStore) -> None:
    """Make the pool hold all of its connections (four calls at once, each a while)."""
    async with trio.open_nursery() as nursery:
        for _ in range(POOL_SIZE):
            nursery.start_soon(store._call, "warming the pool", lambda c: c.execute("SELECT pg_sleep(0.2)"))


async def test_postgres_back_after_an_outage_the_next_call_works(own_postgres: PgServer) -> None:
    """PostgreSQL away for a few seconds while calls keep failing (as ``/healthz`` and the
    checkpoints make them), then back: the very next call works. psycopg_pool alone would
    retry its lost connections with a doubling delay (after 1, 3, 7, 15 ... s), so the
    first call after this outage would find no connection (and a longer outage, a longer
    wait: ``/healthz`` 503 with PostgreSQL up); the store has it give up a try within
    ``RECONNECT_TIMEOUT_S``, and the next call's wait makes a new one at once."""
    with own_postgres.database() as url, trio.fail_after(60):
        async with await PostgresStore.open(url) as store:  # the server's pool wait: 2 s
            await warm_pool(store)
            await trio.to_thread.run_sync(own_postgres.stop)
            try:
                down_until = trio.current_time() + 3.5  # the outage: calls fail all along
                while trio.current_time() < down_until:
                    assert not await store.ping()
            finally:
                await trio.to_thread.run_sync(own_postgres.start)
            assert await store.ping(), store.unavailable
            assert store.unavailable is None


async def test_postgres_restarted_while_idle_fails_no_call(own_postgres: PgServer) -> None:
    """PostgreSQL restarts while the pool's connections sit idle (no call noticed it):
    the first calls afterwards work, none of them fails on a dead connection."""
    with own_postgres.database() as url, trio.fail_after(60):
        async with await PostgresStore.open(url) as store:
            await warm_pool(store)
            await trio.to_thread.run_sync(own_postgres.stop)
            await trio.to_thread.run_sync(own_postgres.start)
            for i in range(2 * POOL_SIZE):
                await store.create_session(f"s{i}", "t", None)
            assert len(await store.list_sessions(None)) == 2 * POOL_SIZE


async def test_postgres_calls_after_close_are_store_errors(database_url: str) -> None:
    """A call that comes after ``close()`` (an abandoned worker, a request during
    shutdown) gets a StoreError saying so, and health reports it."""
    with trio.fail_after(20):
        store = await PostgresStore.open(database_url)
        store.close()
        with pytest.raises(StoreError, match=r"is unavailable while listing sessions: the store is closed"):
            await store.list_sessions(None)
        problem = await store.health()
        assert problem is not None and problem.endswith("the store is closed")


async def test_sqlite_closed_while_an_abandoned_query_runs_is_closed_by_that_query(tmp_path: Path) -> None:
    """A cancelled call's worker thread is abandoned, not stopped; closing the store under
    its running statement crashed the process (sqlite3 freed under another thread). The
    connection is now closed by the last thread using it."""
    store = await SqliteStore.open(tmp_path / "navi.sqlite3")
    entered, release = threading.Event(), threading.Event()

    def slow(c: sqlite3.Connection) -> int:
        entered.set()
        release.wait(10)
        (n,) = c.execute("SELECT COUNT(*) FROM sessions").fetchone()
        return int(n)

    with trio.move_on_after(0.2):
        await store._call("a slow query", slow)  # abandoned when the scope is cancelled
    assert entered.is_set()
    store.close()  # the query still runs: closing is left to it
    assert store._conn.execute("SELECT 1").fetchone() == (1,), "not closed under the query"
    release.set()
    with trio.fail_after(10):
        while True:
            try:
                store._conn.execute("SELECT 1")
            except sqlite3.ProgrammingError:
                break
            await trio.sleep(0.01)
    with pytest.raises(StoreError):
        await store.get_session("any")

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
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from navi_trio.errors import StoreError
from navi_trio.store import Answer, MemoryStore, NewRun, SqliteStore, Store
from navi_trio.store.postgres import PostgresStore

from .pg import open_test_store, store_target

T0 = "2026-01-01T00:00:00.000Z"


@pytest.fixture(params=["sqlite", "postgres", "memory"])
def target(request: pytest.FixtureRequest) -> str:
    return store_target(request)


@pytest.fixture
async def store(target: str, tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_test_store(target, tmp_path)
    try:
        yield s
    finally:
        s.close()


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


# -- SQLite only ---------------------------------------------------------------------------


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "navi.sqlite3"
    with trio.fail_after(10):
        async with await SqliteStore.open(path) as store:
            await store.create_session("s1", "kept", "alice")
            run = await play_run(store, "s1", "q1", "r1")
            await store.save_answer(
                answer(run, "complete", "r1", "th", [{"tool": "x", "args": {"a": 1}, "result": "ok", "success": True}])
            )
        async with await SqliteStore.open(path) as store:
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


async def test_sqlite_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """While a store call waits ~0.3 s on SQLite's lock, another trio task keeps running."""
    path = tmp_path / "navi.sqlite3"
    hold_s = 0.3
    with trio.fail_after(20):
        async with await SqliteStore.open(path) as store:
            held = trio.Event()
            ticks: list[float] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, hold_write_lock, path, held, hold_s)
                await held.wait()

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


async def test_sqlite_time_bound_honoured_while_locked(tmp_path: Path) -> None:
    """A caller's deadline is honoured even while SQLite waits on a lock, and the store
    stays strictly serialized: the next call waits for the abandoned one to finish."""
    path = tmp_path / "navi.sqlite3"
    with trio.fail_after(20):
        async with await SqliteStore.open(path) as store:
            held = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, hold_write_lock, path, held, 0.5)
                await held.wait()
                t0 = trio.current_time()
                with trio.move_on_after(0.05) as scope:
                    await store.create_session("abandoned", "t", None)
                assert scope.cancelled_caught
                assert trio.current_time() - t0 < 0.3
                # The next call runs only after the abandoned one (the limiter holds).
                await store.create_session("next", "t", None)
            ids = {s.id for s in await store.list_sessions(None)}
            assert {"locker", "next"} <= ids


def test_memory_and_sqlite_share_the_interface() -> None:
    names = [n for n in vars(Store) if not n.startswith("_")]
    assert set(names) >= {"create_session", "begin_run", "save_answer", "list_messages", "close"}
    for impl in (MemoryStore, SqliteStore, PostgresStore):
        for n in names:
            assert callable(getattr(impl, n, None)), f"{impl.__name__} lacks {n}"

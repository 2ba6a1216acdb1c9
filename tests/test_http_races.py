"""Races with DELETE, storage answers and keep-alive (issue 10, defect 8).

- An upload whose session is deleted while its body arrives answers 404 and leaves
  nothing on disk (CONTRACT section 2).
- A message whose session is being deleted starts no run that dies on the database's
  foreign key: the run ends as a deleted session's runs do, and nothing is logged as
  an error.
- An upload that storage cannot take answers 503, as sessions do, not 500.
- 401 and 413 answered before the body was read keep a pooled client working.

The races are held at the right point, not slept into: the upload's body stream waits on
an event, the database's write lock is held by a second SQLite connection.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from navi_trio.errors import SessionGone
from navi_trio.store import Store
from navi_trio.store.base import NewRun, utc_now
from navi_trio.store.sqlite import SqliteStore

from .helpers import open_server, script

MB = 1024 * 1024


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if not p.is_dir()) if root.exists() else []


async def held_body(first: bytes, rest: bytes, sent: trio.Event, release: trio.Event) -> AsyncIterator[bytes]:
    """An upload body that stops after ``first`` until ``release`` is set."""
    yield first
    sent.set()
    await release.wait()
    yield rest


# -- an upload racing DELETE ---------------------------------------------------------------


async def test_an_upload_whose_session_is_deleted_meanwhile_is_404_and_leaves_nothing(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path) as server:
            sid = await server.new_session()
            sent, release = trio.Event(), trio.Event()
            answers: list[httpx.Response] = []

            async def upload() -> None:
                body = held_body(b"a" * 1000, b"b" * 1000, sent, release)
                url = f"/sessions/{sid}/files"
                answers.append(await server.http.post(url, params={"name": "late.txt"}, content=body))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                await sent.wait()
                await trio.testing.wait_all_tasks_blocked()  # the server is reading the body
                assert (await server.http.delete(f"/sessions/{sid}")).status_code == 204
                release.set()
            assert answers[0].status_code == 404, answers[0].text
            assert answers[0].json() == {"detail": "Session not found"}
            assert files_under(tmp_path / "uploads") == []
            assert not any((tmp_path / "uploads").rglob(sid))  # not even its folder


async def test_an_upload_that_finishes_before_the_delete_is_removed_by_it(tmp_path: Path) -> None:
    """The other order: 201, then the DELETE takes the file with the session."""
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path) as server:
            sid = await server.new_session()
            r = await server.http.post(f"/sessions/{sid}/files", params={"name": "a.txt"}, content=b"x")
            assert r.status_code == 201
            assert len(files_under(tmp_path / "uploads")) == 1
            assert (await server.http.delete(f"/sessions/{sid}")).status_code == 204
            assert files_under(tmp_path / "uploads") == []


# -- a message racing DELETE ---------------------------------------------------------------


@contextlib.contextmanager
def write_lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Hold the database's write lock (a second connection, as another process would)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
    finally:
        conn.close()


async def test_a_message_racing_delete_ends_as_deleted_with_no_error_logged(
    tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    """The DELETE's write waits on the write lock; a message comes meanwhile and its run's
    first write (the user's message) queues behind the delete: it finds no session."""
    with trio.fail_after(20):
        async with open_server(store="sqlite", data_dir=tmp_path) as server:
            sid = await server.new_session()
            deleted: list[int] = []

            async def delete() -> None:
                deleted.append((await server.http.delete(f"/sessions/{sid}")).status_code)

            async def message() -> None:
                await c.send_message(script({"text": "x", "repeat": 1000, "delay": 0.05}))

            steps = [delete, message]
            async with server.connect(sid) as c:
                assert (await c.recv())["type"] == "session_sync"
                async with trio.open_nursery() as nursery:
                    with write_lock(tmp_path / "navi.sqlite3") as lock:
                        for step in steps:
                            nursery.start_soon(step)
                            await trio.testing.wait_all_tasks_blocked()  # it waits for the lock
                        assert server.registry.active(sid) is not None
                        lock.rollback()
                got = [await c.recv()]
                while got[-1]["type"] not in ("stream_end", "stream_stopped", "error"):
                    got.append(await c.recv())
                assert await c.until_closed() == 4004
            assert deleted == [204]
            assert got[0]["type"] == "stream_start"
            assert got[-1]["type"] == "stream_stopped" and got[-1]["reason"] == "deleted", got[-1]
            await server.no_run_left()
            assert (await server.http.get(f"/sessions/{sid}")).status_code == 404
            with contextlib.closing(sqlite3.connect(tmp_path / "navi.sqlite3")) as db:
                assert db.execute("SELECT COUNT(*) FROM messages WHERE session_id = ?", (sid,)).fetchone() == (0,)
    errors = [e for e in log_events if e.get("level") in ("error", "critical", "exception")]
    assert errors == []


async def test_a_message_after_the_delete_starts_no_run(tmp_path: Path) -> None:
    """The memory store refuses a deleted session's message as the database does."""
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path) as server:
            sid = await server.new_session()
            async with server.connect(sid) as c:
                assert (await c.recv())["type"] == "session_sync"
                await server.registry.store.delete_session(sid)  # as a DELETE's first step
                await c.send_message(script({"text": "hi"}))
                got = await c.until_terminal()
            assert got[-1]["type"] == "stream_stopped" and got[-1]["reason"] == "deleted", got
            await server.no_run_left()
            assert await server.registry.store.list_messages(sid) == []


# -- storage that cannot take an upload: 503 -------------------------------------------------


async def test_an_upload_storage_cannot_take_is_503(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path) as server:
            sid = await server.new_session()
            (tmp_path / "uploads").write_text("a file where the uploads folder should be")
            r = await server.http.post(f"/sessions/{sid}/files", params={"name": "a.txt"}, content=b"x")
            assert r.status_code == 503, r.text
            assert set(r.json()) == {"detail"}


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail (EFBIG), as on a full disk (ENOSPC)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


async def test_an_upload_on_a_full_disk_is_503_and_leaves_nothing(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path, max_upload_mb=8) as server:
            sid = await server.new_session()
            with file_size_limit(1 * MB):
                r = await server.http.post(f"/sessions/{sid}/files", params={"name": "big.bin"}, content=b"x" * 3 * MB)
            assert r.status_code == 503, r.text
            assert files_under(tmp_path / "uploads") == []  # not even the temporary file
            r = await server.http.post(f"/sessions/{sid}/files", params={"name": "big.bin"}, content=b"x" * 3 * MB)
            assert r.status_code == 201  # room again: the same upload goes in


# -- answers sent before the body was read: the pooled connection still works ----------------


async def read_response(stream: trio.SocketStream, buf: bytearray) -> tuple[bytes, dict[bytes, bytes]]:
    """One HTTP/1.1 response (status line, headers) from ``stream``; its body is skipped."""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError("the server closed the connection")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError("the server closed the connection")
        rest += chunk
    buf[:] = rest[length:]
    return status, headers


async def early_answer_then_next_request(host: str, port: int, request: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` with ``body`` on one connection, then a ``GET /healthz`` on the same
    connection unless the first answer said ``Connection: close``. Returns both status
    lines (the second is ``b"closed as announced"`` in that case)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        buf = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, request + body)
            first, headers = await read_response(stream, buf)
        if headers.get(b"connection", b"").lower() == b"close":
            return first, b"closed as announced"
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        second, _ = await read_response(stream, buf)
        return first, second


async def test_a_401_before_the_body_keeps_the_connection_or_says_close(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path, auth="required") as server:
            body = b"x" * 4 * MB
            head = f"POST /sessions/x/files?name=a HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            first, second = await early_answer_then_next_request(server.host, server.port, head.encode(), body)
            assert first.startswith(b"HTTP/1.1 401")
            assert second.startswith(b"HTTP/1.1 200")


async def test_a_413_over_what_is_drained_says_close(tmp_path: Path) -> None:
    """A declared body too large to read and drop: the answer closes the connection."""
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path, max_upload_mb=1) as server:
            sid = await server.new_session()
            declared = 1024 * MB  # never sent: the answer comes first
            head = f"POST /sessions/{sid}/files?name=a HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n"
            first, second = await early_answer_then_next_request(server.host, server.port, head.encode(), b"")
            assert first.startswith(b"HTTP/1.1 413")
            assert second == b"closed as announced"


async def test_a_401_before_the_body_keeps_a_pooled_client_working(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path, auth="required") as server:
            for _ in range(3):
                r = await server.http.post("/sessions/x/files", params={"name": "a"}, content=b"x" * 4 * MB)
                assert r.status_code == 401
                assert (await server.http.get("/healthz")).status_code == 200  # the same client, next request


async def test_a_413_before_the_body_keeps_a_pooled_client_working(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path, max_upload_mb=1) as server:
            sid = await server.new_session()
            for _ in range(3):
                r = await server.http.post(f"/sessions/{sid}/files", params={"name": "a"}, content=b"x" * 4 * MB)
                assert r.status_code == 413
                assert (await server.http.get(f"/sessions/{sid}")).status_code == 200


async def test_a_read_racing_a_delete_does_not_bring_the_session_back_into_the_cache(tmp_path: Path) -> None:
    """The upload's check after writing asks the store: a read that began before the
    DELETE must not put the deleted session back into the SQLite store's cache.

    The read's thread may finish before the delete starts (then there is no race), so
    the race is run on 20 sessions: it happens in most of them."""
    db = tmp_path / "navi.sqlite3"
    first = await SqliteStore.open(db)
    sids = [f"s{i}" for i in range(20)]
    for sid in sids:
        await first.create_session(sid, "t", None)
    first.close()
    store = await SqliteStore.open(db)  # a cold cache: each read goes to the database
    try:
        for sid in sids:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.get_session, sid)  # reads the row first (one thread at a time)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(store.delete_session, sid)
            assert store.cached_session(sid) is None, sid
            assert await store.get_session(sid) is None
    finally:
        store.close()


async def test_every_store_says_session_gone_for_a_run_of_a_deleted_session(any_store: Store) -> None:
    """What a run racing its session's DELETE meets in each store: not a storage fault
    (logged as an error) but :class:`SessionGone`, and nothing is written."""
    await any_store.create_session("kept", "t", None)
    await any_store.create_session("gone", "t", None)
    await any_store.delete_session("gone")
    runs = [NewRun(sid, uuid.uuid4().hex, "hi", uuid.uuid4().hex, utc_now()) for sid in ("kept", "gone")]
    with pytest.raises(SessionGone):
        await any_store.begin_runs(runs[1:])
    with pytest.raises(SessionGone):
        await any_store.begin_runs(runs)  # all or nothing
    assert await any_store.list_messages("kept") == []
    assert await any_store.list_messages("gone") == []
    assert await any_store.get_session("gone") is None

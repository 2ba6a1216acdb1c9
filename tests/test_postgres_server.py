"""The server on PostgreSQL (``NAVI_DATABASE_URL``), on a real PostgreSQL server.

``navi-trio serve`` in a subprocess: runs, a stop and the history, all kept in
PostgreSQL (read back with SQL and after a restart); an unreachable server is a startup
failure that names it. In process (``open_server``): PostgreSQL stopped in the middle of
a run and started again: the run ends with an ``error`` naming PostgreSQL, ``/healthz``
answers 503 while it is down, the answer is saved once it is back, and the server goes
on with no restart. Real clock only (subprocesses, a server, worker threads).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from navi_trio.messages import UPLOADS_UNREADABLE
from navi_trio.settings import Settings
from navi_trio.store.postgres import MIGRATIONS

from .helpers import assert_grammar, open_server, script, text_of
from .pg import PASSWORD, PgServer, free_port, running_postgres
from .test_cli import NAVI, STARTUP_S, clean_env, http_client, navi_serve, spawn, ws_connect
from .test_startup import assert_one_line_failure, run


async def poll(condition: Callable[[], Awaitable[bool]], what: str, tries: int = 150) -> None:
    """Until ``condition()`` holds, asking every 0.2 s: PostgreSQL coming back is outside
    the server, and asking is the only way to see it. Bounded: fails after ``tries``."""
    for _ in range(tries):
        if await condition():
            return
        await trio.sleep(0.2)
    raise AssertionError(f"never saw {what}")


def rows(url: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(url) as conn:
        return [
            (r[0], r[1], r[2])
            for r in conn.execute("SELECT role, status, content FROM messages ORDER BY ord").fetchall()
        ]


async def test_serve_on_postgres_streams_stops_and_keeps_the_history(tmp_path: Path, database_url: str) -> None:
    data = tmp_path / "data"
    env = clean_env(NAVI_DATABASE_URL=database_url, NAVI_GRACE_S="0.5")
    slow = json.dumps({"script": [{"text": "partial "}, {"tool": "t", "delay": 60}]})
    with trio.fail_after(2 * STARTUP_S + 40):
        async with spawn(navi_serve(data), env, tmp_path) as srv:
            url = await srv.wait_listening()
            host, port = srv.host_port
            async with http_client(url) as http:
                assert (await http.get("/healthz")).json() == {"status": "ok"}
                r = await http.post("/sessions", json={"title": "on postgres"})
                assert r.status_code == 201, r.text
                sid = r.json()["id"]
                async with ws_connect(host, port, f"/ws/sessions/{sid}") as c:
                    assert (await c.recv())["type"] == "session_sync"
                    await c.send_message(script({"text": "hello "}, {"text": "world"}))
                    done = await c.until_terminal()
                    assert_grammar(done)
                    assert (done[-1]["type"], text_of(done)) == ("stream_end", "hello world")
                    await c.send_message(slow)
                    got = await c.until("tool_started")
                    await c.send({"type": "stop"})
                    got += await c.until_terminal()
                assert_grammar(got)
                assert got[-1]["type"] == "stream_stopped" and got[-1]["reason"] == "user", got[-1]
                r = await http.get(f"/sessions/{sid}/messages")
                assert r.status_code == 200, r.text
                history = [(m["role"], m["status"], m["content"]) for m in r.json()]
            srv.signal(signal.SIGTERM)
            assert await srv.wait_exit(15) == 0, srv.output
        expected = [
            ("user", "complete", script({"text": "hello "}, {"text": "world"})),
            ("assistant", "complete", "hello world"),
            ("user", "complete", slow),
            ("assistant", "stopped", "partial "),
        ]
        assert history == expected
        # It is in PostgreSQL, not in a SQLite file under the data dir ...
        assert await trio.to_thread.run_sync(rows, database_url) == expected
        assert not (data / "navi.sqlite3").exists()
        assert PASSWORD not in srv.output
        # ... and a new process on a new data dir serves the same history.
        async with spawn(navi_serve(tmp_path / "elsewhere"), env, tmp_path) as srv:
            url = await srv.wait_listening()
            async with http_client(url) as http:
                r = await http.get(f"/sessions/{sid}")
                assert r.status_code == 200 and r.json()["title"] == "on postgres", r.text
                r = await http.get(f"/sessions/{sid}/messages")
                assert [(m["role"], m["status"], m["content"]) for m in r.json()] == expected
            srv.signal(signal.SIGINT)
            assert await srv.wait_exit(5) == 0, srv.output


async def test_three_processes_starting_at_once_on_a_new_database(tmp_path: Path, database_url: str) -> None:
    """Three ``navi-trio serve`` processes start at the same moment on one empty database:
    the migration runs once under its advisory lock, and every process starts and serves."""
    env = clean_env(NAVI_DATABASE_URL=database_url)
    with trio.fail_after(3 * STARTUP_S + 30):
        async with (
            spawn(navi_serve(tmp_path / "a"), env, tmp_path) as a,
            spawn(navi_serve(tmp_path / "b"), env, tmp_path) as b,
            spawn(navi_serve(tmp_path / "c"), env, tmp_path) as c,
        ):
            for srv in (a, b, c):
                url = await srv.wait_listening()
                async with http_client(url) as http:
                    r = await http.get("/healthz")
                    assert (r.status_code, r.json()) == (200, {"status": "ok"}), srv.output
                    assert (await http.post("/sessions", json={})).status_code == 201
            for srv in (a, b, c):
                srv.signal(signal.SIGTERM)
                assert await srv.wait_exit(15) == 0, srv.output

    def version_and_sessions() -> tuple[list[tuple[int]], int]:
        with psycopg.connect(database_url) as conn:
            versions = conn.execute("SELECT version FROM schema_version").fetchall()
            row = conn.execute("SELECT count(*) FROM sessions").fetchone()
            assert row is not None
            return versions, int(row[0])

    assert await trio.to_thread.run_sync(version_and_sessions) == ([(len(MIGRATIONS),)], 3)


async def test_serve_with_postgres_unreachable_fails_to_start_naming_it(tmp_path: Path) -> None:
    """One line naming the server (host, port, database), never the password; no URL."""
    port = free_port()
    secret = "Sup3r-secret"
    url = f"postgresql://navi:{secret}@127.0.0.1:{port}/navi"
    result = await run(navi_serve(tmp_path / "data"), tmp_path, NAVI_DATABASE_URL=url)
    line = assert_one_line_failure(result, f"cannot use PostgreSQL at 127.0.0.1:{port}/navi", "refused")
    assert secret not in line and secret.encode() not in result.stdout


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PgServer]:
    """A PostgreSQL server of this module's own, to stop and start again."""
    with running_postgres() as server:
        yield server


async def test_postgres_lost_mid_run_then_back(tmp_path: Path, own_postgres: PgServer) -> None:
    """PostgreSQL stops while a run streams: the next checkpoint fails, the run ends with
    an ``error`` naming PostgreSQL, ``/healthz`` answers 503 and history reads 503. It
    starts again: ``/healthz`` is 200, the refused answer (status ``error``, the text
    streamed so far) is saved by the registry's retry, and a new run works, all with no
    restart of the server."""
    settings = {"store": "sqlite", "checkpoint_s": 0.2, "save_timeout_s": 2.0, "data_dir": tmp_path}
    with own_postgres.database() as url, trio.fail_after(90):
        async with open_server(database_url=url, **settings) as server:
            sid = await server.new_session()
            async with server.connect(sid) as c:
                assert (await c.recv())["type"] == "session_sync"
                await c.send_message(script({"text": "w ", "repeat": 400, "delay": 0.05}))
                got = [await c.recv() for _ in range(6)]  # it streams
                assert got[0]["type"] == "stream_start"
                await trio.to_thread.run_sync(own_postgres.stop)
                try:
                    got += await c.until_terminal()
                    assert_grammar(got)
                    error = got[-1]
                    assert error["type"] == "error", error
                    where = f"PostgreSQL at 127.0.0.1:{own_postgres.port}/postgres"
                    assert error["message"].startswith(f"Storage error: {where} is unavailable"), error
                    assert PASSWORD not in error["message"]
                    streamed = text_of(got)
                    assert streamed.startswith("w w w")
                    r = await server.http.get("/healthz")
                    assert (r.status_code, r.json()) == (503, {"detail": "Storage is unavailable"})
                    r = await server.http.get(f"/sessions/{sid}/messages")
                    assert r.status_code == 503, r.text
                finally:
                    await trio.to_thread.run_sync(own_postgres.start)

                async def healthy() -> bool:
                    return (await server.http.get("/healthz")).status_code == 200

                async def answer_saved() -> bool:  # the registry retries it every checkpoint tick
                    r = await server.http.get(f"/sessions/{sid}/messages")
                    return r.status_code == 200 and len(r.json()) == 2

                await poll(healthy, "/healthz answering 200 again")
                await poll(answer_saved, "the refused answer saved")
                answer = (await server.http.get(f"/sessions/{sid}/messages")).json()[1]
                assert (answer["status"], answer["content"]) == ("error", streamed)
                await c.send_message(script({"text": "back again"}))
                after = await c.until_terminal()
                assert (after[-1]["type"], text_of(after)) == ("stream_end", "back again")
            await server.no_run_left()
            r = await server.http.get(f"/sessions/{sid}/messages")
            assert [(m["status"], m["content"]) for m in r.json()][2:] == [
                ("complete", script({"text": "back again"})),
                ("complete", "back again"),
            ]


async def test_uploads_while_postgres_is_down_are_refused_saying_so(tmp_path: Path, own_postgres: PgServer) -> None:
    """An upload's bytes go to PostgreSQL, and a message naming one asks it for the
    version this data dir must hold: while it is down, an upload is answered 503 and such
    a message with an error saying storage is unavailable (no run starts); once it is
    back, both work with no restart."""
    settings = {"store": "sqlite", "save_timeout_s": 2.0, "data_dir": tmp_path}
    with own_postgres.database() as url, trio.fail_after(90):
        async with open_server(database_url=url, **settings) as server:
            sid = await server.new_session()
            r = await server.http.post(f"/sessions/{sid}/files", params={"name": "a.txt"}, content=b"a")
            assert r.status_code == 201, r.text
            named = [r.json()]
            async with server.connect(sid) as c:
                assert (await c.recv())["type"] == "session_sync"
                await trio.to_thread.run_sync(own_postgres.stop)
                try:
                    r = await server.http.post(f"/sessions/{sid}/files", params={"name": "b.txt"}, content=b"b")
                    assert r.status_code == 503, r.text
                    await c.send_message("read it", files=named)
                    error = await c.until("error")
                    assert error == [{"type": "error", "message": UPLOADS_UNREADABLE}], error
                finally:
                    await trio.to_thread.run_sync(own_postgres.start)

                async def healthy() -> bool:
                    return (await server.http.get("/healthz")).status_code == 200

                await poll(healthy, "/healthz answering 200 again")
                await c.send_message("read it", files=named)
                after = await c.until_terminal()
                assert after[0]["type"] == "stream_start" and after[-1]["type"] == "stream_end", after
            r = await server.http.post(f"/sessions/{sid}/files", params={"name": "b.txt"}, content=b"b")
            assert r.status_code == 201, r.text


async def navi_users(env: dict[str, str], cwd: Path, *args: str) -> str:
    """``navi-trio users ...``; its stdout (it must succeed, and say which database it used)."""
    result = await trio.run_process([NAVI, "users", *args], env=env, cwd=cwd, capture_stdout=True, capture_stderr=True)
    assert bytes(result.stderr).decode().startswith("navi-trio: database PostgreSQL at 127.0.0.1:"), result.stderr
    return bytes(result.stdout).decode()


async def test_users_on_postgres_are_the_servers_users(tmp_path: Path, database_url: str) -> None:
    """``navi-trio users`` with ``NAVI_DATABASE_URL`` writes to PostgreSQL: the token it
    prints works on a server on another data dir, and stops working once revoked."""
    env = clean_env(NAVI_DATABASE_URL=database_url, NAVI_AUTH="required")
    with trio.fail_after(2 * STARTUP_S + 30):
        out = await navi_users(env, tmp_path, "--data-dir", str(tmp_path / "cli"), "add", "alice")
        token = out.strip().splitlines()[-1]
        assert token.startswith("nv_"), out
        assert "alice\tuser\tactive" in await navi_users(env, tmp_path, "list")
        async with spawn(navi_serve(tmp_path / "server"), env, tmp_path) as srv:
            url = await srv.wait_listening()
            async with http_client(url) as http:
                auth = {"Authorization": f"Bearer {token}"}
                assert (await http.get("/sessions", headers=auth)).status_code == 200
                assert (await http.get("/sessions")).status_code == 401
                await navi_users(env, tmp_path, "revoke", "alice")
                assert (await http.get("/sessions", headers=auth)).status_code == 401
            srv.signal(signal.SIGINT)
            assert await srv.wait_exit(5) == 0, srv.output
    assert not (tmp_path / "cli" / "navi.sqlite3").exists()


@pytest.mark.parametrize(
    ("env", "refusal"),
    [
        ({"NAVI_DATABASE_URL": "mysql://db/navi"}, "must be a postgresql:// URL"),
        ({"NAVI_DATABASE_URL": "postgresql://db/navi", "NAVI_STORE": "memory"}, "contradict"),
    ],
)
def test_database_url_is_checked_with_the_settings(env: dict[str, str], refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        Settings.from_env(env)


def test_database_url_is_never_in_the_settings_repr() -> None:
    settings = Settings.from_env({"NAVI_DATABASE_URL": f"postgresql://navi:{PASSWORD}@db/navi"})
    assert settings.database_url.endswith("@db/navi")
    assert PASSWORD not in repr(settings)

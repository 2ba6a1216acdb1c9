"""Separate ``navi-trio serve`` processes as one server (CONTRACT section 9): they share
one real redis-server (the test's own), one real PostgreSQL database and one data
directory on loopback; one of them
is killed (SIGKILL) or shut down (SIGTERM) while a run of it streams."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from .helpers import assert_grammar, script, text_of
from .redis_server import RedisServer, free_port, running_redis
from .test_cli import HYPERCORN, HYPERCORN_URL, NAVI, ServerProcess, clean_env, spawn, ws_connect
from .test_postgres_server import navi_users

LEASE_S = 1.0


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@contextlib.asynccontextmanager
async def navi(
    redis: RedisServer, database_url: str, data_dir: Path, lease_s: float = LEASE_S, **env: str
) -> AsyncIterator[ServerProcess]:
    """A ``navi-trio serve`` process of the cluster, listening; ``env`` adds ``NAVI_*``."""
    env = clean_env(
        NAVI_REDIS_URL=redis.url,
        NAVI_DATABASE_URL=database_url,
        NAVI_LEASE_S=str(lease_s),
        NAVI_GRACE_S="0.5",
        **env,
    )
    cmd = [NAVI, "serve", "--port", "0", "--data-dir", str(data_dir), "--agent", "scripted"]
    async with spawn(cmd, env, data_dir.parent) as srv:
        await srv.wait_listening()
        yield srv


async def new_session(srv: ServerProcess) -> str:
    async with httpx.AsyncClient(base_url=srv.url, trust_env=False) as http:
        r = await http.post("/sessions", json={})
        assert r.status_code == 201, r.text
        sid: str = r.json()["id"]
        return sid


async def history(srv: ServerProcess, sid: str) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=srv.url, trust_env=False) as http:
        r = await http.get(f"/sessions/{sid}/messages")
        assert r.status_code == 200, r.text
        body = r.json()
        messages: list[dict[str, object]] = body if isinstance(body, list) else body["messages"]
        return messages


async def test_a_killed_owners_run_ends_on_the_others_within_the_lease(
    own_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with navi(own_redis, database_url, data) as a, navi(own_redis, database_url, data) as b:
        sid = await new_session(a)
        async with ws_connect(*b.host_port, f"/ws/sessions/{sid}") as follower:
            assert (await follower.recv())["type"] == "session_sync"
            async with ws_connect(*a.host_port, f"/ws/sessions/{sid}") as sender:
                await sender.recv()
                await sender.send_message(script({"text": "k", "repeat": 10_000, "delay": 0.01}))
                with trio.fail_after(10):
                    got = await follower.until("stream_delta")
                    while len(got) < 150:  # over a second of text: a checkpoint has saved some
                        got.append(await follower.recv())
                a.signal(signal.SIGKILL)
                start = trio.current_time()
                with trio.fail_after(LEASE_S * 10):
                    got += await follower.until_terminal()
            ended_after = trio.current_time() - start
        assert got[-1]["type"] == "stream_stopped" and got[-1]["reason"] == "shutdown", got[-1]
        assert ended_after < LEASE_S * 3, ended_after
        assert_grammar(got)
        answer = (await history(b, sid))[-1]
        assert answer["status"] == "interrupted", answer
        assert answer["content"] and text_of(got).startswith(str(answer["content"]))


async def test_a_process_shut_down_drains_its_runs_and_the_others_serve_on(
    own_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with navi(own_redis, database_url, data) as a, navi(own_redis, database_url, data) as b:
        sid = await new_session(a)
        async with ws_connect(*b.host_port, f"/ws/sessions/{sid}") as follower:
            await follower.recv()
            async with ws_connect(*a.host_port, f"/ws/sessions/{sid}") as sender:
                await sender.recv()
                await sender.send_message(script({"text": "t", "repeat": 10_000, "delay": 0.01}))
                with trio.fail_after(10):
                    await follower.until("stream_delta")
                a.signal(signal.SIGTERM)
                with trio.fail_after(15):
                    ended = await follower.until_terminal()
                    assert await a.wait_exit(15) == 0, a.output
            assert ended[-1]["type"] == "stream_stopped" and ended[-1]["reason"] == "shutdown"
            # The other process serves on: the same session, a new run, to its end.
            await follower.send_message(script({"text": "ok ", "repeat": 3}))
            with trio.fail_after(10):
                after = await follower.until_terminal()
            assert after[-1]["type"] == "stream_end" and text_of(after) == "ok " * 3
        assert (await history(b, sid))[1]["status"] == "interrupted"


async def test_an_unreachable_redis_at_startup_is_a_one_line_startup_failure(database_url: str, tmp_path: Path) -> None:
    env = clean_env(NAVI_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", NAVI_DATABASE_URL=database_url)
    cmd = [NAVI, "serve", "--port", "0", "--data-dir", str(tmp_path / "data")]
    async with spawn(cmd, env, tmp_path) as srv:
        assert await srv.wait_exit(STARTUP_S) == 1, srv.output
    assert "Redis is unreachable" in srv.output, srv.output
    assert "listening on" not in srv.output


async def test_redis_without_a_postgresql_database_is_refused_with_a_line_saying_so(tmp_path: Path) -> None:
    env = clean_env(NAVI_REDIS_URL="redis://127.0.0.1:6379/0")
    cmd = [NAVI, "serve", "--port", "0", "--data-dir", str(tmp_path / "data")]
    async with spawn(cmd, env, tmp_path) as srv:
        assert await srv.wait_exit(STARTUP_S) != 0, srv.output
    assert "NAVI_REDIS_URL needs a PostgreSQL NAVI_DATABASE_URL" in srv.output, srv.output
    assert "listening on" not in srv.output


STARTUP_S = 30


async def test_a_revocation_by_the_cli_closes_the_users_connections_on_every_process(
    own_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """``navi-trio users revoke`` (a third process, on the same PostgreSQL) closes alice's
    sockets on both servers with 4003, and her token stops working on both."""
    env = clean_env(NAVI_DATABASE_URL=database_url, NAVI_AUTH="required")
    out = await navi_users(env, tmp_path, "add", "alice")
    token = out.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {token}"}
    data = tmp_path / "data"
    async with (
        navi(own_redis, database_url, data, NAVI_AUTH="required") as a,
        navi(own_redis, database_url, data, NAVI_AUTH="required") as b,
    ):
        async with httpx.AsyncClient(base_url=a.url, trust_env=False) as http:
            r = await http.post("/sessions", json={}, headers=auth)
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
        path = f"/ws/sessions/{sid}?token={token}"
        async with ws_connect(*a.host_port, path) as on_a, ws_connect(*b.host_port, path) as on_b:
            assert (await on_a.recv())["type"] == "session_sync"
            assert (await on_b.recv())["type"] == "session_sync"
            await navi_users(env, tmp_path, "revoke", "alice")
            with trio.fail_after(10):
                assert await on_a.until_closed() == 4003
                assert await on_b.until_closed() == 4003
        for srv in (a, b):
            async with httpx.AsyncClient(base_url=srv.url, trust_env=False) as http:
                assert (await http.get("/sessions", headers=auth)).status_code == 401


async def test_a_rolling_restart_the_clients_of_the_stopped_process_reconnect_elsewhere_and_resume(
    own_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """A run plays on b; a client follows it on a; a is shut down (SIGTERM): the client is
    closed with 1012 and resumes on b by ``run_id`` and ``after``, missing nothing."""
    data = tmp_path / "data"
    async with navi(own_redis, database_url, data) as a, navi(own_redis, database_url, data) as b:
        sid = await new_session(b)
        async with ws_connect(*b.host_port, f"/ws/sessions/{sid}") as sender:
            await sender.recv()
            async with ws_connect(*a.host_port, f"/ws/sessions/{sid}") as on_a:
                assert (await on_a.recv())["type"] == "session_sync"
                await sender.send_message(script({"text": "r", "repeat": 200, "delay": 0.01}))
                with trio.fail_after(10):
                    seen = await on_a.until("stream_delta")
                    while len(seen) < 20:
                        seen.append(await on_a.recv())
                a.signal(signal.SIGTERM)
                with trio.fail_after(15):
                    code = await on_a.until_closed()
            assert code == 1012, "Server restarting: reconnect elsewhere"
            assert await a.wait_exit(15) == 0, a.output
            run_id = seen[0]["run_id"]
            after = max(e["seq"] for e in seen if "seq" in e)
            async with ws_connect(*b.host_port, f"/ws/sessions/{sid}?run_id={run_id}&after={after}") as resumed:
                with trio.fail_after(15):
                    rest = await resumed.until_terminal()
            with trio.fail_after(15):
                whole = await sender.until_terminal()
        assert rest[0]["type"] == "stream_start" and rest[0]["run_id"] == run_id
        assert rest[-1]["type"] == "stream_end", "the run went on on b"
        assert text_of(seen) + text_of(rest) == text_of(whole) == "r" * 200, "nothing missed, nothing twice"


async def test_hypercorn_workers_are_one_server(own_redis: RedisServer, database_url: str, tmp_path: Path) -> None:
    """``hypercorn --workers 2`` with Redis and PostgreSQL: the workers share the socket,
    so each new connection lands on either; whichever a follower, a sender and a rival
    sender land on, the follower sees the run live and the session has exactly one run.
    (Without the cluster, half of these connections would see another server.)"""
    port = free_port()
    env = clean_env(
        NAVI_REDIS_URL=own_redis.url,
        NAVI_DATABASE_URL=database_url,
        NAVI_DATA_DIR=str(tmp_path / "data"),
        NAVI_PORT=str(port),
        NAVI_GRACE_S="0.5",
    )
    cmd = [HYPERCORN, "--workers", "2", "--config", "python:navi_trio.hypercorn_conf", "navi_trio.asgi:app"]
    async with spawn(cmd, env, tmp_path, ready=HYPERCORN_URL) as srv:
        url = await srv.wait_listening()
        host, port_ = url.removeprefix("http://").rsplit(":", 1)
        for i in range(8):  # bounded: sessions, each over new connections
            async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
                r = await http.post("/sessions", json={})
                assert r.status_code == 201, r.text
                sid = r.json()["id"]
            path = f"/ws/sessions/{sid}"
            async with (
                ws_connect(host, int(port_), path) as follower,
                ws_connect(host, int(port_), path) as sender,
                ws_connect(host, int(port_), path) as rival,
            ):
                for c in (follower, sender, rival):
                    assert (await c.recv())["type"] == "session_sync"
                await sender.send_message(script({"text": f"w{i} ", "repeat": 20, "delay": 0.02}))
                with trio.fail_after(20):
                    first = await follower.until("stream_delta")  # the run plays, seen live
                    await rival.send_message(script({"text": "rival"}))
                    refused = await rival.until("error")
                    seen = first + await follower.until_terminal()
                assert "already running" in refused[-1]["message"], refused[-1]
                assert seen[-1]["type"] == "stream_end"
                assert text_of(seen) == f"w{i} " * 20, "one run, followed live from its start"

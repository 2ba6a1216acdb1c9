"""Two navi-trio servers as one (CONTRACT section 9): real hypercorn servers on loopback
sharing one real redis-server (the test's own) and one real PostgreSQL database.

Each test that speaks only HTTP and WebSocket runs twice: with both servers in this
test's process (each with its own Redis connection, registry and nursery, as two
processes would have; a test may then look inside), and as two separate
``navi-trio serve`` processes (``processes``). ``tests/test_cluster_processes.py`` kills
and stops such processes.
"""

from __future__ import annotations

import contextlib
import gc
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import psycopg
import pytest
import trio

from navi_trio.store.base import utc_now

from .helpers import Client, Server, assert_grammar, open_server, script, text_of
from .pg import server_settings
from .redis_server import RedisServer, running_redis
from .test_auth import add_user
from .test_cli import NAVI, ServerProcess, clean_env, spawn, ws_connect
from .test_metrics import runs, scrape, scrape_until, value

# coredis leaves the anyio memory streams of a connection attempt that failed unclosed
# (collected later with a ResourceWarning): its own leak, not ours, and only on failures.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@attrs.define(eq=False)
class ServeProcess:
    """A ``navi-trio serve`` process, with what a test of the contract uses of a
    :class:`~tests.helpers.Server`: an HTTP client, WebSockets, new sessions."""

    proc: ServerProcess
    http: httpx.AsyncClient

    async def new_session(self, title: str | None = None) -> str:
        r = await self.http.post("/sessions", json={} if title is None else {"title": title})
        assert r.status_code == 201, r.text
        sid: str = r.json()["id"]
        return sid

    @contextlib.asynccontextmanager
    async def connect(self, session_id: str, query: str = "") -> AsyncIterator[Client]:
        path = f"/ws/sessions/{session_id}" + (f"?{query}" if query else "")
        async with ws_connect(*self.proc.host_port, path) as client:
            yield client


@contextlib.asynccontextmanager
async def serve_process(env: dict[str, str], data_dir: Path) -> AsyncIterator[ServeProcess]:
    cmd = [NAVI, "serve", "--port", "0", "--data-dir", str(data_dir), "--agent", "scripted"]
    async with spawn(cmd, env, data_dir.parent) as proc:
        await proc.wait_listening()
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False, timeout=30) as http:
            yield ServeProcess(proc, http)


#: How the two servers run: in this test's process, or as two ``navi-trio serve``.
KINDS = ("servers", "processes")


@contextlib.asynccontextmanager
async def two_servers(
    redis: RedisServer,
    database_url: str,
    data_dir: Path,
    lease_s: float = 10.0,
    kind: str = "servers",
    **settings: Any,
) -> AsyncIterator[tuple[Any, Any]]:
    """Two servers on ``redis`` and ``database_url``, as ``kind`` says; ``settings``
    override the defaults (of servers in this process)."""
    if kind == "processes":
        assert not settings, "processes take the defaults"
        env = clean_env(
            NAVI_REDIS_URL=redis.url,
            NAVI_DATABASE_URL=database_url,
            NAVI_LEASE_S=str(lease_s),
            NAVI_GRACE_S="1",
            NAVI_SAVE_TIMEOUT_S="2",
        )
        async with serve_process(env, data_dir) as pa, serve_process(env, data_dir) as pb:
            yield pa, pb
        return
    common = {
        **server_settings(database_url, data_dir),
        "redis_url": redis.url,
        "lease_s": lease_s,
        "grace_s": 1.0,
        **settings,
    }
    async with open_server(**common) as a, open_server(**common) as b:
        yield a, b


@pytest.mark.parametrize("kind", KINDS)
async def test_a_run_is_followed_live_from_the_other_server(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    async with two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b):
        sid = await a.new_session()
        async with b.connect(sid) as follower, a.connect(sid) as sender:
            assert (await follower.recv())["type"] == "session_sync"
            assert (await sender.recv())["type"] == "session_sync"
            with trio.fail_after(10):
                await sender.send_message(script({"text": "ab", "repeat": 20, "delay": 0.01}))
                sent = await sender.until_terminal()
                seen = await follower.until_terminal()
        assert_grammar(seen)
        assert text_of(seen) == text_of(sent) == "ab" * 20
        assert seen[0]["run_id"] == sent[0]["run_id"]


@pytest.mark.parametrize("kind", KINDS)
async def test_attach_and_resume_by_seq_on_the_other_server(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    async with two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b):
        sid = await a.new_session()
        async with a.connect(sid) as sender:
            await sender.recv()
            await sender.send_message(script({"text": "x", "repeat": 100, "delay": 0.02}))
            with trio.fail_after(10):
                first = await sender.until("stream_delta")
            run_id = first[0]["run_id"]
            async with b.connect(sid) as attached:
                with trio.fail_after(10):
                    got = await attached.until("replay_end")
                    for _ in range(5):
                        got.append(await attached.recv())
            types = [e["type"] for e in got]
            assert types[:2] == ["stream_start", "replay_start"]
            assert got[0]["run_id"] == run_id
            seen = max(e["seq"] for e in got if "seq" in e)
            async with b.connect(sid, f"run_id={run_id}&after={seen}") as resumed:
                with trio.fail_after(10):
                    again = await resumed.until_terminal()
            assert [e["type"] for e in again[:2]] == ["stream_start", "replay_start"]
            seqs = [e["seq"] for e in again if "seq" in e]
            assert seqs[0] == 1 and seqs[1] > seen, seqs[:3]  # stream_start, then what came after `seen`
            assert_grammar([e for e in got + again[1:] if e["type"] not in ("replay_start", "replay_end")])
            assert text_of(got) + text_of(again) == "x" * 100


@contextlib.asynccontextmanager
async def long_run(server: Server) -> AsyncIterator[tuple[str, Client]]:
    """A new session on ``server`` with a long run streaming (its first delta is out),
    and the client that sent it."""
    sid = await server.new_session()
    async with server.connect(sid) as sender:
        await sender.recv()
        await sender.send_message(script({"text": "y", "repeat": 1000, "delay": 0.02}))
        with trio.fail_after(10):
            await sender.until("stream_delta")
        yield sid, sender


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stop_asked_on_the_other_server_answers_once_the_answer_is_saved(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    async with two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b), long_run(a) as (sid, sender):
        with trio.fail_after(10):
            r = await b.http.post(f"/sessions/{sid}/stop")
        assert r.status_code == 200 and r.json()["ok"] is True
        # Answered only now: the run's answer is in the history, stopped, on either server.
        for srv in (a, b):
            history = (await srv.http.get(f"/sessions/{sid}/messages")).json()
            answer = history[-1] if isinstance(history, list) else history["messages"][-1]
            assert answer["status"] == "stopped", answer
        with trio.fail_after(10):
            seen = await sender.until_terminal()
        assert seen[-1]["type"] == "stream_stopped" and seen[-1]["reason"] == "user"
        r = await b.http.post(f"/sessions/{sid}/stop")
        assert r.json()["ok"] is False  # nothing runs any more, cluster-wide


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stop_on_the_other_server_of_a_run_already_over_finds_no_run(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    """As in one process: a run whose terminal event is out is over, not stopped. The stop
    waits for its answer to be saved (held here by a lock on the messages table, until
    the server's save gives up), then answers that nothing runs."""
    async with two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b):
        sid = await a.new_session()
        async with a.connect(sid) as sender:
            await sender.recv()
            await sender.send_message(script({"text": "a"}, {"text": "b", "repeat": 2, "delay": 0.5}))
            with trio.fail_after(10):
                await sender.until("stream_delta")  # its user message is saved
            lock = await trio.to_thread.run_sync(psycopg.connect, database_url)
            try:
                await trio.to_thread.run_sync(lock.execute, "LOCK TABLE messages IN EXCLUSIVE MODE")
                with trio.fail_after(10):
                    seen = await sender.until_terminal()
                assert seen[-1]["type"] == "stream_end"
                with trio.fail_after(10):
                    r = await b.http.post(f"/sessions/{sid}/stop")
            finally:
                await trio.to_thread.run_sync(lock.close)
        assert r.status_code == 200
        assert r.json() == {"ok": False, "reason": "no active run"}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_delete_on_the_other_server_stops_the_run_and_closes_its_followers(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    async with two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b), long_run(a) as (sid, sender):
        with trio.fail_after(10):
            r = await b.http.delete(f"/sessions/{sid}")
            assert r.status_code == 204
            seen = await sender.until_terminal()
            code = await sender.until_closed()
        assert seen[-1]["type"] == "stream_stopped" and seen[-1]["reason"] == "deleted"
        assert code == 4004


@pytest.mark.parametrize("kind", KINDS)
async def test_two_messages_racing_on_two_servers_make_exactly_one_run(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    async with two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b):
        for _ in range(5):
            sid = await a.new_session()
            async with a.connect(sid) as ca, b.connect(sid) as cb:
                await ca.recv()
                await cb.recv()
                content = script({"text": "r", "repeat": 5, "delay": 0.01})
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ca.send_message, content)
                    nursery.start_soon(cb.send_message, content)
                with trio.fail_after(10):
                    got_a = await ca.until_terminal()
                    got_b = await cb.until_terminal()
                starts = {e["run_id"] for e in got_a + got_b if e["type"] == "stream_start"}
                errors = [e for e in ca.received + cb.received if e["type"] == "error" and "seq" not in e]
                assert len(starts) == 1, starts
                assert len(errors) == 1 and "already" in errors[0]["message"].lower(), errors


@pytest.mark.parametrize("kind", KINDS)
async def test_healthz_answers_503_while_redis_is_down_and_200_once_it_is_back(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    async def health(srv: Server) -> int:
        return (await srv.http.get("/healthz")).status_code

    async with two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b):
        assert await health(a) == 200 and await health(b) == 200
        own_redis.stop()
        with trio.fail_after(10):
            while await health(a) != 503 or await health(b) != 503:  # noqa: ASYNC110  # redis-server's state
                await trio.sleep(0.02)
        r = await a.http.get("/healthz")
        assert "Redis" in r.text, r.text
        own_redis.start()
        with trio.fail_after(10):
            while await health(a) != 200 or await health(b) != 200:  # noqa: ASYNC110
                await trio.sleep(0.02)
        # Recovered with no restart: a run streams across the two servers again.
        sid = await a.new_session()
        async with b.connect(sid) as follower, a.connect(sid) as sender:
            await follower.recv()
            await sender.recv()
            await sender.send_message(script({"text": "back", "repeat": 2}))
            with trio.fail_after(10):
                seen = await follower.until_terminal()
        assert text_of(seen) == "backback"
    gc.collect()  # coredis's streams of the failed reconnects warn now, under this module's filter


@pytest.mark.parametrize("kind", KINDS)
async def test_enqueue_and_interrupt_asked_on_the_other_server(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    async with two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b), long_run(a) as (sid, sender):
        async with b.connect(sid) as other:
            with trio.fail_after(10):
                first = await other.until("replay_end")  # attached to the run that plays on a
                await other.send_message(script({"text": "queued ", "repeat": 2}), if_running="enqueue")
                await other.send_message(script({"text": "now ", "repeat": 2}), if_running="interrupt")
                # The interrupt goes before the queued message and stops the first run.
                stopped = await other.until_terminal()
                assert stopped[-1]["type"] == "stream_stopped" and stopped[-1]["reason"] == "user"
                second = await other.until_terminal()
                third = await other.until_terminal()
        assert first[0]["type"] == "stream_start"
        assert text_of(second) == "now " * 2 and second[-1]["type"] == "stream_end"
        assert text_of(third) == "queued " * 2 and third[-1]["type"] == "stream_end"
        runs = {e["run_id"] for e in second + third if e["type"] == "stream_start"}
        assert len(runs) == 2
        with trio.fail_after(10):
            seen_on_a = [await sender.until_terminal() for _ in range(3)]
        assert [text_of(r) for r in seen_on_a[1:]] == ["now " * 2, "queued " * 2]


async def test_a_revocation_closes_the_users_connections_on_every_server(
    own_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    common = {**server_settings(database_url, tmp_path), "redis_url": own_redis.url, "auth": "required"}
    async with open_server(**common) as a, open_server(**common) as b:
        store = a.registry.store
        alice, token = await add_user(store, "alice")
        sid = (await store.create_session(uuid.uuid4().hex, "alice's", alice.id)).id
        async with b.connect(sid, f"token={token}") as on_b, a.connect(sid, f"token={token}") as on_a:
            assert (await on_b.recv())["type"] == "session_sync"
            assert (await on_a.recv())["type"] == "session_sync"
            assert await store.revoke_user("alice", utc_now()) is not None  # written through a
            with trio.fail_after(10):
                assert await on_b.until_closed() == 4003
                assert await on_a.until_closed() == 4003


async def test_a_server_checkpoints_its_own_runs_while_it_mirrors_anothers(
    own_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    async with (
        two_servers(own_redis, database_url, tmp_path) as (a, b),
        long_run(a) as (sid_a, _),
        b.connect(sid_a) as mirror_on_b,
        long_run(b) as (sid_b, _),
    ):
        with trio.fail_after(10):
            await mirror_on_b.until("replay_end")
            [own] = [r for r in b.registry.runs if r.session_id == sid_b]
            while not own.checkpointed:  # noqa: ASYNC110  # bounded: the checkpoint runs every 0.5 s
                await trio.sleep(0.05)
        assert (await b.http.get("/healthz")).status_code == 200


@pytest.mark.parametrize("kind", KINDS)
async def test_redis_lost_ends_the_run_with_an_error_naming_it_on_every_server_and_messages_are_refused(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    async with (
        two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b),
        long_run(a) as (sid, sender),
        b.connect(sid) as follower,
    ):
        with trio.fail_after(10):
            await follower.until("replay_end")
        own_redis.stop()
        with trio.fail_after(10):
            on_a = await sender.until_terminal()
            on_b = await follower.until_terminal()
        for seen in (on_a, on_b):
            assert seen[-1]["type"] == "error" and "Redis" in seen[-1]["message"], seen[-1]
        await follower.send_message(script({"text": "meanwhile"}))
        with trio.fail_after(10):
            refused = await follower.until("error")
        assert "Redis" in refused[-1]["message"] and "seq" not in refused[-1]
        own_redis.start()
        with trio.fail_after(10):
            while (await b.http.get("/healthz")).status_code != 200:  # noqa: ASYNC110  # redis-server's state
                await trio.sleep(0.02)
        await follower.send_message(script({"text": "again"}))
        with trio.fail_after(10):
            after = await follower.until_terminal()
        assert after[-1]["type"] == "stream_end" and text_of(after) == "again"
    gc.collect()  # coredis's streams of the failed reconnects warn now, under this module's filter


@pytest.mark.parametrize("kind", KINDS)
async def test_each_server_counts_the_runs_it_plays_and_what_waits_behind_them(
    own_redis: RedisServer, database_url: str, tmp_path: Path, kind: str
) -> None:
    async with two_servers(own_redis, database_url, tmp_path, kind=kind) as (a, b), long_run(a) as (sid, sender):
        async with b.connect(sid) as other:
            await other.recv()
            await other.send_message(script({"text": "queued"}), if_running="enqueue")
            await scrape_until(a, lambda s: value(s, "navi_messages_queued") == 1)
            assert value(await scrape(b), "navi_messages_queued") == 0, "b plays no run"
            r = await b.http.post(f"/sessions/{sid}/stop")
            assert r.json()["ok"] is True
            with trio.fail_after(10):
                await sender.until_terminal()  # stopped
                await sender.until_terminal()  # the queued message's run, played by a
        on_a = await scrape_until(a, lambda s: runs(s, "complete") == 1 and value(s, "navi_messages_queued") == 0)
        assert runs(on_a, "stopped") == 1
        on_b = await scrape(b)
        assert runs(on_b, "stopped") == runs(on_b, "complete") == 0, "each run is counted once, by its player"

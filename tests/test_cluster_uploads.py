"""Uploads across a cluster (CONTRACT section 9: "uploads readable by the run whichever
process took them"): two real hypercorn servers with different data dirs, as two hosts
with no shared disk, sharing one real redis-server and one real PostgreSQL database.

The runs are played by the ``openai`` agent against the fake model server (the edge),
whose scripted tool calls make the agent's real ``list_files`` and ``read_file`` tools
read the session's files on the server that plays the run.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from navi_trio import app as app_module
from navi_trio import uploads

from .fake_openai import NEVER, FakeOpenAI, open_fake_openai, text_reply, tool_reply
from .helpers import Client, Server, assert_grammar, open_server, run_events
from .pg import server_settings
from .redis_server import RedisServer, running_redis

pytestmark = pytest.mark.filterwarnings(  # coredis's own leak on failed reconnects (see test_cluster_servers)
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)

Events = list[dict[str, Any]]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as f:
        yield f


@contextlib.asynccontextmanager
async def two_hosts(
    redis: RedisServer, database_url: str, tmp_path: Path, fake: FakeOpenAI
) -> AsyncIterator[tuple[Server, Server]]:
    """Servers ``a`` and ``b``, each with its own data dir (``tmp_path/a``, ``tmp_path/b``)."""

    def settings(name: str) -> dict[str, Any]:
        return {
            **server_settings(database_url, tmp_path / name),
            "redis_url": redis.url,
            "grace_s": 1.0,
            "agent": "openai",
            "openai_base_url": fake.base_url,
            "openai_api_key": "sk-test",
            "openai_model": "fake-model",
        }

    async with open_server(**settings("a")) as a, open_server(**settings("b")) as b:
        yield a, b


async def upload(server: Server, sid: str, name: str, body: bytes) -> dict[str, str]:
    r = await server.http.post(f"/sessions/{sid}/files", params={"name": name}, content=body)
    assert r.status_code == 201, r.text
    got: dict[str, str] = r.json()
    return got


def tool_results(events: Events) -> list[tuple[str, bool, str]]:
    return [(e["tool"], e["success"], e["result"]) for e in run_events(events) if e["type"] == "tool_call"]


def copies(data_dir: Path, sid: str) -> list[str]:
    folder = uploads.session_dir(data_dir, None, sid)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def rows(database_url: str, sid: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM uploads WHERE session_id = %s", (sid,)).fetchone()
    assert row is not None
    return int(row[0])


async def synced(c: Client) -> None:
    assert (await c.recv())["type"] == "session_sync"


async def test_a_file_uploaded_on_one_host_is_read_by_a_run_on_the_other(
    own_redis: RedisServer, database_url: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    notes, other = b"line one\n\x00\xff binary too", b"not named, still listed"
    fake.script(
        tool_reply(
            ("c1", "list_files", "{}"),
            ("c2", "read_file", '{"name": "notes.txt"}'),
            ("c3", "read_file", '{"name": "other.txt"}'),
        ),
        text_reply("read them"),
    )
    async with two_hosts(own_redis, database_url, tmp_path, fake) as (a, b):
        sid = await a.new_session()
        named = await upload(a, sid, "notes.txt", notes)
        await upload(a, sid, "other.txt", other)
        assert copies(tmp_path / "b", sid) == []  # nothing shared on disk
        async with b.connect(sid) as c:
            await synced(c)
            with trio.fail_after(15):
                await c.send_message("read my files", files=[named])
                got = await c.until_terminal()
    assert_grammar(got)
    assert got[-1]["type"] == "stream_end", got[-1]
    assert tool_results(got) == [
        ("list_files", True, "notes.txt\nother.txt"),
        ("read_file", True, notes.decode("utf-8", errors="replace")),
        ("read_file", True, other.decode()),
    ]
    assert copies(tmp_path / "b", sid) == ["notes.txt", "other.txt"]
    assert (uploads.session_dir(tmp_path / "b", None, sid) / "notes.txt").read_bytes() == notes


async def test_a_message_queued_on_one_host_reads_its_files_on_the_host_that_plays_it(
    own_redis: RedisServer, database_url: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    """The run on ``a`` is interrupted by a message sent to ``b`` naming a file uploaded
    to ``b``: ``a`` plays it (it holds the session) and reads the file from its own disk."""
    fake.script(NEVER, tool_reply(("c1", "read_file", '{"name": "notes.txt"}')), text_reply("read it"))
    async with two_hosts(own_redis, database_url, tmp_path, fake) as (a, b):
        sid = await a.new_session()
        async with a.connect(sid) as on_a, b.connect(sid) as on_b:
            await synced(on_a)
            await synced(on_b)
            with trio.fail_after(15):
                await on_a.send_message("wait forever")
                await fake.wait_requests(1)  # the first run plays, on a
                await on_b.until("stream_start")
                named = await upload(b, sid, "notes.txt", b"uploaded to b")
                assert copies(tmp_path / "a", sid) == []
                await on_b.send_message("read it", files=[named], if_running="interrupt")
                stopped = await on_b.until_terminal()
                second = await on_b.until_terminal()
    assert stopped[-1]["type"] == "stream_stopped", stopped[-1]
    assert second[-1]["type"] == "stream_end", second[-1]
    assert tool_results(second) == [("read_file", True, "uploaded to b")]
    assert copies(tmp_path / "a", sid) == ["notes.txt"]  # under a's own data dir


async def test_a_delete_on_the_other_host_removes_the_uploads_everywhere(
    own_redis: RedisServer, database_url: str, tmp_path: Path, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gone from the database and from the deleting host's disk at once; from the other
    host's disk at its next sweep (every ``UPLOAD_SWEEP_S``, shortened here)."""
    monkeypatch.setattr(app_module, "UPLOAD_SWEEP_S", 0.05)
    fake.script(text_reply("seen"))
    async with two_hosts(own_redis, database_url, tmp_path, fake) as (a, b):
        sid = await a.new_session()
        named = await upload(a, sid, "notes.txt", b"mine")
        async with b.connect(sid) as c:
            await synced(c)
            with trio.fail_after(15):
                await c.send_message("see it", files=[named])
                await c.until_terminal()
        assert copies(tmp_path / "b", sid) == ["notes.txt"] and rows(database_url, sid) == 1
        with trio.fail_after(15):
            r = await b.http.delete(f"/sessions/{sid}")
        assert r.status_code == 204
        assert rows(database_url, sid) == 0  # no process can fetch it any more
        assert copies(tmp_path / "b", sid) == []
        with trio.fail_after(10):
            while copies(tmp_path / "a", sid):  # noqa: ASYNC110  # bounded: a's sweep, every 0.05 s
                await trio.sleep(0.02)
        assert copies(tmp_path / "b", sid) == []
        r = await a.http.post(f"/sessions/{sid}/files", params={"name": "late.txt"}, content=b"x")
        assert r.status_code == 404


async def test_a_message_naming_a_file_no_host_has_is_refused_on_either(
    own_redis: RedisServer, database_url: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    async with two_hosts(own_redis, database_url, tmp_path, fake) as (a, b):
        sid = await a.new_session()
        await upload(a, sid, "notes.txt", b"mine")
        for server in (a, b):
            async with server.connect(sid) as c:
                await synced(c)
                with trio.fail_after(15):
                    await c.send_message("x", files=[{"name": "ghost.txt", "path": f"uploads/{sid}/ghost.txt"}])
                    error = await c.until("error")
            assert "ghost.txt" in error[-1]["message"] and "seq" not in error[-1], error
        assert not fake.requests
        assert json.loads((await b.http.get(f"/sessions/{sid}/messages")).text) == []

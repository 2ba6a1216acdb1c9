"""PostgreSQL lost while runs stream on two servers, and back (CONTRACT section 9): two
real servers sharing one real redis-server and one real PostgreSQL of this module's own,
which the test stops (fast shutdown) and starts again.

What must hold on both servers: the runs whose writes fail (a streaming run's checkpoint)
end with one terminal ``error`` naming PostgreSQL, seen by their followers on the other
server too; a run with nothing to write plays on (here it is stopped from the other
server, and ends ``stopped``); ``/healthz`` answers 503; the answers PostgreSQL refused
meanwhile are retried until they are stored; once it is back, new sessions and runs work
on both with no restart, and nothing is left running. Real clock (worker threads,
subprocesses): every wait is a bounded poll of what the servers or PostgreSQL show.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio

from navi_trio.events import check_grammar
from navi_trio.lifecycle import Run

from .helpers import Client, Server, all_tasks, script, task_names, text_of
from .pg import PASSWORD, PgServer, running_postgres
from .redis_server import RedisServer, running_redis
from .test_cli import ServerProcess, http_client, ws_connect
from .test_cluster_processes import navi, new_session
from .test_cluster_servers import two_servers

#: Fast ticks: a checkpoint every 0.2 s finds PostgreSQL gone within a fraction of a second.
CHECKPOINT_S = 0.2
#: A run that writes all the time (a delta every 20 ms, for 16 s): its next checkpoint fails.
STREAMING = script({"text": "w ", "repeat": 800, "delay": 0.02})
#: A run with nothing to write once its first text is checkpointed: it waits on a tool.
WAITING = script({"text": "partial "}, {"tool": "t", "delay": 60})


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PgServer]:
    """A PostgreSQL server of this module's own, to stop and start again."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


async def poll(condition: Callable[[], Awaitable[bool]], what: str, tries: int = 200) -> None:
    """Until ``condition()`` holds, asking every 0.05 s: PostgreSQL coming back and a
    retry landing are outside what the test can wait on. Bounded: fails after ``tries``."""
    for _ in range(tries):
        if await condition():
            return
        await trio.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def runs_seen(client: Client) -> list[list[dict[str, Any]]]:
    """Each run a client saw (its run events, from its ``stream_start``), each checked
    against the grammar: exactly one terminal event, nothing of the run after it."""
    runs: list[list[dict[str, Any]]] = []
    for event in client.received:
        if "seq" not in event:
            continue
        if event["type"] == "stream_start":
            runs.append([])
        assert runs, f"a run event before any stream_start: {event}"
        runs[-1].append(event)
    for events in runs:
        check_grammar([(e["type"], e["seq"]) for e in events])
    return runs


def history_rows(body: Any) -> list[tuple[str, str, str]]:
    messages = body if isinstance(body, list) else body["messages"]
    return [(m["role"], m["status"], m["content"]) for m in messages]


@attrs.frozen
class Watched:
    """A session whose run plays on ``owner``: the sender's connection there, a
    follower's on the other server, and the run's content."""

    owner: Server
    sid: str
    content: str
    sender: Client
    follower: Client

    @classmethod
    async def start(cls, stack: contextlib.AsyncExitStack, owner: Server, other: Server, content: str) -> Watched:
        """A new session (made on ``owner``), followed from ``other`` before its run
        starts, and its run started on ``owner``; returns once both saw its first delta."""
        sid = await owner.new_session()
        follower = await stack.enter_async_context(other.connect(sid))
        sender = await stack.enter_async_context(owner.connect(sid))
        with trio.fail_after(10):
            assert (await follower.recv())["type"] == "session_sync"
            assert (await sender.recv())["type"] == "session_sync"
            await sender.send_message(content)
            await sender.until("stream_delta")
            await follower.until("stream_delta")
        return cls(owner, sid, content, sender, follower)

    def own_run(self) -> Run:
        """The run as its owner's registry holds it."""
        [run] = [r for r in self.owner.registry.runs if r.session_id == self.sid]
        return run


async def health(srv: Server) -> int:
    return (await srv.http.get("/healthz")).status_code


@pytest.mark.parametrize(
    ("lease_s", "save_timeout_s"),
    [
        pytest.param(10.0, 2.0, id="lease-10s"),
        # NAVI_LEASE_S=1 as the process tests use it, with the default NAVI_SAVE_TIMEOUT_S:
        # a refused save (2 s) outlasts the lease, which its owner must hold until then.
        pytest.param(1.0, 5.0, id="lease-1s"),
    ],
)
async def test_postgres_lost_under_load_on_two_servers_then_back(
    own_redis: RedisServer, own_postgres: PgServer, tmp_path: Path, lease_s: float, save_timeout_s: float
) -> None:
    baseline = set(all_tasks())
    where = f"Storage error: PostgreSQL at 127.0.0.1:{own_postgres.port}/postgres is unavailable"
    with own_postgres.database() as url, trio.fail_after(120):
        async with (
            two_servers(
                own_redis, url, tmp_path, lease_s, checkpoint_s=CHECKPOINT_S, save_timeout_s=save_timeout_s
            ) as (a, b),
            contextlib.AsyncExitStack() as stack,
        ):
            # Two streaming runs and two waiting ones, on each server one of each, each
            # followed from the other server.
            streaming = [await Watched.start(stack, a, b, STREAMING), await Watched.start(stack, b, a, STREAMING)]
            waiting = [await Watched.start(stack, a, b, WAITING), await Watched.start(stack, b, a, WAITING)]
            for w in waiting:
                with trio.fail_after(10):
                    await w.follower.until("tool_started")
                    await w.sender.until("tool_started")
                run = w.own_run()

                async def checkpointed(run: Run = run) -> bool:  # its text is in: nothing left to write
                    return run.checkpointed == run.log.answer_changes > 0

                await poll(checkpointed, "the waiting run's text checkpointed")
            assert await health(a) == 200 and await health(b) == 200

            await trio.to_thread.run_sync(own_postgres.stop)
            try:
                # The streaming runs' next checkpoint fails: each ends with an error
                # naming PostgreSQL, on its sender's server and its follower's.
                for w in streaming:
                    with trio.fail_after(15):
                        await w.sender.until_terminal()
                        await w.follower.until_terminal()
                    for client in (w.sender, w.follower):
                        [run] = runs_seen(client)
                        assert run[-1]["type"] == "error", run[-1]
                        assert run[-1]["message"].startswith(where), run[-1]
                        assert PASSWORD not in run[-1]["message"]
                    assert text_of(runs_seen(w.follower)[0]) == text_of(runs_seen(w.sender)[0])
                # Both servers say so.
                for srv in (a, b):
                    r = await srv.http.get("/healthz")
                    assert (r.status_code, r.json()) == (503, {"detail": "Storage is unavailable"})
                    assert (await srv.http.post("/sessions", json={})).status_code == 503
                # The waiting runs wrote nothing and play on: a stop asked from the other
                # server ends each, stopped (not an error), its answer refused for now.
                for w in waiting:
                    assert not w.own_run().over
                    await w.follower.send({"type": "stop"})
                    with trio.fail_after(15):
                        await w.follower.until_terminal()
                        await w.sender.until_terminal()
                    for client in (w.sender, w.follower):
                        [run] = runs_seen(client)
                        assert (run[-1]["type"], run[-1].get("reason")) == ("stream_stopped", "user"), run[-1]
                # A message sent meanwhile: its user message cannot be saved, so its run
                # ends at once with an error naming PostgreSQL, on both servers.
                late = streaming[0]
                await late.follower.send_message(script({"text": "meanwhile"}))
                with trio.fail_after(15):
                    await late.follower.until_terminal()
                    await late.sender.until_terminal()
                for client in (late.sender, late.follower):
                    refused = runs_seen(client)[1]
                    assert refused[-1]["type"] == "error" and refused[-1]["message"].startswith(where), refused
                    assert text_of(refused) == ""
                for srv in (a, b):
                    assert await health(srv) == 503  # asked again (past the health check's cache)
                    assert srv.registry.unsaved_count > 0
            finally:
                await trio.to_thread.run_sync(own_postgres.start)

            async def both_healthy() -> bool:
                return await health(a) == 200 and await health(b) == 200

            await poll(both_healthy, "/healthz answering 200 on both servers again")

            # Every answer refused meanwhile is retried until stored: read back from
            # either server, with the status its run ended with and the text it streamed.
            expected = {
                w.sid: [
                    ("user", "complete", w.content),
                    ("assistant", "error", text_of(runs_seen(w.sender)[0])),
                ]
                for w in streaming
            }
            expected.update(
                {w.sid: [("user", "complete", w.content), ("assistant", "stopped", "partial ")] for w in waiting}
            )

            async def all_stored() -> bool:
                for srv in (a, b):
                    for sid, rows in expected.items():
                        r = await srv.http.get(f"/sessions/{sid}/messages")
                        if r.status_code != 200 or history_rows(r.json()) != rows:
                            return False
                return True

            await poll(all_stored, "every refused answer stored")
            assert a.registry.unsaved_count == b.registry.unsaved_count == 0

            # Recovered with no restart: new sessions on each server, a run on each,
            # followed live from the other; and the old sessions take messages again.
            for owner, other in ((a, b), (b, a)):
                w = await Watched.start(stack, owner, other, script({"text": "back ", "repeat": 3, "delay": 0.01}))
                with trio.fail_after(10):
                    await w.sender.until_terminal()
                    await w.follower.until_terminal()
                for client in (w.sender, w.follower):
                    [run] = runs_seen(client)
                    assert (run[-1]["type"], text_of(run)) == ("stream_end", "back " * 3)
            for w in streaming + waiting:
                await w.follower.send_message(script({"text": "again"}))
                with trio.fail_after(10):
                    await w.follower.until_terminal()
                    await w.sender.until_terminal()
                for client in (w.sender, w.follower):
                    run = runs_seen(client)[-1]
                    assert (run[-1]["type"], text_of(run)) == ("stream_end", "again")
            for srv in (a, b):
                await srv.no_run_left()
                assert srv.registry.unsaved_count == 0
            assert task_names("run:") == []
            runs_seen(late.sender), runs_seen(late.follower)  # still one terminal event per run
    left = sorted(t.name for t in set(all_tasks()) - baseline)
    assert not left, f"tasks left behind: {left}"


# -- separate ``navi-trio serve`` processes ---------------------------------------------
#: What the processes are started with besides the cluster's URLs: fast checkpoints, and a
#: save bound of 2 s (the pool waits 1 s for a connection), as in the tests above.
PROCESS_ENV = {"NAVI_CHECKPOINT_S": str(CHECKPOINT_S), "NAVI_SAVE_TIMEOUT_S": "2"}


async def process_health(srv: ServerProcess) -> int:
    async with http_client(srv.url) as http:
        return (await http.get("/healthz")).status_code


async def process_history(srv: ServerProcess, sid: str) -> list[tuple[str, str, str]] | None:
    """The session's history as ``srv`` serves it, or None while it cannot (503)."""
    async with http_client(srv.url) as http:
        r = await http.get(f"/sessions/{sid}/messages")
    return history_rows(r.json()) if r.status_code == 200 else None


@contextlib.asynccontextmanager
async def followed_run(
    owner: ServerProcess, other: ServerProcess, content: str, seen: str
) -> AsyncIterator[tuple[str, Client, Client]]:
    """A new session made on ``owner``, followed from ``other``, its run of ``content``
    sent on ``owner``; yields its id, the sender and the follower once the follower has
    seen an event of type ``seen``."""
    sid = await new_session(owner)
    async with (
        ws_connect(*other.host_port, f"/ws/sessions/{sid}") as follower,
        ws_connect(*owner.host_port, f"/ws/sessions/{sid}") as sender,
    ):
        with trio.fail_after(10):
            assert (await follower.recv())["type"] == "session_sync"
            assert (await sender.recv())["type"] == "session_sync"
            await sender.send_message(content)
            await follower.until(seen)
        yield sid, sender, follower


async def test_postgres_lost_while_separate_processes_stream_then_back(
    own_redis: RedisServer, own_postgres: PgServer, tmp_path: Path
) -> None:
    """As above with two ``navi-trio serve`` processes (each its own pool, registry and
    Redis connection): a run of one followed from the other ends with an error naming
    PostgreSQL on both, ``/healthz`` answers 503 from both, and once PostgreSQL is back
    both answer 200, the refused answer is stored and a run streams across them again,
    with neither process restarted (each exits 0 on SIGTERM at the end)."""
    data = tmp_path / "data"
    where = f"Storage error: PostgreSQL at 127.0.0.1:{own_postgres.port}/postgres is unavailable"
    with own_postgres.database() as url, trio.fail_after(120):
        async with (
            navi(own_redis, url, data, 10.0, **PROCESS_ENV) as a,
            navi(own_redis, url, data, 10.0, **PROCESS_ENV) as b,
        ):
            async with followed_run(a, b, STREAMING, "stream_delta") as (sid, sender, follower):
                await trio.to_thread.run_sync(own_postgres.stop)
                try:
                    with trio.fail_after(15):
                        await sender.until_terminal()
                        await follower.until_terminal()
                    for client in (sender, follower):
                        [run] = runs_seen(client)
                        assert run[-1]["type"] == "error" and run[-1]["message"].startswith(where), run[-1]
                    assert await process_health(a) == 503 and await process_health(b) == 503
                finally:
                    await trio.to_thread.run_sync(own_postgres.start)
                streamed = text_of(runs_seen(follower)[0])

                async def recovered() -> bool:
                    if await process_health(a) != 200 or await process_health(b) != 200:
                        return False
                    expected = [("user", "complete", STREAMING), ("assistant", "error", streamed)]
                    return await process_history(a, sid) == await process_history(b, sid) == expected

                await poll(recovered, "both processes healthy and the refused answer stored")
                # A new session made on the other process, its run played there and
                # followed live from the first.
                sid2 = await new_session(b)
                async with (
                    ws_connect(*a.host_port, f"/ws/sessions/{sid2}") as on_a,
                    ws_connect(*b.host_port, f"/ws/sessions/{sid2}") as on_b,
                ):
                    with trio.fail_after(10):
                        await on_a.recv()
                        await on_b.recv()
                        await on_b.send_message(script({"text": "back ", "repeat": 3}))
                        await on_b.until_terminal()
                        await on_a.until_terminal()
                    for client in (on_a, on_b):
                        [run] = runs_seen(client)
                        assert (run[-1]["type"], text_of(run)) == ("stream_end", "back " * 3)
                runs_seen(follower)  # one terminal event for the run, still
            for srv in (a, b):
                srv.signal(signal.SIGTERM)
                assert await srv.wait_exit(15) == 0, srv.output


async def test_an_owner_killed_while_postgres_is_down_is_ended_by_the_other_once(
    own_redis: RedisServer, own_postgres: PgServer, tmp_path: Path
) -> None:
    """PostgreSQL down, then the owner of a run is killed (SIGKILL): the other process
    ends the run within the lease (``stream_stopped`` reason ``shutdown``, CONTRACT 9)
    and serves on (503 while PostgreSQL is down); once it is back, the orphan's answer is
    stored ``interrupted`` with the text checkpointed before, and the session takes a new
    run there."""
    data = tmp_path / "data"
    with own_postgres.database() as url, trio.fail_after(120):
        async with navi(own_redis, url, data, **PROCESS_ENV) as a, navi(own_redis, url, data, **PROCESS_ENV) as b:
            async with followed_run(a, b, WAITING, "tool_started") as (sid, _, follower):

                async def checkpointed() -> bool:  # what the owner saved before it dies
                    rows = await trio.to_thread.run_sync(answer_rows, url)
                    return rows == [("running", "partial ")]

                await poll(checkpointed, "the run's text checkpointed")
                await trio.to_thread.run_sync(own_postgres.stop)
                try:
                    a.signal(signal.SIGKILL)
                    with trio.fail_after(10):
                        await follower.until_terminal()
                    [run] = runs_seen(follower)
                    assert (run[-1]["type"], run[-1].get("reason")) == ("stream_stopped", "shutdown"), run[-1]
                    assert await process_health(b) == 503
                finally:
                    await trio.to_thread.run_sync(own_postgres.start)

                async def stored() -> bool:
                    expected = [("user", "complete", WAITING), ("assistant", "interrupted", "partial ")]
                    return await process_health(b) == 200 and await process_history(b, sid) == expected

                await poll(stored, "the orphan's answer stored")
                await follower.send_message(script({"text": "again"}))
                with trio.fail_after(10):
                    await follower.until_terminal()
                run = runs_seen(follower)[-1]
                assert (run[-1]["type"], text_of(run)) == ("stream_end", "again")
            b.signal(signal.SIGTERM)
            assert await b.wait_exit(15) == 0, b.output


def answer_rows(url: str) -> list[tuple[str, str]]:
    """Every answer's status and text, read from PostgreSQL itself."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT status, content FROM messages WHERE role = 'assistant' ORDER BY ord").fetchall()
        return [(r[0], r[1]) for r in rows]

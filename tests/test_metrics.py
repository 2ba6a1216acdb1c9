"""CONTRACT section 12: ``GET /metrics``, scraped from a real server during and after
real runs (completed, stopped, failed, model errors from the fake model server).

Each test reads the metrics as Prometheus would (prometheus-client's own parser) and
checks that the values moved as the runs say they should. Virtual time where the server
runs the scripted agent on the memory store; real time against the fake model server and
SQLite (real sockets, real timeouts).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from navi_trio import logs
from navi_trio.agents import openai as openai_agent
from navi_trio.auth import User, hash_token, new_token
from navi_trio.metrics import Metrics
from navi_trio.store.base import utc_now

from .fake_openai import NEVER, FakeOpenAI, Reply, content, error_reply, open_fake_openai, stream, text_reply
from .helpers import Client, Server, open_server, script
from .test_cli import (
    HYPERCORN,
    HYPERCORN_URL,
    NAVI,
    STARTUP_S,
    clean_env,
    free_port,
    http_client,
    spawn,
    ws_connect,
)
from .test_durability import hold_exclusive_lock
from .test_origins import ws_first
from .test_protocol_sse import chat_body, read_sse, sse

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

CONTRACT_METRICS = {
    "navi_runs_active": "gauge",
    "navi_runs": "counter",
    "navi_websocket_connections": "gauge",
    "navi_events_sent": "counter",
    "navi_stop_seconds": "histogram",
    "navi_time_to_first_delta_seconds": "histogram",
}
MODEL = "test-model"
KEY = "sk-metrics-SECRET"


async def scrape_text(server: Server, **headers: str) -> str:
    r = await server.http.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


async def scrape(server: Server) -> Samples:
    """Every sample of ``/metrics``: ``(name, labels) -> value``."""
    out: Samples = {}
    for family in text_string_to_metric_families(await scrape_text(server)):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def runs(samples: Samples, status: str, agent: str = "scripted") -> float:
    """``navi_runs_total{status}`` (the contract's label set, exactly), checked against
    the by-agent count of the same runs."""
    total = value(samples, "navi_runs_total", status=status)
    assert value(samples, "navi_agent_runs_total", agent=agent, status=status) == total
    return total


async def settled(server: Server) -> Samples:
    """Scrape once every run has ended and saved its answer."""
    await server.no_run_left()
    return await scrape(server)


async def scrape_until(server: Server, done: Callable[[Samples], bool]) -> Samples:
    """Scrape every 50 ms (real clock), as Prometheus would, until ``done``; at most 20 s."""
    with trio.fail_after(20):
        while not done(got := await scrape(server)):  # noqa: ASYNC110 (what a scraper does)
            await trio.sleep(0.05)
    return got


async def follow(server: Server, sid: str, client: Client) -> None:
    assert (await client.recv())["type"] == "session_sync"


LONG_RUN = script({"text": "w ", "repeat": 100, "delay": 0.1})


async def start_long_run(client: Client) -> None:
    """Start a run that streams for 10 s and wait for its first delta."""
    await client.send_message(LONG_RUN)
    await client.until("stream_delta")


# -- the route and the token rule ------------------------------------------------------
async def test_the_contracts_six_are_there_with_their_types_and_no_user_token() -> None:
    async with open_server(auth="required") as server:  # every other route needs a token
        r = await server.http.get("/metrics")
        assert r.status_code == 200, r.text
        types = {f.name: f.type for f in text_string_to_metric_families(r.text)}
        for name, kind in CONTRACT_METRICS.items():
            assert types.get(name) == kind, (name, types.get(name))
        assert (await server.http.get("/sessions")).status_code == 401
        assert (await server.http.post("/metrics")).status_code == 405


async def test_metrics_token_is_required_when_set() -> None:
    async with open_server(metrics_token="scrape-me") as server:
        assert (await server.http.get("/metrics")).status_code == 401
        for wrong in ("Bearer nope", "Bearer scrape-me-not", "Basic c2NyYXBlLW1l", "Bearer"):
            r = await server.http.get("/metrics", headers={"Authorization": wrong})
            assert r.status_code == 401, wrong
            assert r.json() == {"detail": r.json()["detail"]}
            assert "scrape-me" not in r.text
        await scrape_text(server, Authorization="Bearer scrape-me")


async def test_a_user_token_is_not_the_metrics_token(tmp_path: Path) -> None:
    async with open_server(auth="required", metrics_token="scrape-me") as server:
        token = new_token()
        await server.registry.store.add_user(User(uuid4().hex, "alice", "admin", utc_now()), hash_token(token))
        assert (await server.http.get("/sessions", headers={"Authorization": f"Bearer {token}"})).status_code == 200
        assert (await server.http.get("/metrics", headers={"Authorization": f"Bearer {token}"})).status_code == 401


async def test_each_server_has_its_own_metrics(autojump_clock: trio.testing.MockClock) -> None:
    async with open_server() as one, open_server() as two:
        sid = await one.new_session()
        async with one.connect(sid) as c:
            await follow(one, sid, c)
            await c.send_message(script({"text": "hi"}))
            await c.until_terminal()
        assert runs(await settled(one), "complete") == 1
        assert runs(await scrape(two), "complete") == 0
    # A registry built without an app shares one unserved set; an app never uses it.
    assert Metrics.detached() is Metrics.detached()
    assert one.registry.metrics is not Metrics.detached()


# -- runs: completed, stopped, failed ----------------------------------------------------
async def test_a_completed_run_during_and_after(autojump_clock: trio.testing.MockClock) -> None:
    async with open_server() as server:
        before = await scrape(server)
        assert value(before, "navi_runs_active") == 0
        assert value(before, "navi_websocket_connections") == 0
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await follow(server, sid, c)
            await trio.sleep(100)  # virtual: measured from the message, not from the clock's zero
            await c.send_message(
                script(
                    {"sleep": 0.25},
                    {"tool": "lookup", "args": {}, "result": "42", "delay": 0.5},
                    {"text": "a", "repeat": 3, "delay": 0.1},
                    {"sleep": 10},
                )
            )
            while (await c.recv())["type"] != "stream_delta":
                pass
            during = await scrape(server)
            assert value(during, "navi_runs_active") == 1
            assert value(during, "navi_websocket_connections") == 1
            assert runs(during, "complete") == 0
            await c.until_terminal()
            after = await settled(server)
            # Every frame this client got, counted once each (session_sync and the run's events).
            assert value(after, "navi_events_sent_total") == len(c.received)
        after = await scrape(server)
        assert value(after, "navi_websocket_connections") == 0
        assert value(after, "navi_runs_active") == 0
        assert runs(after, "complete") == 1
        assert sum(runs(after, s) for s in ("stopped", "interrupted", "error")) == 0
        # Message received -> first delta: the sleep and the tool (virtual time: exact).
        assert value(after, "navi_time_to_first_delta_seconds_count") == 1
        assert value(after, "navi_time_to_first_delta_seconds_sum") == pytest.approx(0.75, abs=0.01)
        assert value(after, "navi_tool_seconds_count", tool="lookup") == 1
        assert value(after, "navi_tool_seconds_sum", tool="lookup") == pytest.approx(0.5, abs=0.01)
        assert value(after, "navi_tool_failures_total", tool="lookup") == 0
        assert value(after, "navi_store_seconds_count", op="begin") == 1
        assert value(after, "navi_store_seconds_count", op="save") == 1
        assert value(after, "navi_store_failures_total", op="save") == 0
        assert value(after, "navi_stop_seconds_count") == 0


async def test_a_stopped_run_counts_its_stop_latency(autojump_clock: trio.testing.MockClock) -> None:
    async with open_server() as server:
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await follow(server, sid, c)
            await start_long_run(c)
            r = await server.http.post(f"/sessions/{sid}/stop")
            assert r.json()["ok"] is True
            after = await scrape(server)  # the stop answered: the answer is saved, counted
            assert runs(after, "stopped") == 1
            assert value(after, "navi_runs_active") == 0
            assert value(after, "navi_stop_seconds_count") == 1
            assert 0 <= value(after, "navi_stop_seconds_sum") < 0.1
            # A stop over the WebSocket is timed the same way.
            await c.until_terminal()
            await start_long_run(c)
            await c.send({"type": "stop"})
            await c.until_terminal()
        after = await settled(server)
        assert runs(after, "stopped") == 2
        assert value(after, "navi_stop_seconds_count") == 2
        # A stop with nothing running is not a stop latency.
        assert (await server.http.post(f"/sessions/{sid}/stop")).json()["ok"] is False
        assert value(await scrape(server), "navi_stop_seconds_count") == 2


async def test_failed_runs_and_a_failing_tool(autojump_clock: trio.testing.MockClock) -> None:
    async with open_server() as server:
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await follow(server, sid, c)
            for steps in (
                [{"tool": "lookup", "result": "no", "success": False}, {"error": "the agent gave up"}],
                [{"crash": True}],
            ):
                await c.send_message(script(*steps))
                await c.until_terminal()
        after = await settled(server)
        assert runs(after, "error") == 2
        assert runs(after, "complete") == 0
        assert value(after, "navi_tool_failures_total", tool="lookup") == 1
        # No delta in either run: no time to first delta.
        assert value(after, "navi_time_to_first_delta_seconds_count") == 0


async def test_queued_messages_are_a_gauge(autojump_clock: trio.testing.MockClock) -> None:
    async with open_server() as server:
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await follow(server, sid, c)
            await start_long_run(c)
            for _ in range(2):
                await c.send_message(script({"text": "next"}), if_running="enqueue")
            await c.send({"type": "nonsense"})  # answered once the two before it are queued
            await c.until("error")
            assert value(await scrape(server), "navi_messages_queued") == 2
            for _ in range(3):
                await c.until_terminal()
        after = await settled(server)
        assert value(after, "navi_messages_queued") == 0
        assert runs(after, "complete") == 3


# -- connections -------------------------------------------------------------------------
async def test_heartbeats_are_counted(autojump_clock: trio.testing.MockClock) -> None:
    async with open_server(heartbeat_s=1.0) as server:
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await follow(server, sid, c)
            for _ in range(3):
                assert (await c.recv())["type"] == "heartbeat"
            got = await scrape(server)
            assert value(got, "navi_heartbeats_sent_total") == 3
            assert value(got, "navi_events_sent_total") == 4  # session_sync and 3 heartbeats


async def test_a_reader_behind_gets_merged_frames(autojump_clock: trio.testing.MockClock) -> None:
    async with open_server(outbox_size=1) as server:
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await follow(server, sid, c)
            # A burst: 8 deltas per scheduler pass into an outbox of one.
            await c.send_message(script({"text": "x", "repeat": 64}))
            events = await c.until_terminal()
        after = await settled(server)
        deltas = [e for e in events if e["type"] == "stream_delta"]
        assert "".join(e["delta"] for e in deltas) == "x" * 64
        assert len(deltas) < 64
        assert value(after, "navi_frames_merged_total") >= 1
        assert value(after, "navi_events_sent_total") == len(c.received)


async def test_a_reader_that_stopped_reading_is_a_lagging_subscriber() -> None:
    """Real clock: the server's writer waits on a full socket while the run goes on."""
    with trio.fail_after(30):
        async with open_server(script_max_chars=40_000_000) as server:
            sid = await server.new_session()
            async with server.connect(sid) as stuck:
                await follow(server, sid, stuck)
                # 32 MB of text it never reads: more than both sockets' buffers hold.
                await stuck.send_message(script({"text": "x" * 64_000, "repeat": 500}, {"sleep": 60}))
                # The writer falls behind once the kernel's buffers are full: no event marks it.
                await scrape_until(server, lambda got: value(got, "navi_subscribers_lagging") == 1)
                assert value(await scrape(server), "navi_runs_active") == 1
                assert (await server.http.post(f"/sessions/{sid}/stop")).json()["ok"] is True
            assert value(await settled(server), "navi_subscribers_lagging") == 0


async def test_refused_connections_by_reason(tmp_path: Path) -> None:
    async with open_server(auth="required", max_connections_per_user=1) as server:
        store = server.registry.store
        alice = User(uuid4().hex, "alice", "user", utc_now())
        token = new_token()
        await store.add_user(alice, hash_token(token))
        sid = (await store.create_session(uuid4().hex, "hers", alice.id)).id
        bob = User(uuid4().hex, "bob", "user", utc_now())
        bob_token = new_token()
        await store.add_user(bob, hash_token(bob_token))
        async with server.connect(sid, f"token={token}") as first:
            await follow(server, sid, first)
            async with server.connect(sid, f"token={token}") as second:
                assert await second.until_closed() == 1008
            async with server.connect(sid, "token=wrong") as bad:
                assert await bad.until_closed() == 4003
            async with server.connect(sid, f"token={bob_token}") as other:
                assert await other.until_closed() == 4003
            async with server.connect("nosuchsession", f"token={token}") as lost:
                assert await lost.until_closed() == 4004
            # Another site's page: its WebSocket and its request are refused for the Origin.
            assert await ws_first(server, sid, "https://evil.example") == (4003, "Origin not allowed")
            refused = await server.http.get("/sessions", headers={"origin": "https://evil.example"})
            assert refused.status_code == 403
            got = await scrape(server)
        assert value(got, "navi_connections_refused_total", reason="limit") == 1
        assert value(got, "navi_connections_refused_total", reason="auth") == 1
        assert value(got, "navi_connections_refused_total", reason="forbidden") == 1
        assert value(got, "navi_connections_refused_total", reason="not_found") == 1
        assert value(got, "navi_connections_refused_total", reason="origin") == 2
        assert value(got, "navi_websocket_connections") == 1  # the refused ones never served


async def test_dropped_log_lines_are_read_at_scrape_time(monkeypatch: pytest.MonkeyPatch) -> None:
    dropped = [0]
    monkeypatch.setattr(logs, "dropped_lines", lambda: dropped[0])
    async with open_server() as server:
        assert value(await scrape(server), "navi_log_lines_dropped_total") == 0
        dropped[0] = 3
        assert value(await scrape(server), "navi_log_lines_dropped_total") == 3
        assert value(await scrape(server), "navi_log_lines_dropped_total") == 3  # not added twice


# -- the store ---------------------------------------------------------------------------
async def test_a_locked_database_shows_as_failures_and_an_unsaved_answer(tmp_path: Path) -> None:
    """Real clock and SQLite: the lock outlasts the run, so its final save fails and waits
    for a retry; once the lock is gone the retry saves it."""
    with trio.fail_after(60):
        async with open_server(data_dir=tmp_path, store="sqlite", checkpoint_s=0.2, save_timeout_s=5.0) as server:
            sid = await server.new_session()
            async with server.connect(sid) as c:
                await follow(server, sid, c)
                await c.send_message(script({"text": "w ", "repeat": 400, "delay": 0.05}))
                await c.until("stream_delta")
                held, release = trio.Event(), threading.Event()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(
                            trio.to_thread.run_sync, hold_exclusive_lock, tmp_path / "navi.sqlite3", held, release
                        )
                        await held.wait()
                        terminal = (await c.until_terminal())[-1]
                        assert terminal["type"] == "error", terminal
                        await server.no_run_left()  # the save gave up: the answer waits
                        locked = await scrape(server)
                        release.set()
                finally:
                    release.set()
                assert value(locked, "navi_store_failures_total", op="checkpoint") >= 1
                assert value(locked, "navi_store_failures_total", op="save") >= 1
                assert value(locked, "navi_answers_unsaved") == 1
                assert runs(locked, "error") == 1
                # The next checkpoint tick retries.
                await scrape_until(server, lambda got: value(got, "navi_answers_unsaved") == 0)


# -- model calls (the fake model server, real clock) -------------------------------------
@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_agent, "RETRY_BASE_S", 0.01)


async def one_model_run(
    fake: FakeOpenAI, *, timeout_s: float = 60.0, **overrides: Any
) -> tuple[dict[str, Any], Samples]:
    """One message to a server whose agent is the OpenAI one; its terminal event and the
    metrics once its answer is saved."""
    async with open_server(
        agent="openai",
        openai_base_url=fake.base_url,
        openai_api_key=KEY,
        openai_model=MODEL,
        openai_timeout_s=timeout_s,
        **overrides,
    ) as server:
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await follow(server, sid, c)
            await c.send_message("hello")
            terminal = (await c.until_terminal())[-1]
        return terminal, await settled(server)


async def test_model_calls_ok_and_time_to_first_delta() -> None:
    async with open_fake_openai() as fake:
        fake.script(text_reply("hel", "lo", delay=0.05))
        terminal, got = await one_model_run(fake)
    assert terminal["type"] == "stream_end"
    assert runs(got, "complete", agent="openai") == 1
    assert value(got, "navi_model_call_seconds_count", outcome="ok") == 1
    assert value(got, "navi_model_call_seconds_count", outcome="error") == 0
    assert value(got, "navi_time_to_first_delta_seconds_count") == 1
    assert sum(v for (name, _), v in got.items() if name == "navi_model_errors_total") == 0


@pytest.mark.parametrize(
    ("replies", "kind", "failed_requests"),
    [
        ([error_reply(401, f"Incorrect API key provided: {KEY}")], "401", 1),
        ([error_reply(429, "Rate limit reached")] * openai_agent.RETRY_ATTEMPTS, "429", openai_agent.RETRY_ATTEMPTS),
        ([error_reply(503, "overloaded")] * openai_agent.RETRY_ATTEMPTS, "5xx", openai_agent.RETRY_ATTEMPTS),
        ([stream(ending="end")], "incomplete", 1),
    ],
    ids=["401", "429", "503", "incomplete"],
)
async def test_model_errors_by_kind(replies: list[Any], kind: str, failed_requests: int) -> None:
    async with open_fake_openai() as fake:
        fake.script(*replies)
        terminal, got = await one_model_run(fake)
    assert terminal["type"] == "error"
    assert KEY not in str(got)
    assert runs(got, "error", agent="openai") == 1
    # Each failed request, the retried ones too; the call itself failed once.
    assert value(got, "navi_model_errors_total", kind=kind) == failed_requests
    assert value(got, "navi_model_call_seconds_count", outcome="error") == 1
    assert value(got, "navi_model_call_seconds_count", outcome="ok") == 0


@pytest.mark.parametrize("reply", [NEVER, stream(content("half an "), ending="hang")], ids=["no_answer", "stalled"])
async def test_a_model_that_stops_answering_is_a_timeout(reply: Reply) -> None:
    async with open_fake_openai() as fake:
        fake.script(reply)
        terminal, got = await one_model_run(fake, timeout_s=0.3)
    assert terminal["type"] == "error"
    assert value(got, "navi_model_errors_total", kind="timeout") == 1
    assert value(got, "navi_model_call_seconds_count", outcome="error") == 1


async def test_a_stopped_model_call_is_cancelled_not_an_error() -> None:
    async with (
        open_fake_openai() as fake,
        open_server(agent="openai", openai_base_url=fake.base_url, openai_api_key=KEY, openai_model=MODEL) as server,
    ):
        fake.script(stream(ending="hang"))
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await follow(server, sid, c)
            await c.send_message("hello")
            await c.until("stream_start")
            await fake.wait_requests(1)
            assert (await server.http.post(f"/sessions/{sid}/stop")).json()["ok"] is True
            got = await settled(server)
    assert runs(got, "stopped", agent="openai") == 1
    assert value(got, "navi_model_call_seconds_count", outcome="cancelled") == 1
    assert value(got, "navi_model_call_seconds_count", outcome="error") == 0
    assert sum(v for (name, _), v in got.items() if name == "navi_model_errors_total") == 0


def test_no_label_is_unbounded() -> None:
    """Labels come from fixed sets, and tool names stop getting their own after a bound."""
    from navi_trio.metrics import MAX_TOOL_LABELS

    m = Metrics("scripted")
    labels = [m._tool_label(f"tool_{i}") for i in range(MAX_TOOL_LABELS + 5)]
    assert len(set(labels)) == MAX_TOOL_LABELS + 1
    assert labels[-1] == "other"
    assert m._tool_label("no spaces allowed") == "other"
    assert m.model_error("a new kind") == "other"


# -- several worker processes --------------------------------------------------------------
async def scrape_url(url: str) -> Samples:
    async with http_client(url) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


async def one_run_at(url: str, i: int) -> int:
    """One run on a new session, over new connections; the frames the client got."""
    async with http_client(url) as http:
        r = await http.post("/sessions", json={})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    async with ws_connect(host, int(port), f"/ws/sessions/{sid}") as c:
        assert (await c.recv())["type"] == "session_sync"
        await c.send_message(script({"text": f"run {i}"}))
        await c.until_terminal()
        return len(c.received)


async def scrape_url_until(url: str, done: Callable[[Samples], bool]) -> Samples:
    """Each process copies its plain ints and state into the shared files every second."""
    with trio.fail_after(20):
        while not done(got := await scrape_url(url)):  # noqa: ASYNC110 (what a scraper does)
            await trio.sleep(0.1)
    return got


async def test_each_process_answers_for_all_that_share_the_directory(tmp_path: Path) -> None:
    """Two processes with one ``PROMETHEUS_MULTIPROC_DIR`` (what hypercorn's workers are):
    a scrape of either reports the runs and the open connections of both."""
    prom = tmp_path / "prometheus"
    prom.mkdir()
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(prom))
    with trio.fail_after(STARTUP_S + 60):
        async with (
            spawn([NAVI, "serve", "--port", "0", "--data-dir", str(tmp_path / "a")], env, tmp_path) as a,
            spawn([NAVI, "serve", "--port", "0", "--data-dir", str(tmp_path / "b")], env, tmp_path) as b,
        ):
            url_a, url_b = await a.wait_listening(), await b.wait_listening()
            received = await one_run_at(url_a, 0)
            for i in range(1, 4):
                received += await one_run_at(url_b, i)
            async with http_client(url_b) as http:
                sid = (await http.post("/sessions", json={})).json()["id"]
            host, port = b.host_port
            async with ws_connect(host, port, f"/ws/sessions/{sid}") as open_on_b:
                assert (await open_on_b.recv())["type"] == "session_sync"
                received += 1

                def both(got: Samples) -> bool:
                    return (
                        runs(got, "complete") == 4
                        and value(got, "navi_websocket_connections") == 1
                        and value(got, "navi_events_sent_total") == received
                    )

                for url in (url_a, url_b):
                    got = await scrape_url_until(url, both)
                    assert value(got, "navi_store_seconds_count", op="save") == 4
            await scrape_url_until(url_a, lambda got: value(got, "navi_websocket_connections") == 0)


async def test_every_workers_metrics_on_any_worker(tmp_path: Path) -> None:
    """``hypercorn --workers 2`` with ``PROMETHEUS_MULTIPROC_DIR``: both workers report
    into the directory, and a scrape (whichever worker answers) has every run."""
    port = free_port()
    prom = tmp_path / "prometheus"
    prom.mkdir()
    env = clean_env(NAVI_DATA_DIR=str(tmp_path / "data"), NAVI_PORT=str(port), PROMETHEUS_MULTIPROC_DIR=str(prom))
    cmd = [HYPERCORN, "--workers", "2", "--config", "python:navi_trio.hypercorn_conf", "navi_trio.asgi:app"]
    n_runs = 6
    with trio.fail_after(STARTUP_S + 60):
        async with spawn(cmd, env, tmp_path, ready=HYPERCORN_URL) as srv:
            url = await srv.wait_listening()
            received = 0
            for i in range(n_runs):  # each on new connections: the workers share the socket
                received += await one_run_at(url, i)
            got = await scrape_url_until(
                url, lambda got: runs(got, "complete") == n_runs and value(got, "navi_events_sent_total") == received
            )
            assert value(got, "navi_runs_active") == 0
            pids = {p.stem.rsplit("_", 1)[-1] for p in prom.glob("*.db")}
            assert len(pids) == 2, sorted(prom.iterdir())


async def test_sse_events_are_counted_as_events_sent() -> None:
    """A run followed over ``/api/chat`` counts its SSE events in navi_events_sent_total,
    as a WebSocket's frames are (keep-alive comments are not events)."""
    with trio.fail_after(20):
        async with open_server() as server:
            before = value(await scrape(server), "navi_events_sent_total")
            body = chat_body("counted", script({"text": "a "}))
            async with sse(server, "POST", "/api/chat", body) as r:
                chunks, _ = await read_sse(r)
            got = await scrape_until(server, lambda got: runs(got, "complete") == 1)
    # One SSE write per run event: stream_start, the delta, stream_end.
    assert value(got, "navi_events_sent_total") - before == 3
    assert [c.get("type") for c in chunks][-2:] == ["finish", None]  # then [DONE]

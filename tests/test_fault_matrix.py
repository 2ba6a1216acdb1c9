"""navi-trio's fault matrix: every cancel path x every event index of a script that uses
every step type (docs/fault-matrix.md has the table).

- With the kit (``navi_trio.testing.check_agent``): the scripted agent cut after every
  emit and every task step, by stop, delete, interrupt, every client gone, shutdown and a
  store fault, in virtual time.
- With the real server, where the kit does not reach (hypercorn, the WebSocket and HTTP
  routes, SQLite): the same script cut after every event a client receives, by a
  WebSocket stop, an HTTP stop, DELETE, an interrupting message, the client going away,
  a shutdown, and the database turning read-only.

Each server case checks what the client got (the grammar: one terminal event, last), the
saved answer against the text delivered, and that no run or run task is left.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing

from navi_trio.agents.scripted import ScriptedAgent
from navi_trio.events import TERMINAL_TYPES
from navi_trio.store import SqliteStore
from navi_trio.testing import CUT_PATHS, CutPath, check_agent

from .helpers import Client, Server, assert_grammar, open_server, run_events, script, task_names, text_of

#: Every step type of CONTRACT section 4 (the last one ends the run: error, or crash below).
STEPS: Final[list[dict[str, Any]]] = [
    {"think": "weigh it up first"},
    {"text": "burst ", "repeat": 10},
    {"tool": "calc", "args": {"x": 6}, "result": "42", "delay": 0.5},
    {"tool": "io", "thread": True, "delay": 0, "result": {"ok": True}},
    {"text": "paced ", "repeat": 3, "delay": 0.2},
    {"compress": True},
    {"sleep": 0.3},
    {"tool": "fails", "success": False, "result": "no"},
    {"text": "tail"},
]
EVERY_STEP: Final = script(*STEPS, {"error": "the script's own error"})
EVERY_STEP_CRASH: Final = script(*STEPS, {"crash": True})
EVERY_STEP_COMPLETE: Final = script(*STEPS)


# -- with the kit --------------------------------------------------------------------------
@pytest.mark.parametrize("path", CUT_PATHS)
@pytest.mark.parametrize("message", [EVERY_STEP, EVERY_STEP_CRASH, EVERY_STEP_COMPLETE], ids=["error", "crash", "end"])
async def test_kit_every_cut_of_every_step(path: CutPath, message: str, autojump_clock: trio.testing.MockClock) -> None:
    report = await check_agent(ScriptedAgent(), message, paths=[path])
    report.raise_for_violations()
    cuts = report.cases[1:]
    assert len(cuts) == report.events + report.steps and all(c.reached for c in cuts)
    assert report.events >= 25  # every step type emitted (the thinking word by word)


# -- with the real server ------------------------------------------------------------------
#: A script for the server cases: every step type the server sees differently (a tool
#: thread is left out: a worker thread with autojump_clock makes virtual time leap, STYLE 4.5).
def server_script(scale: float = 1.0) -> str:
    return script(
        {"think": "weigh it"},
        {"text": "burst ", "repeat": 3},
        {"tool": "calc", "args": {"x": 6}, "result": "42", "delay": 0.5 * scale},
        {"text": "paced ", "repeat": 3, "delay": 0.2 * scale},
        {"compress": True},
        {"sleep": 0.3 * scale},
        {"text": "tail"},
    )


SERVER_SCRIPT: Final = server_script()
#: DELETE removes the session's uploads in a worker thread: its cases use the real clock,
#: with the script's delays shortened.
REAL_CLOCK_SCRIPT: Final = server_script(0.1)
SERVER_PATHS: Final = ("ws_stop", "http_stop", "delete", "interrupt", "client_gone")
STATUS_FOR_TERMINAL: Final = {"stream_end": "complete", "error": "error"}


async def uncut_events(server: Server) -> list[dict[str, Any]]:
    sid = await server.new_session()
    async with server.connect(sid) as c:
        assert (await c.recv())["type"] == "session_sync"
        await c.send_message(SERVER_SCRIPT)
        return run_events(await c.until_terminal())


async def receive_events(c: Client, n: int) -> list[dict[str, Any]]:
    """Receive until the ``n``-th run event (or the terminal one)."""
    got: list[dict[str, Any]] = []
    while len(got) < n:
        ev = await c.recv()
        if "seq" in ev:
            got.append(ev)
            if ev["type"] in TERMINAL_TYPES:
                break
    return got


async def saved_answers(server: Server, sid: str) -> list[dict[str, Any]]:
    r = await server.http.get(f"/sessions/{sid}/messages")
    assert r.status_code == 200, r.text
    return [m for m in r.json() if m["role"] == "assistant"]


def expected_status(terminal: dict[str, Any]) -> str:
    if terminal["type"] == "stream_stopped":
        return "interrupted" if terminal["reason"] == "shutdown" else "stopped"
    return STATUS_FOR_TERMINAL[terminal["type"]]


def check_delivered_and_saved(events: list[dict[str, Any]], answer: dict[str, Any]) -> None:
    assert_grammar(events)
    assert events[-1]["type"] in TERMINAL_TYPES
    assert answer["status"] == expected_status(events[-1]), (answer, events[-1])
    assert answer["content"] == text_of(events)
    assert answer["thinking"] == "".join(e["delta"] for e in events if e["type"] == "thinking_delta")
    assert len(answer["tool_calls"]) == sum(e["type"] == "tool_call" for e in events)


async def server_case(server: Server, path: str, k: int, message: str = SERVER_SCRIPT) -> None:
    """One cut, after the client's ``k``-th event of the run, by ``path``."""
    sid = await server.new_session()
    async with server.connect(sid) as c:
        assert (await c.recv())["type"] == "session_sync"
        await c.send_message(message)
        events = await receive_events(c, k)
        cut = events[-1]["type"] not in TERMINAL_TYPES
        stop_last_seq: int | None = None
        if path == "client_gone":
            pass  # leaving the block closes the WebSocket mid-run
        elif events[-1]["type"] in TERMINAL_TYPES:
            pass  # cut after the last event: nothing left to cut
        elif path == "ws_stop":
            await c.send({"type": "stop"})
        elif path == "http_stop":
            r = await server.http.post(f"/sessions/{sid}/stop")
            assert r.status_code == 200, r.text
            if r.json()["ok"]:  # answered once the run has really ended: its terminal is in the log
                stop_last_seq = r.json()["last_seq"]
        elif path == "delete":
            r = await server.http.delete(f"/sessions/{sid}")
            assert r.status_code == 204, r.text
        elif path == "interrupt":
            await c.send_message(script({"text": "next"}), if_running="interrupt")
        if path != "client_gone" and events[-1]["type"] not in TERMINAL_TYPES:
            events += run_events(await c.until_terminal())
            if stop_last_seq is not None:
                assert stop_last_seq == events[-1]["seq"], (stop_last_seq, events[-1])
            if path == "interrupt":
                after = run_events(await c.until_terminal())
                assert after[-1] == {"type": "stream_end", "seq": after[-1]["seq"], "content": "next"}
    await server.no_run_left()
    assert task_names("run:") == []
    if path == "delete" and cut:
        r = await server.http.get(f"/sessions/{sid}")
        assert r.status_code == 404
        if events[-1]["type"] == "stream_stopped":
            assert events[-1]["reason"] == "deleted"
        return
    if path == "delete":
        return
    answer = (await saved_answers(server, sid))[0]
    if path == "client_gone":  # never a stop: the run went on to its end
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1))
        assert (answer["status"], answer["content"]) == ("complete", "burst " * 3 + "paced " * 3 + "tail")
        return
    check_delivered_and_saved(events, answer)
    if events[-1]["type"] == "stream_stopped":
        assert events[-1]["reason"] == "user"


async def test_server_every_cancel_path_at_every_event(autojump_clock: trio.testing.MockClock) -> None:
    async with open_server() as server:
        n = len(await uncut_events(server))
        assert n >= 12
        for path in SERVER_PATHS:
            if path == "delete":
                continue
            for k in range(1, n + 1):
                with trio.fail_after(60):
                    await server_case(server, path, k)


async def test_server_delete_at_every_event() -> None:
    async with open_server() as server:
        n = len(await uncut_events(server))
        for k in range(1, n + 1):
            with trio.fail_after(30):
                await server_case(server, "delete", k, REAL_CLOCK_SCRIPT)


async def test_server_shutdown_at_every_event(autojump_clock: trio.testing.MockClock) -> None:
    async with open_server() as server:
        n = len(await uncut_events(server))
    for k in range(1, n + 1):
        with trio.fail_after(60):
            async with open_server(grace_s=0.01) as server:
                sid = await server.new_session()
                async with server.connect(sid) as c:
                    assert (await c.recv())["type"] == "session_sync"
                    await c.send_message(SERVER_SCRIPT)
                    events = await receive_events(c, k)
                    server.shutdown()
                    if events[-1]["type"] not in TERMINAL_TYPES:
                        events += run_events(await c.until_terminal())
                    assert await c.until_closed() == 1012  # after the drain: every answer saved
                assert_grammar(events)
                if events[-1]["type"] == "stream_stopped":
                    assert events[-1]["reason"] == "shutdown"
                (answer,) = [m for m in await server.registry.store.list_messages(sid) if m.role == "assistant"]
                check_delivered_and_saved(events, answer.as_dict())


async def set_query_only(store: SqliteStore, on: bool) -> None:
    """Make the server's database refuse (or take) writes, between two store calls."""
    async with store._limiter:
        await trio.to_thread.run_sync(store._conn.execute, f"PRAGMA query_only = {'ON' if on else 'OFF'}")


async def test_server_store_fault_at_every_event(tmp_path: Path) -> None:
    # Real clock: SQLite works in worker threads (STYLE 4.5).
    fault_script = script({"think": "weigh it"}, {"text": "w ", "repeat": 12, "delay": 0.05}, {"text": "tail"})
    async with open_server(store="sqlite", data_dir=tmp_path, checkpoint_s=0.05, save_timeout_s=5.0) as server:
        store = server.registry.store
        assert isinstance(store, SqliteStore)
        errors = 0
        for k in range(2, 16, 3):
            with trio.fail_after(30):
                sid = await server.new_session()
                async with server.connect(sid) as c:
                    assert (await c.recv())["type"] == "session_sync"
                    await c.send_message(fault_script)
                    events = await receive_events(c, k)
                    await set_query_only(store, True)
                    try:
                        if events[-1]["type"] not in TERMINAL_TYPES:
                            events += run_events(await c.until_terminal())
                    finally:
                        await set_query_only(store, False)
                await server.no_run_left()
                assert_grammar(events)
                terminal = events[-1]
                assert terminal["type"] in ("error", "stream_end"), terminal
                if terminal["type"] == "error":
                    assert re.search(r"read-?only", terminal["message"]), terminal
                    errors += 1
                # Once the database takes writes again, the refused final save is retried.
                with trio.fail_after(10):
                    answers = await saved_answers(server, sid)
                    while answers == [] or answers[0]["status"] == "running":  # bounded: fail_after
                        await trio.sleep(0.05)  # the retry is the server's, on its own timer
                        answers = await saved_answers(server, sid)
                check_delivered_and_saved(events, answers[0])
        assert errors >= 3  # the fault landed mid-run, not only after the end


def test_the_matrix_table_is_in_the_docs() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "fault-matrix.md").read_text()
    rows = [
        *(f"| {p.replace('_', ' ')} |" for p in CUT_PATHS),
        "| WebSocket `stop` |",
        "| `POST /sessions/{id}/stop`",
        '| `if_running: "interrupt"`',
        "| the client gone",
        "| `DELETE /sessions/{id}`",
        "| shutdown (a drain",
        "| store fault: the SQLite database",
        "| random sequences |",
    ]
    for row in rows:
        assert row in doc, row
    # Every row of every table reports no violation.
    for line in doc.splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[1].split(" ")[0].isdigit():
            assert cells[2] == "0", line

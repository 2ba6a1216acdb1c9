"""Log lines carry their context: session, run and connection ids (structlog contextvars)."""

from __future__ import annotations

from typing import Any

import trio

from .helpers import Server, script


async def test_run_lines_carry_session_run_and_connection(server: Server, log_events: list[dict[str, Any]]) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            await c.send_message(script({"text": "a"}, {"error": "boom"}))
            got = await c.until_terminal()
        run_id = got[0]["run_id"]
        # The terminal event is sent before the answer is saved and "run.ended" logged.
        while server.registry.active(sid) is not None:  # bounded by fail_after
            await trio.testing.wait_all_tasks_blocked()
    by_event = {e["event"]: e for e in log_events}
    opened = by_event["ws.open"]
    assert opened["session_id"] == sid and isinstance(opened["conn_id"], int)
    for name in ("run.started", "run.agent_error", "run.ended"):
        line = by_event[name]
        assert line["session_id"] == sid, line
        assert line["run_id"] == run_id, line
        assert line["conn_id"] == opened["conn_id"], line
    assert by_event["run.ended"]["status"] == "error"

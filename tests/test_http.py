"""CONTRACT section 2 end to end: the HTTP routes of a real server, with a WebSocket
watching where a route acts on a run."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from typing import Any

import pytest
import trio
import trio.testing

from .helpers import Server, assert_grammar, script, text_of

HOLD = {"tool": "hold", "args": {"why": "keep the run active"}, "delay": 30}


def _is_timestamp(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _assert_error_body(r: Any, *statuses: int) -> None:
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body, dict), body
    assert set(body) == {"detail"}, body
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert "Traceback" not in r.text
    assert 'File "' not in r.text


async def _start_holding_run(server: Server, sid: str, c: Any, *steps: dict[str, Any]) -> list[dict[str, Any]]:
    """Start a run that plays ``steps`` then holds in a 30 s tool; return the events up to
    its ``tool_started``."""
    await c.send_message(script(*steps, HOLD))
    got: list[dict[str, Any]] = await c.until("tool_started")
    assert got[-1]["tool"] == "hold"
    return got


async def test_healthz(server: Server) -> None:
    with trio.fail_after(10):
        r = await server.http.get("/healthz")
        assert r.status_code == 200
        assert r.json() == {"status": "ok"}


@pytest.mark.parametrize("body", [{}, {"title": "My chat"}])
async def test_create_session(server: Server, body: dict[str, Any]) -> None:
    with trio.fail_after(10):
        r = await server.http.post("/sessions", json=body)
        assert r.status_code == 201, r.text
        s = r.json()
        assert set(s) == {"id", "title", "user_id", "created_at"}
        assert isinstance(s["id"], str)
        assert s["id"]
        assert isinstance(s["title"], str)
        if "title" in body:
            assert s["title"] == body["title"]
        assert s["user_id"] is None
        assert _is_timestamp(s["created_at"]), s["created_at"]
        r = await server.http.get(f"/sessions/{s['id']}")
        assert r.status_code == 200
        assert r.json() == {**s, "running": False}


async def test_create_session_ids_are_unique(server: Server) -> None:
    with trio.fail_after(10):
        ids = {await server.new_session() for _ in range(5)}
        assert len(ids) == 5


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"{",
        b"[]",
        b'"a string"',
        b"42",
        b'{"title": 5}',
        b'{"title": ["a"]}',
        b'{"title": {"x": 1}}',
    ],
)
async def test_create_session_bad_body(server: Server, content: bytes) -> None:
    with trio.fail_after(10):
        r = await server.http.post("/sessions", content=content, headers={"content-type": "application/json"})
        _assert_error_body(r, 400, 422)
        # nothing was created
        r = await server.http.get("/sessions")
        assert r.json() == []


async def test_body_too_large(server: Server) -> None:
    """A body over the limit is refused with 413 (spoken over a raw socket: the server
    answers before reading it all, which httpx would report as an unfinished stream)."""
    with trio.fail_after(10):
        body = b'{"title": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        head = (
            f"POST /sessions HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        stream = await trio.open_tcp_stream(server.host, server.port)
        async with stream, trio.open_nursery() as nursery:

            async def send_all() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(head + body)

            nursery.start_soon(send_all)
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = await stream.receive_some()
                assert chunk, raw
                raw += chunk
            headers, _, rest = raw.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", headers)[1])  # type: ignore[index]
            while len(rest) < length:
                chunk = await stream.receive_some()
                assert chunk
                rest += chunk
            nursery.cancel_scope.cancel()
        status = int(headers.split(b" ", 2)[1])
        assert status in (413, 422), headers
        assert json.loads(rest[:length]).keys() == {"detail"}
        assert b"Traceback" not in rest
        r = await server.http.get("/sessions")
        assert r.json() == []


async def test_unknown_route_and_method(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        r = await server.http.get("/nope")
        _assert_error_body(r, 404)
        r = await server.http.get(f"/sessions/{sid}/nope")
        _assert_error_body(r, 404)
        r = await server.http.put(f"/sessions/{sid}", json={})
        _assert_error_body(r, 404, 405)
        r = await server.http.get(f"/sessions/{sid}/stop")
        _assert_error_body(r, 404, 405)
        # nothing was stopped or changed
        r = await server.http.get(f"/sessions/{sid}")
        assert r.status_code == 200


async def test_list_sessions(server: Server) -> None:
    with trio.fail_after(10):
        r = await server.http.get("/sessions")
        assert r.status_code == 200
        assert r.json() == []
        created = []
        for body in ({}, {"title": "second"}, {"title": "third"}):
            r = await server.http.post("/sessions", json=body)
            assert r.status_code == 201
            created.append(r.json())
        r = await server.http.get("/sessions")
        assert r.status_code == 200
        listed = r.json()
        assert isinstance(listed, list)
        assert sorted(listed, key=lambda s: s["id"]) == sorted(created, key=lambda s: s["id"])


async def test_unknown_session_is_404_on_every_route(server: Server) -> None:
    with trio.fail_after(10):
        await server.new_session()  # another session exists; it must not matter
        missing = "doesnotexist0123"
        for method, path in [
            ("GET", f"/sessions/{missing}"),
            ("DELETE", f"/sessions/{missing}"),
            ("GET", f"/sessions/{missing}/messages"),
            ("POST", f"/sessions/{missing}/stop"),
        ]:
            r = await server.http.request(method, path)
            _assert_error_body(r, 404)


async def test_deleted_session_is_404_on_every_route(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        r = await server.http.delete(f"/sessions/{sid}")
        assert r.status_code == 204
        assert r.content == b""
        for method, path in [
            ("GET", f"/sessions/{sid}"),
            ("DELETE", f"/sessions/{sid}"),
            ("GET", f"/sessions/{sid}/messages"),
            ("POST", f"/sessions/{sid}/stop"),
        ]:
            r = await server.http.request(method, path)
            _assert_error_body(r, 404)
        r = await server.http.get("/sessions")
        assert sid not in [s["id"] for s in r.json()]


async def test_messages_oldest_first_with_shape(server: Server, autojump_clock: trio.testing.MockClock) -> None:
    # Virtual time: a burst of deltas reaches this prompt reader unmerged even on a
    # loaded machine (merging starts when a delta has waited MERGE_AFTER_S).
    with trio.fail_after(10):
        sid = await server.new_session()
        r = await server.http.get(f"/sessions/{sid}/messages")
        assert r.status_code == 200
        assert r.json() == []
        first = script(
            {"think": "let me think"},
            {"tool": "lookup", "args": {"q": "x"}, "result": "found", "success": True},
            {"tool": "broken", "args": {}, "result": "boom", "success": False},
            {"text": "one "},
            {"text": "answer"},
        )
        second = script({"text": "second answer"})
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            await c.send_message(first)
            got1 = await c.until_terminal()
            await c.send_message(second)
            got2 = await c.until_terminal()
        assert_grammar(got1, merged=False)
        assert_grammar(got2, merged=False)
        assert got1[-1]["type"] == got2[-1]["type"] == "stream_end"

        r = await server.http.get(f"/sessions/{sid}/messages")
        assert r.status_code == 200
        msgs = r.json()
        assert [(m["role"], m["content"]) for m in msgs] == [
            ("user", first),
            ("assistant", "one answer"),
            ("user", second),
            ("assistant", "second answer"),
        ]
        for m in msgs:
            assert isinstance(m["id"], str)
            assert m["id"]
            assert _is_timestamp(m["created_at"])
            assert m["status"] == "complete"
            if m["role"] == "user":
                assert set(m) == {"id", "role", "content", "created_at", "status"}
            else:
                assert set(m) == {"id", "role", "content", "created_at", "status", "thinking", "tool_calls"}
        assert len({m["id"] for m in msgs}) == 4
        times = [dt.datetime.fromisoformat(m["created_at"].replace("Z", "+00:00")) for m in msgs]
        assert times == sorted(times)
        assert msgs[1]["thinking"] == "let me think"
        assert msgs[1]["tool_calls"] == [
            {"tool": "lookup", "args": {"q": "x"}, "result": "found", "success": True},
            {"tool": "broken", "args": {}, "result": "boom", "success": False},
        ]
        assert msgs[3]["thinking"] == ""
        assert msgs[3]["tool_calls"] == []


async def test_running_flag(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        r = await server.http.get(f"/sessions/{sid}")
        assert r.status_code == 200
        assert r.json()["running"] is False
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            got = await _start_holding_run(server, sid, c)
            r = await server.http.get(f"/sessions/{sid}")
            assert r.status_code == 200
            assert r.json()["running"] is True
            r = await server.http.post(f"/sessions/{sid}/stop")
            assert r.json()["ok"] is True
            got += await c.until_terminal()
        assert_grammar(got, merged=False)
        r = await server.http.get(f"/sessions/{sid}")
        assert r.json()["running"] is False


async def test_stop_without_run(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        r = await server.http.post(f"/sessions/{sid}/stop")
        assert r.status_code == 200
        assert r.json() == {"ok": False, "reason": "no active run"}
        # also after a finished run
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            await c.send_message(script({"text": "done"}))
            got = await c.until_terminal()
        assert_grammar(got, merged=False)
        r = await server.http.post(f"/sessions/{sid}/stop")
        assert r.status_code == 200
        assert r.json() == {"ok": False, "reason": "no active run"}


async def test_stop_during_run(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            got = await _start_holding_run(server, sid, c, {"think": "pondering"}, {"text": "partial "})
            r = await server.http.post(f"/sessions/{sid}/stop")
            # the answer is there the moment the stop answers: the run has really ended
            assert server.registry.active(sid) is None
            msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
            running = (await server.http.get(f"/sessions/{sid}")).json()["running"]
            got += await c.until_terminal()
        assert r.status_code == 200
        body = r.json()
        assert set(body) == {"ok", "last_seq"}
        assert body["ok"] is True
        assert_grammar(got, merged=False)
        terminal = got[-1]
        assert terminal["type"] == "stream_stopped"
        assert terminal["reason"] == "user"
        assert terminal["content"] == "partial "
        assert body["last_seq"] == terminal["seq"]
        # the cut-short tool got its tool_call before the terminal event
        assert got[-2]["type"] == "tool_call"
        assert got[-2]["success"] is False
        assert got[-2]["result"] == "cancelled"

        assert running is False
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        answer = msgs[1]
        assert answer["status"] == "stopped"
        assert answer["content"] == "partial " == text_of(got)
        assert answer["thinking"] == "pondering"
        assert answer["tool_calls"] == [
            {"tool": "hold", "args": {"why": "keep the run active"}, "result": "cancelled", "success": False}
        ]

        # a stop answers once only: the run is gone
        r = await server.http.post(f"/sessions/{sid}/stop")
        assert r.json() == {"ok": False, "reason": "no active run"}


async def test_stop_from_http_lets_a_new_run_start(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            got = await _start_holding_run(server, sid, c)
            r = await server.http.post(f"/sessions/{sid}/stop")
            assert r.json()["ok"] is True
            got += await c.until_terminal()
            assert_grammar(got, merged=False)
            await c.send_message(script({"text": "again"}))
            got2 = await c.until_terminal()
        assert_grammar(got2, merged=False)
        assert got2[-1] == {"type": "stream_end", "seq": got2[-1]["seq"], "content": "again"}
        assert got2[0]["run_id"] != got[0]["run_id"]


async def test_delete_during_run(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        other = await server.new_session("unrelated")
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            got = await _start_holding_run(server, sid, c, {"text": "half"})
            r = await server.http.delete(f"/sessions/{sid}")
            assert r.status_code == 204
            assert r.content == b""
            assert server.registry.active(sid) is None
            got += await c.until_terminal()
            code = await c.until_closed()
        assert_grammar(got, merged=False)
        terminal = got[-1]
        assert terminal["type"] == "stream_stopped"
        assert terminal["reason"] == "deleted"
        assert terminal["content"] == "half"
        assert got[-2]["type"] == "tool_call"
        assert got[-2]["result"] == "cancelled"
        assert code == 4004
        # nothing of the run followed its terminal event before the close
        assert c.received[-1] == terminal
        r = await server.http.get(f"/sessions/{sid}")
        _assert_error_body(r, 404)
        r = await server.http.get(f"/sessions/{sid}/messages")
        _assert_error_body(r, 404)
        r = await server.http.get("/sessions")
        assert [s["id"] for s in r.json()] == [other]
        r = await server.http.get(f"/sessions/{other}")
        assert r.status_code == 200


async def test_delete_idle_session_closes_its_sockets(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            assert (await c.recv()) == {"type": "session_sync"}
            r = await server.http.delete(f"/sessions/{sid}")
            assert r.status_code == 204
            code = await c.until_closed()
        assert code == 4004
        assert c.received == [{"type": "session_sync"}]
        async with server.connect(sid) as c2:
            assert await c2.until_closed() == 4004

"""CONTRACT sections 3 and 4 end to end: the WebSocket protocol and the scripted agent,
against a real hypercorn server with real trio-websocket clients (real clock)."""

from __future__ import annotations

import gc
import json
import re
import time
from typing import Any

import pytest
import trio
import trio.testing

from .helpers import Client, Server, assert_grammar, open_server, run_events, script, text_of

EXPECTED = "Expected {type: 'message', content: '...'}"
ALREADY = "Agent is already running for this session."
HOLD = {"tool": "hold", "args": {"n": 1}, "delay": 30}

Events = list[dict[str, Any]]


def split_runs(events: Events) -> list[Events]:
    """The run events a client saw, one list per run (each starting at stream_start)."""
    runs: list[Events] = []
    for e in run_events(events):
        if e["type"] == "stream_start":
            runs.append([])
        assert runs, f"run event before any stream_start: {e}"
        runs[-1].append(e)
    return runs


def types(events: Events) -> list[str]:
    return [e["type"] for e in events]


async def expect_sync(c: Client) -> None:
    first = await c.recv()
    assert first == {"type": "session_sync"}, first


async def run_once(server: Server, content: str) -> Events:
    """One run on a fresh session from a fresh connection; its events up to the terminal."""
    sid = await server.new_session()
    async with server.connect(sid) as c:
        await expect_sync(c)
        await c.send_message(content)
        return await c.until_terminal()


async def assert_usable(c: Client, text: str = "still here") -> Events:
    """A valid message on ``c`` starts a run that completes."""
    await c.send_message(script({"text": text}))
    got = await c.until_terminal()
    run = split_runs(got)
    assert len(run) == 1, got
    assert_grammar(run[0], merged=False)
    assert run[0][-1]["type"] == "stream_end"
    assert run[0][-1]["content"] == text
    return got


# -- connect ---------------------------------------------------------------------------


async def test_unknown_session_closes_4004(server: Server) -> None:
    with trio.fail_after(10):
        async with server.connect("nosuchsession123") as c:
            code = await c.until_closed()
        assert code == 4004
        assert c.received == []


async def test_connect_without_run_gets_session_sync(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            # nothing else is sent: the next frame is whatever our own message causes
            got = await assert_usable(c)
        assert got[0]["type"] == "stream_start"


async def test_idle_connection_keeps_no_exception_alive(server: Server) -> None:
    """An idle writer parks outside its ``except trio.WouldBlock`` block: parked inside
    it, every idle connection would keep the exception and its traceback alive."""
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await trio.testing.wait_all_tasks_blocked()
            assert [o for o in gc.get_objects() if isinstance(o, trio.WouldBlock)] == []


# -- the scripted agent, step by step --------------------------------------------------


async def test_think_step(server: Server, autojump_clock: trio.testing.MockClock) -> None:
    # Virtual time: a burst of deltas reaches this prompt reader unmerged even on a
    # loaded machine (merging starts when a delta has waited MERGE_AFTER_S).
    with trio.fail_after(10):
        got = await run_once(server, script({"think": "one two three"}, {"text": "done"}))
    assert_grammar(got, merged=False)
    t = types(got)
    assert t[0] == "stream_start"
    i = t.index("thinking_end")
    assert i >= 2
    assert set(t[1:i]) == {"thinking_delta"}
    assert "".join(e["delta"] for e in got[1:i]) == "one two three"
    assert t[i + 1 :] == ["stream_delta", "stream_end"]
    assert got[-1]["content"] == "done"


async def test_text_step_repeat_and_delay(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            t0 = trio.current_time()
            await c.send_message(script({"text": "ab", "repeat": 4, "delay": 0.1}))
            got = [await c.recv()]
            arrivals = []
            while got[-1]["type"] != "stream_end":
                got.append(await c.recv())
                arrivals.append(trio.current_time())
    assert_grammar(got, merged=False)
    assert types(got) == ["stream_start"] + ["stream_delta"] * 4 + ["stream_end"]
    assert [e["delta"] for e in got[1:5]] == ["ab"] * 4
    assert got[-1]["content"] == "abababab" == text_of(got)
    # 4 deltas 0.1 s apart: the last one cannot arrive before 0.3 s after the message
    assert arrivals[3] - t0 >= 0.28


async def test_text_step_default_repeat_is_one(server: Server) -> None:
    with trio.fail_after(10):
        got = await run_once(server, script({"text": "once"}))
    assert_grammar(got, merged=False)
    assert types(got) == ["stream_start", "stream_delta", "stream_end"]
    assert got[1]["delta"] == "once"
    assert got[2]["content"] == "once"


async def test_text_step_stamp(server: Server) -> None:
    with trio.fail_after(10):
        before = time.time()
        got = await run_once(server, script({"text": "hi", "repeat": 3, "delay": 0.05, "stamp": True}))
        after = time.time()
    assert_grammar(got, merged=False)
    deltas = [e for e in got if e["type"] == "stream_delta"]
    assert len(deltas) == 3
    stamps = []
    for e in deltas:
        m = re.fullmatch(r"\[t=(\d+\.\d{6})\]hi", e["delta"])
        assert m, e["delta"]
        stamps.append(float(m[1]))
    assert before - 0.01 <= stamps[0] <= stamps[1] <= stamps[2] <= after + 0.01
    assert stamps[2] - stamps[0] >= 0.09  # emitted 0.05 s apart
    assert got[-1]["content"] == text_of(got)


async def test_tool_step(server: Server) -> None:
    with trio.fail_after(10):
        got = await run_once(
            server,
            script(
                {"tool": "search", "args": {"q": "trio", "n": 2}, "result": "3 hits"},
                {"tool": "flaky", "args": {}, "result": "it broke", "success": False, "delay": 0.05},
                {"tool": "worker", "args": {"x": [1]}, "result": "ok", "thread": True, "delay": 0.05},
                {"text": "end"},
            ),
        )
    assert_grammar(got, merged=False)
    assert types(got) == [
        "stream_start",
        *["tool_started", "tool_call"] * 3,
        "stream_delta",
        "stream_end",
    ]
    assert got[1] == {
        "type": "tool_started",
        "seq": 2,
        "tool": "search",
        "args": {"q": "trio", "n": 2},
        "is_subagent": False,
    }
    assert got[2] == {
        "type": "tool_call",
        "seq": 3,
        "tool": "search",
        "args": {"q": "trio", "n": 2},
        "result": "3 hits",
        "success": True,
        "is_subagent": False,
    }
    assert got[3]["tool"] == "flaky"
    assert got[3]["is_subagent"] is False
    assert got[4] == {
        "type": "tool_call",
        "seq": 5,
        "tool": "flaky",
        "args": {},
        "result": "it broke",
        "success": False,
        "is_subagent": False,
    }
    assert got[5]["tool"] == "worker"
    assert got[6]["tool"] == "worker"
    assert got[6]["result"] == "ok"
    assert got[6]["success"] is True


async def test_tool_step_delay_waits(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(
                script({"tool": "slow", "delay": 0.3}, {"tool": "slow2", "thread": True, "delay": 0.3})
            )
            got = await c.until("tool_started")
            t0 = trio.current_time()
            got += await c.until("tool_call")
            t1 = trio.current_time()
            got += await c.until("tool_call")
            t2 = trio.current_time()
            got += await c.until_terminal()
    assert_grammar(got, merged=False)
    assert t1 - t0 >= 0.25
    assert t2 - t1 >= 0.25


async def test_sleep_step(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"text": "a"}, {"sleep": 0.3}, {"text": "b"}))
            got = await c.until("stream_delta")
            t0 = trio.current_time()
            got += await c.until_terminal()
            t1 = trio.current_time()
    assert_grammar(got, merged=False)
    assert types(got) == ["stream_start", "stream_delta", "stream_delta", "stream_end"]
    assert t1 - t0 >= 0.25
    assert got[-1]["content"] == "ab"


async def test_compress_step(server: Server) -> None:
    with trio.fail_after(10):
        got = await run_once(server, script({"text": "a"}, {"compress": True}, {"text": "b"}))
    assert_grammar(got, merged=False)
    assert types(got) == ["stream_start", "stream_delta", "context_compressed", "stream_delta", "stream_end"]
    assert got[2] == {"type": "context_compressed", "seq": 3}
    assert got[-1]["content"] == "ab"


async def test_error_step(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"text": "partial"}, {"error": "The model refused."}, {"text": "never"}))
            got = await c.until_terminal()
            after = await assert_usable(c)
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    assert_grammar(got, merged=False)
    assert types(got) == ["stream_start", "stream_delta", "error"]
    assert got[-1] == {"type": "error", "seq": 3, "message": "The model refused."}
    assert "never" not in text_of(after)
    assert [(m["role"], m["status"]) for m in msgs] == [
        ("user", "complete"),
        ("assistant", "error"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert msgs[1]["content"] == "partial"


async def test_crash_step_and_the_server_carries_on(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"text": "partial"}, {"crash": True}))
            got = await c.until_terminal()
            # the same socket still works, and so does a new session
            await assert_usable(c)
            other = await run_once(server, script({"text": "fine"}))
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
        health = await server.http.get("/healthz")
    assert_grammar(got, merged=False)
    assert types(got) == ["stream_start", "stream_delta", "error"]
    message = got[-1]["message"]
    assert isinstance(message, str)
    assert message
    assert "Traceback" not in message
    assert_grammar(other, merged=False)
    assert other[-1]["content"] == "fine"
    assert msgs[1]["status"] == "error"
    assert msgs[1]["content"] == "partial"
    assert health.status_code == 200


async def test_demo_without_script(server: Server) -> None:
    text = "hello brave new world"
    with trio.fail_after(10):
        got = await run_once(server, text)
    assert_grammar(got, merged=False)
    t = types(got)
    # stream_start, thinking_delta+, thinking_end, tool_started, tool_call, stream_delta+, stream_end
    assert t[0] == "stream_start"
    i = t.index("thinking_end")
    assert i >= 2
    assert set(t[1:i]) == {"thinking_delta"}
    assert t[i + 1 : i + 3] == ["tool_started", "tool_call"]
    assert got[i + 1]["tool"] == got[i + 2]["tool"]
    assert got[i + 2]["success"] is True
    assert t[-1] == "stream_end"
    assert set(t[i + 3 : -1]) == {"stream_delta"}
    assert len(t[i + 3 : -1]) >= 2  # word deltas, not one blob
    assert text_of(got) == text == got[-1]["content"]


async def test_content_is_concatenated_deltas_and_seq_is_1_to_n(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time: a burst of deltas reaches this prompt reader unmerged even on a
    # loaded machine (merging starts when a delta has waited MERGE_AFTER_S).
    with trio.fail_after(10):
        got = await run_once(
            server,
            script(
                {"think": "a b"},
                {"text": "x", "repeat": 3},
                {"tool": "t"},
                {"compress": True},
                {"text": "yz ", "repeat": 2, "delay": 0.01},
            ),
        )
    assert_grammar(got, merged=False)
    assert [e["seq"] for e in got] == list(range(1, len(got) + 1))
    assert got[-1]["type"] == "stream_end"
    assert got[-1]["content"] == text_of(got) == "xxxyz yz "


async def test_burst_content_equals_deltas(server: Server) -> None:
    with trio.fail_after(10):
        got = await run_once(server, script({"text": "ab", "repeat": 500}, {"text": "!"}))
    assert_grammar(got)  # a burst may reach a busy reader merged
    assert got[-1]["type"] == "stream_end"
    assert got[-1]["content"] == text_of(got) == "ab" * 500 + "!"
    assert got[-1]["seq"] == 1 + 500 + 1 + 1


# -- bad client messages -----------------------------------------------------------------


BAD_INPUTS: list[tuple[str, str | bytes, str]] = [
    ("not-json", "this is not json", "Invalid JSON"),
    ("truncated-json", '{"type": "message", "content": "x"', "Invalid JSON"),
    ("binary-not-utf8", b"\xff\xfe\x00", "Invalid JSON"),
    ("json-list", "[]", EXPECTED),
    ("json-string", '"message"', EXPECTED),
    ("json-null", "null", EXPECTED),
    ("wrong-type", json.dumps({"type": "chat", "content": "hi"}), EXPECTED),
    ("no-type", json.dumps({"content": "hi"}), EXPECTED),
    ("no-content", json.dumps({"type": "message"}), EXPECTED),
    ("empty-content", json.dumps({"type": "message", "content": ""}), EXPECTED),
    ("content-not-str", json.dumps({"type": "message", "content": 5}), EXPECTED),
    (
        "nine-images",
        json.dumps({"type": "message", "content": "x", "images": ["aGk="] * 9}),
        "Too many images (9). Max 8 allowed.",
    ),
    (
        "twelve-images",
        json.dumps({"type": "message", "content": "x", "images": ["data:image/png;base64,aGk="] * 12}),
        "Too many images (12). Max 8 allowed.",
    ),
]


@pytest.mark.parametrize(("frame", "expected"), [p[1:] for p in BAD_INPUTS], ids=[p[0] for p in BAD_INPUTS])
async def test_bad_input_answers_error_and_connection_stays_usable(
    server: Server, frame: str | bytes, expected: str
) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.ws.send_message(frame)
            err = await c.recv()
            assert err == {"type": "error", "message": expected}
            await assert_usable(c)
        # the refused message started nothing: one run only
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
        assert [m["role"] for m in msgs] == ["user", "assistant"]


async def test_eight_images_are_accepted(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message("look at these", images=["aGk="] * 4 + ["data:image/png;base64,aGk="] * 4)
            got = await c.until_terminal()
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    assert_grammar(got, merged=False)
    assert got[-1]["type"] == "stream_end"
    assert got[-1]["content"].startswith("look at these")
    assert msgs[0]["content"] == "look at these"  # the history shows what the user wrote


async def test_script_with_images_still_plays_the_script(server: Server) -> None:
    """Content that is a ``{"script": [...]}`` object plays its steps (CONTRACT section 4),
    with or without images attached."""
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"text": "seen"}), images=["aGk="])
            got = await c.until_terminal()
    assert_grammar(got, merged=False)
    assert got[-1] == {"type": "stream_end", "seq": 3, "content": "seen"}


async def test_images_over_50_mb(server: Server) -> None:
    """The app's own 50 MB check answers (the server must accept such a frame: hypercorn's
    default limit is 16 MiB, ``navi_trio.server.hypercorn_config`` raises it)."""
    await _check_oversized_images(server)


async def _check_oversized_images(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            big = "A" * (26 * 1024 * 1024)  # two of them: 52 MiB of base64, over 50 MB either way
            await c.send_message("look", images=[big, "data:image/png;base64," + big])
            del big
            err = await c.recv()
            assert err == {"type": "error", "message": "Total image payload exceeds 50 MB limit."}
            await assert_usable(c)


async def test_file_that_is_not_an_upload(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message("read it", files=[{"name": "secret-notes.txt", "path": "/etc/passwd"}])
            err = await c.recv()
            assert err["type"] == "error"
            assert "seq" not in err
            assert "secret-notes.txt" in err["message"]
            assert "root:" not in err["message"]  # nothing was read
            await assert_usable(c)
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
        assert [m["content"] for m in msgs if m["role"] == "user"] == [script({"text": "still here"})]


async def test_message_while_run_active_is_refused(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c, server.connect(sid) as other:
            await expect_sync(c)
            await expect_sync(other)
            await c.send_message(script({"text": "first "}, HOLD))
            got = await c.until("tool_started")
            await c.send_message(script({"text": "second"}))
            err = await c.recv()
            assert err == {"type": "error", "message": ALREADY}
            # explicit reject, from another connection of the same session
            await other.send_message(script({"text": "third"}), if_running="reject")
            other_got = await other.until("error")
            assert other_got[-1] == {"type": "error", "message": ALREADY}
            assert server.registry.active(sid) is not None
            await c.send({"type": "stop"})
            got += await c.until_terminal()
            other_got += await other.until_terminal()
            after = await assert_usable(c)
    assert_grammar(got, merged=False)
    assert got[-1]["type"] == "stream_stopped"
    assert got[-1]["content"] == "first "
    assert_grammar(other_got)
    assert split_runs(after)[0][0]["run_id"] != got[0]["run_id"]


# -- if_running ------------------------------------------------------------------------


async def test_if_running_interrupt(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"text": "old "}, HOLD))
            got = await c.until("tool_started")
            await c.send_message(script({"text": "new"}), if_running="interrupt")
            got += await c.until_terminal()
            got += await c.until_terminal()
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    first, second = split_runs(got)
    assert_grammar(first, merged=False)
    assert_grammar(second, merged=False)
    assert first[-2]["type"] == "tool_call"
    assert first[-2]["result"] == "cancelled"
    assert first[-1]["type"] == "stream_stopped"
    assert first[-1]["reason"] == "user"
    assert first[-1]["content"] == "old "
    assert second[0]["run_id"] != first[0]["run_id"]
    assert second[-1] == {"type": "stream_end", "seq": 3, "content": "new"}
    # nothing but the two runs was sent (no error answer)
    assert not [e for e in got if "seq" not in e]
    assert [(m["role"], m["status"], m["content"]) for m in msgs[1::2]] == [
        ("assistant", "stopped", "old "),
        ("assistant", "complete", "new"),
    ]


async def test_if_running_interrupt_without_active_run_just_runs(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"text": "fresh"}), if_running="interrupt")
            got = await c.until_terminal()
    assert_grammar(got, merged=False)
    assert got[-1]["content"] == "fresh"


async def test_if_running_interrupt_twice_keeps_the_order(tmp_path: Any) -> None:
    """Two interrupting messages in a row: the later one must not overtake the earlier
    one (which would answer it first, then start the older message after it).

    The SQLite store saves the stopped answer in a worker thread, so both messages
    reliably arrive while the first run is still ending."""
    with trio.fail_after(10):
        async with open_server(store="sqlite", data_dir=str(tmp_path)) as server:
            sid = await server.new_session()
            async with server.connect(sid) as c:
                await expect_sync(c)
                await c.send_message(script(HOLD))
                got = await c.until("tool_started")
                one = script({"text": "one"}, HOLD)
                two = script({"text": "two"})
                await c.send_message(one, if_running="interrupt")
                await c.send_message(two, if_running="interrupt")
                while not (got[-1]["type"] == "stream_end" and got[-1]["content"] == "two"):
                    got += await c.until_terminal()
                two_id = split_runs(got)[-1][0]["run_id"]
                while (run := server.registry.active(sid)) is not None and run.id == two_id:
                    await run.done.wait()
                still_active = server.registry.active(sid)
                leftover = None if still_active is None else still_active.request.original_content
                if still_active is not None:
                    await server.http.post(f"/sessions/{sid}/stop")
                msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    for r in split_runs(got):
        assert_grammar(r, merged=False)
    assert leftover is None, f"an older message started after the newer one was answered: {leftover}"
    users = [m["content"] for m in msgs if m["role"] == "user"]
    assert users in ([script(HOLD), one, two], [script(HOLD), two])


async def test_if_running_enqueue(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"tool": "wait", "delay": 0.3}, {"text": "A"}))
            got = await c.until("tool_started")
            await c.send_message(script({"text": "B"}), if_running="enqueue")
            got += await c.until_terminal()
            got += await c.until_terminal()
    first, second = split_runs(got)
    assert_grammar(first, merged=False)
    assert_grammar(second, merged=False)
    assert first[-1] == {"type": "stream_end", "seq": first[-1]["seq"], "content": "A"}
    assert types(first) == ["stream_start", "tool_started", "tool_call", "stream_delta", "stream_end"]
    assert first[2]["success"] is True
    assert first[2]["result"] != "cancelled"
    assert second[0]["run_id"] != first[0]["run_id"]
    assert second[-1] == {"type": "stream_end", "seq": 3, "content": "B"}
    assert not [e for e in got if "seq" not in e]


async def test_if_running_enqueue_over_the_bound(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"text": "head "}, HOLD))
            got = await c.until("tool_started")
            for i in range(4):
                await c.send_message(script({"text": f"q{i}"}), if_running="enqueue")
            await c.send_message(script({"text": "too many"}), if_running="enqueue")
            err = await c.recv()
            assert err["type"] == "error"
            assert "seq" not in err
            assert isinstance(err["message"], str)
            assert err["message"]
            await c.send({"type": "stop"})
            for _ in range(5):
                got += await c.until_terminal()
            run = server.registry.active(sid)
            if run is not None:
                await run.done.wait()
            assert server.registry.active(sid) is None
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    runs = split_runs(got)
    assert len(runs) == 5
    for r in runs:
        assert_grammar(r, merged=False)
    assert runs[0][-1]["type"] == "stream_stopped"
    assert runs[0][-1]["reason"] == "user"
    assert [r[-1]["content"] for r in runs[1:]] == ["q0", "q1", "q2", "q3"]
    assert [r[-1]["type"] for r in runs[1:]] == ["stream_end"] * 4
    assert "too many" not in json.dumps(msgs)
    assert len(msgs) == 10


ROUNDS = 200


async def test_message_right_after_terminal_event_is_not_refused(tmp_path: Any) -> None:
    """A client that has seen a run's terminal event may send its next message at once.

    With the SQLite store the answer is saved in a worker thread after the terminal
    event is sent, and until then the run still counts as active."""
    with trio.fail_after(10):
        async with open_server(store="sqlite", data_dir=str(tmp_path)) as srv:
            sid = await srv.new_session()
            async with srv.connect(sid) as c:
                await expect_sync(c)
                refused = 0
                for i in range(ROUNDS):
                    await c.send_message(script({"text": f"m{i}"}))
                    first = await c.recv()
                    if first == {"type": "error", "message": ALREADY}:
                        refused += 1
                        while srv.registry.active(sid) is not None:
                            run = srv.registry.active(sid)
                            assert run is not None
                            await run.done.wait()
                        await c.send_message(script({"text": f"m{i}"}))
                        first = await c.recv()
                    assert first["type"] == "stream_start", first
                    got = [first, *await c.until_terminal()]
                    assert_grammar(got, merged=False)
                    assert got[-1]["content"] == f"m{i}"
    assert refused == 0, f"{refused} of {ROUNDS} messages sent right after stream_end were refused"


# -- stop --------------------------------------------------------------------------------


async def test_stop_over_websocket(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"think": "hmm"}, {"text": "so far"}, HOLD, {"text": "never"}))
            got = await c.until("tool_started")
            await c.send({"type": "stop"})
            got += await c.until_terminal()
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    assert_grammar(got, merged=False)
    assert types(got)[-3:] == ["tool_started", "tool_call", "stream_stopped"]
    assert got[-2] == {
        "type": "tool_call",
        "seq": got[-3]["seq"] + 1,
        "tool": "hold",
        "args": {"n": 1},
        "result": "cancelled",
        "success": False,
        "is_subagent": False,
    }
    assert got[-1] == {"type": "stream_stopped", "seq": got[-2]["seq"] + 1, "content": "so far", "reason": "user"}
    assert msgs[1]["status"] == "stopped"
    assert msgs[1]["content"] == "so far"


async def test_stop_during_threaded_tool(server: Server) -> None:
    with trio.fail_after(10):
        got = []
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script({"tool": "blocking", "thread": True, "delay": 30}))
            got += await c.until("tool_started")
            await c.send({"type": "stop"})
            got += await c.until_terminal()
    assert_grammar(got, merged=False)
    assert got[-2]["type"] == "tool_call"
    assert got[-2]["result"] == "cancelled"
    assert got[-2]["success"] is False
    assert got[-1]["type"] == "stream_stopped"
    assert got[-1]["reason"] == "user"


async def test_stop_then_message_right_away(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send_message(script(HOLD))
            got = await c.until("tool_started")
            await c.send({"type": "stop"})
            await c.send_message(script({"text": "next"}))  # no waiting for the terminal event
            got += await c.until_terminal()
            got += await c.until_terminal()
    assert not [e for e in got if "seq" not in e], got
    first, second = split_runs(got)
    assert_grammar(first, merged=False)
    assert_grammar(second, merged=False)
    assert first[-1]["type"] == "stream_stopped"
    assert second[-1]["content"] == "next"


async def test_stop_without_run_over_websocket_keeps_connection(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            await expect_sync(c)
            await c.send({"type": "stop"})
            assert await c.recv() == {"type": "error", "message": "No active run to stop."}
            await c.send_message(script({"text": "ok"}))
            got = await c.until_terminal()
            # Once the run is over, a stop is answered the same way.
            await c.send({"type": "stop"})
            assert await c.recv() == {"type": "error", "message": "No active run to stop."}
    runs = split_runs(got)
    assert len(runs) == 1
    assert_grammar(runs[0], merged=False)
    assert runs[0][-1]["content"] == "ok"


class _ThinkForever:
    """An agent that opens thinking and waits (the scripted agent always closes thinking
    in the same step, so a stop can never catch it open)."""

    async def play(self, ctx: Any) -> None:
        ctx.emit_text("before ")
        ctx.emit_thinking("still ")
        ctx.emit_thinking("thinking")
        await trio.sleep(30)
        ctx.emit_thinking_end()


async def test_stop_while_thinking_gets_thinking_end(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time: the thinking deltas reach the reader unmerged on a loaded machine too.
    monkeypatch.setattr("navi_trio.app.make_agent", lambda *_args, **_kwargs: _ThinkForever())
    with trio.fail_after(10):
        async with open_server() as srv:
            sid = await srv.new_session()
            async with srv.connect(sid) as c:
                await expect_sync(c)
                await c.send_message("think")
                got = await c.until("thinking_delta")
                got += await c.until("thinking_delta")
                await c.send({"type": "stop"})
                got += await c.until_terminal()
            msgs = (await srv.http.get(f"/sessions/{sid}/messages")).json()
    assert_grammar(got, merged=False)
    assert types(got) == [
        "stream_start",
        "stream_delta",
        "thinking_delta",
        "thinking_delta",
        "thinking_end",
        "stream_stopped",
    ]
    assert got[-1]["reason"] == "user"
    assert got[-1]["content"] == "before "
    assert msgs[1]["thinking"] == "still thinking"
    assert msgs[1]["status"] == "stopped"


# -- attach, resume, two tabs, disconnect ----------------------------------------------------


async def test_attach_to_active_run(server: Server, autojump_clock: trio.testing.MockClock) -> None:
    # Virtual time: a burst of deltas reaches this prompt reader unmerged even on a
    # loaded machine (merging starts when a delta has waited MERGE_AFTER_S).
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as a:
            await expect_sync(a)
            await a.send_message(script({"think": "x y"}, {"text": "one ", "repeat": 3}, {"tool": "t"}, HOLD))
            seen_a = await a.until("tool_started")
            while seen_a[-1].get("tool") != "hold":
                seen_a += await a.until("tool_started")
            async with server.connect(sid) as b:
                first = await b.recv()
                assert first["type"] == "stream_start"
                assert first == seen_a[0]  # same run_id, seq 1
                rs = await b.recv()
                assert rs["type"] == "replay_start"
                assert "seq" not in rs
                replayed = [await b.recv() for _ in range(rs["count"])]
                assert all("seq" in e for e in replayed), replayed
                end = await b.recv()
                assert end == {"type": "replay_end"}
                # everything so far came in the replay; now the live part
                r = await server.http.post(f"/sessions/{sid}/stop")
                assert r.json()["ok"] is True
                live = await b.until_terminal()
                seen_a += await a.until_terminal()
                sync = await b.recv()
    assert sync == {"type": "session_sync"}
    assert_grammar(seen_a, merged=False)
    seen_b = [first, *replayed, *live]
    assert_grammar(seen_b)
    assert replayed[-1]["seq"] == seen_a[-3]["seq"]  # up to the hold's tool_started
    assert types(live) == ["tool_call", "stream_stopped"]
    assert live == seen_a[-2:]
    assert text_of(seen_b) == text_of(seen_a) == "one one one "
    # every replayed non-delta event is exactly what A saw
    by_seq = {e["seq"]: e for e in seen_a}
    for e in replayed:
        if e["type"] not in ("stream_delta", "thinking_delta"):
            assert e == by_seq[e["seq"]]


async def test_attach_then_run_completes(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as a:
            await expect_sync(a)
            await a.send_message(
                script({"text": "a "}, {"tool": "gate", "delay": 0.5}, {"text": "b ", "repeat": 3, "delay": 0.02})
            )
            seen_a = await a.until("tool_started")
            async with server.connect(sid) as b:
                seen_b = await b.until("replay_end")
                seen_b += await b.until_terminal()
                seen_b.append(await b.recv())
            seen_a += await a.until_terminal()
    assert seen_b[-1] == {"type": "session_sync"}
    assert types(seen_b)[:2] == ["stream_start", "replay_start"]
    i = types(seen_b).index("replay_end")
    assert seen_b[1]["count"] == i - 2
    assert_grammar(seen_a, merged=False)
    assert_grammar(seen_b)
    assert seen_b[-2] == seen_a[-1]
    assert seen_a[-1]["type"] == "stream_end"
    assert text_of(seen_b) == text_of(seen_a) == "a b b b "


async def test_resume_after_seq(server: Server, autojump_clock: trio.testing.MockClock) -> None:
    # Virtual time: a burst of deltas reaches this prompt reader unmerged even on a
    # loaded machine (merging starts when a delta has waited MERGE_AFTER_S).
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as a:
            await expect_sync(a)
            await a.send_message(script({"think": "p q"}, {"text": "x"}, {"compress": True}, {"text": "y"}, HOLD))
            seen_a = await a.until("tool_started")
            run_id = seen_a[0]["run_id"]
            n = 3
            async with server.connect(sid, query=f"run_id={run_id}&after={n}") as b:
                first = await b.recv()
                assert first == seen_a[0]  # stream_start, seq 1, as every attach begins
                rs = await b.recv()
                assert rs["type"] == "replay_start"
                replayed = [await b.recv() for _ in range(rs["count"])]
                end = await b.recv()
                assert end == {"type": "replay_end"}
                await b.send({"type": "stop"})
                live = await b.until_terminal()
                sync = await b.recv()
            seen_a += await a.until_terminal()
    assert sync == {"type": "session_sync"}
    assert_grammar(seen_a, merged=False)
    assert [e["type"] for e in b.received].count("stream_start") == 1
    seqs = [e["seq"] for e in replayed + live]
    assert seqs == sorted(set(seqs))
    assert seqs[0] > n
    assert replayed == [e for e in seen_a if n < e["seq"] <= seen_a[-3]["seq"]]  # no deltas adjacent to merge
    assert live == seen_a[-2:]
    assert types(live) == ["tool_call", "stream_stopped"]


async def test_resume_with_merged_deltas_keeps_text(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as a:
            await expect_sync(a)
            await a.send_message(script({"text": "ab", "repeat": 5}, {"text": "cd", "repeat": 5}, HOLD))
            seen_a = await a.until("tool_started")
            async with server.connect(sid, query=f"run_id={seen_a[0]['run_id']}&after=3") as b:
                got = await b.until("replay_end")
                await server.http.post(f"/sessions/{sid}/stop")
                got += await b.until_terminal()
            seen_a += await a.until_terminal()
    assert got[0] == seen_a[0]  # stream_start (seq 1) first, then the replay
    assert got[1]["type"] == "replay_start"
    assert got[1]["count"] == types(got).index("replay_end") - 2
    evs = run_events(got)[1:]
    seqs = [e["seq"] for e in evs]
    assert seqs == sorted(set(seqs))
    assert seqs[0] > 3
    # seq 1 is stream_start, 2..6 are "ab", 7..11 are "cd": after seq 3, three "ab" remain
    assert text_of(got) == "ab" * 3 + "cd" * 5
    assert evs[-1] == seen_a[-1]
    assert_grammar(seen_a)  # a burst of ten deltas may reach even a prompt reader merged
    assert text_of(seen_a) == "ab" * 5 + "cd" * 5


async def test_resume_stale_run_id_gets_session_sync(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as a:
            await expect_sync(a)
            await a.send_message(script({"text": "old"}))
            old = await a.until_terminal()
            assert_grammar(old, merged=False)
            # no run active now
            async with server.connect(sid, query=f"run_id={old[0]['run_id']}&after=1") as b:
                await expect_sync(b)
                # and it follows the session: a later run streams to it live
                await a.send_message(script({"text": "later"}))
                later_b = await b.until_terminal()
            later_a = await a.until_terminal()
            # a stale run_id while another run is active: session_sync, then that run
            await a.send_message(script({"text": "current "}, HOLD))
            cur_a = await a.until("tool_started")
            async with server.connect(sid, query=f"run_id={old[0]['run_id']}&after=2") as b2:
                await expect_sync(b2)
                cur_b = await b2.until("replay_end")
                await b2.send({"type": "stop"})
                cur_b += await b2.until_terminal()
            cur_a += await a.until_terminal()
    assert_grammar(later_b, merged=False)
    assert later_b == later_a
    assert cur_b[0]["type"] == "stream_start"
    assert cur_b[0]["run_id"] == cur_a[0]["run_id"] != old[0]["run_id"]
    assert_grammar(cur_b)
    assert_grammar(cur_a, merged=False)
    assert text_of(cur_b) == text_of(cur_a) == "current "


async def test_resume_unknown_run_id_gets_session_sync(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid, query="run_id=0123456789abcdef&after=5") as c:
            await expect_sync(c)
            await assert_usable(c)


async def test_two_tabs_follow_the_same_run(server: Server, autojump_clock: trio.testing.MockClock) -> None:
    # Virtual time: a burst of deltas reaches this prompt reader unmerged even on a
    # loaded machine (merging starts when a delta has waited MERGE_AFTER_S).
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as a, server.connect(sid) as b:
            await expect_sync(a)
            await expect_sync(b)
            content = script(
                {"think": "one two"},
                {"text": "x", "repeat": 3, "delay": 0.01},
                {"tool": "t", "args": {"k": "v"}, "result": "r"},
                {"compress": True},
                {"text": "end"},
            )
            await a.send_message(content)
            got_a = await a.until_terminal()
            got_b = await b.until_terminal()
            # and a run started from the second tab reaches the first
            await b.send_message(script({"text": "from b"}))
            got_b2 = await b.until_terminal()
            got_a2 = await a.until_terminal()
    assert_grammar(got_a, merged=False)
    assert_grammar(got_b, merged=False)
    assert got_a == got_b
    assert text_of(got_b) == "xxxend"
    assert_grammar(got_a2, merged=False)
    assert got_a2 == got_b2
    assert got_a2[0]["run_id"] != got_a[0]["run_id"]
    assert got_a2[-1]["content"] == "from b"


async def test_disconnect_does_not_stop_the_run(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as a:
            await expect_sync(a)
            await a.send_message(script({"text": "before "}, {"tool": "wait", "delay": 1.0}, {"text": "after"}))
            seen_a = await a.until("tool_started")
        run = server.registry.active(sid)
        assert run is not None
        assert run.id == seen_a[0]["run_id"]
        async with server.connect(sid) as b:
            seen_b = await b.until_terminal()
            assert (await b.recv()) == {"type": "session_sync"}
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    assert seen_b[0] == seen_a[0]
    assert_grammar(seen_b)
    assert seen_b[-1]["type"] == "stream_end"
    assert seen_b[-1]["content"] == "before after" == text_of(seen_b)
    tool_call = next(e for e in seen_b if e["type"] == "tool_call")
    assert tool_call["success"] is True
    assert tool_call["result"] != "cancelled"
    assert msgs[1]["status"] == "complete"
    assert msgs[1]["content"] == "before after"


async def test_run_finishes_with_no_client_at_all(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as a:
            await expect_sync(a)
            await a.send_message(script({"text": "alone "}, {"tool": "wait", "delay": 0.3}, {"text": "done"}))
            seen = await a.until("tool_started")
        run = server.registry.active(sid)
        assert run is not None
        await run.done.wait()
        assert server.registry.active(sid) is None
        msgs = (await server.http.get(f"/sessions/{sid}/messages")).json()
    log = [json.loads(e.wire) for e in run.log.events]
    assert_grammar(log, merged=False)
    assert seen == log[: len(seen)]
    assert run.log.events[-1].type == "stream_end"
    assert msgs[1]["status"] == "complete"
    assert msgs[1]["content"] == "alone done"


# -- heartbeat -----------------------------------------------------------------------------


async def test_heartbeat_when_idle_and_during_silent_step() -> None:
    with trio.fail_after(10):
        async with open_server(heartbeat_s=0.2) as srv:
            sid = await srv.new_session()
            async with srv.connect(sid) as c:
                await expect_sync(c)
                t0 = trio.current_time()
                hb = await c.recv()
                assert hb == {"type": "heartbeat"}
                assert trio.current_time() - t0 >= 0.15
                await c.send_message(script({"text": "a"}, {"sleep": 1.0}, {"text": "b"}))
                got = await c.until("stream_delta")
                got += await c.until_terminal()
    assert_grammar(got, merged=False)
    t = types(got)
    first_delta = t.index("stream_delta")
    second_delta = t.index("stream_delta", first_delta + 1)
    during = got[first_delta + 1 : second_delta]
    assert len(during) >= 2, got  # a 1 s silent step with a 0.2 s heartbeat
    assert all(e == {"type": "heartbeat"} for e in during), during
    assert got[-1]["content"] == "ab"


async def test_no_heartbeat_while_busy() -> None:
    """A heartbeat is sent only when nothing else was sent for heartbeat_s."""
    with trio.fail_after(10):
        async with open_server(heartbeat_s=0.5) as srv:
            sid = await srv.new_session()
            async with srv.connect(sid) as c:
                await expect_sync(c)
                await c.send_message(script({"text": "t", "repeat": 20, "delay": 0.05}))
                got = await c.until_terminal()
    assert_grammar(got, merged=False)
    assert "heartbeat" not in types(got)

"""CONTRACT section 10 with the real clients: the ``ai`` package's DefaultChatTransport and
readUIMessageStream, and ``@ag-ui/client``'s HttpAgent, driving a real server.

The Node scripts in ``tests/js`` (installed by ``.ci/setup`` from the pinned lock file)
do one client action each and print what the client saw, every chunk or event checked
against the schema its package exports; these tests start the runs, the stops and the
disconnects, and check the client's view against the history the server saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from .helpers import Server, open_server, script
from .test_auth import add_user

JS = Path(__file__).parent / "js"
NODE_S = 60


async def node(js: str, server: Server, **opts: Any) -> dict[str, Any]:
    """Run ``tests/js/<js>`` against ``server``; its printed JSON."""
    node_bin = shutil.which("node")
    assert node_bin is not None, "Node.js is needed for these tests (.ci/setup installs it)"
    assert (JS / "node_modules" / "ai").is_dir(), "run .ci/setup (npm ci --prefix tests/js) first"
    with trio.fail_after(NODE_S):
        done = await trio.run_process(
            [node_bin, str(JS / js), json.dumps({"base": server.base, **opts})],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    out: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return out


def types(items: list[dict[str, Any]]) -> list[str]:
    return [i["type"] for i in items]


def shape(items: list[dict[str, Any]]) -> list[str]:
    """The types with runs of one delta type counted once: deltas may come merged (a
    catch-up from the run's log), and the text they carry is what counts."""
    out: list[str] = []
    for t in types(items):
        if not (out and out[-1] == t and ("delta" in t or "CONTENT" in t)):
            out.append(t)
    return out


def text_parts(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


async def history(server: Server, sid: str, token: str | None = None) -> list[dict[str, Any]]:
    await server.no_run_left()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = await server.http.get(f"/sessions/{sid}/messages", headers=headers)
    assert r.status_code == 200, r.text
    messages: list[dict[str, Any]] = r.json()
    return messages


SLOW_TEXT = script({"text": "tick ", "repeat": 40, "delay": 0.05})
SLOW_ANSWER = "tick " * 40


# -- AI SDK ----------------------------------------------------------------------------------


async def test_ai_sdk_plain_answer(server: Server) -> None:
    out = await node("ai-sdk.mjs", server, id="chat-plain", text="hello there")
    assert out["status"] == 200
    assert out["streamHeader"] == "v1"
    assert out["invalid"] == []
    assert out["errors"] == []
    assert shape(out["chunks"]) == [
        "start",
        "reasoning-start",
        "reasoning-delta",
        "reasoning-end",
        "tool-input-available",
        "tool-output-available",
        "text-start",
        "text-delta",
        "text-end",
        "finish",
    ]
    message = out["message"]
    assert text_parts(message) == "hello there"
    assert [p["type"] for p in message["parts"]] == ["reasoning", "dynamic-tool", "text"]
    saved = await history(server, "chat-plain")
    assert [(m["role"], m["content"], m["status"]) for m in saved] == [
        ("user", "hello there", "complete"),
        ("assistant", "hello there", "complete"),
    ]
    assert message["id"] == saved[1]["id"]  # the answer's id, as the history has it


async def test_ai_sdk_thinking_and_tools(server: Server) -> None:
    steps = script(
        {"think": "let me see"},
        {"text": "first "},
        {"tool": "clock", "args": {}, "result": "noon"},
        {"tool": "calculator", "args": {"expression": "1/0"}, "result": "division by zero", "success": False},
        {"text": "done"},
    )
    out = await node("ai-sdk.mjs", server, id="chat-tools", text=steps)
    assert out["invalid"] == []
    parts = out["message"]["parts"]
    assert [p["type"] for p in parts] == ["reasoning", "text", "dynamic-tool", "dynamic-tool", "text"]
    assert parts[0]["text"] == "let me see"
    assert (parts[2]["toolName"], parts[2]["state"], parts[2]["output"]) == ("clock", "output-available", "noon")
    assert (parts[3]["toolName"], parts[3]["state"], parts[3]["errorText"]) == (
        "calculator",
        "output-error",
        "division by zero",
    )
    assert parts[3]["input"] == {"expression": "1/0"}
    assert text_parts(out["message"]) == "first done"


async def test_ai_sdk_error(server: Server) -> None:
    out = await node("ai-sdk.mjs", server, id="chat-error", text=script({"text": "partial "}, {"error": "boom"}))
    assert out["invalid"] == []
    assert types(out["chunks"])[-2:] == ["text-end", "error"]
    assert out["chunks"][-1]["errorText"] == "boom"
    assert out["errors"] == ["boom"]
    saved = await history(server, "chat-error")
    assert (saved[1]["status"], saved[1]["content"]) == ("error", "partial ")


async def test_ai_sdk_stop_mid_stream(server: Server) -> None:
    out = await node("ai-sdk.mjs", server, id="chat-stop", text=SLOW_TEXT, stopAfter="text-delta")
    assert out["invalid"] == []
    assert out["stop"]["ok"] is True
    assert out["chunks"][-1] == {"type": "abort", "reason": "user"}
    saved = await history(server, "chat-stop")
    assert saved[1]["status"] == "stopped"
    assert text_parts(out["message"]) == saved[1]["content"]
    assert 0 < len(saved[1]["content"]) < len(SLOW_ANSWER)


async def test_ai_sdk_resume_during_a_run_and_204_after(server: Server) -> None:
    sid = await server.new_session()
    async with server.connect(sid) as ws:
        assert (await ws.recv())["type"] == "session_sync"
        await ws.send_message(SLOW_TEXT)
        await ws.until("stream_delta")  # the run is under way
        out = await node("ai-sdk.mjs", server, id=sid, action="resume")
        assert out["status"] == 200
        assert out["invalid"] == []
        # A replay from the run's start (the transport's default), then live to the end.
        assert types(out["chunks"])[:3] == ["start", "text-start", "text-delta"]
        assert out["chunks"][-1]["type"] == "finish"
        assert text_parts(out["message"]) == SLOW_ANSWER
    after = await node("ai-sdk.mjs", server, id=sid, action="resume")
    assert after["resumed"] is False  # 204: nothing runs
    assert after["status"] == 204


async def test_ai_sdk_client_that_goes_away(server: Server) -> None:
    out = await node("ai-sdk.mjs", server, id="chat-gone", text=SLOW_TEXT, abortAfter="text-delta")
    assert out["aborted"] is True
    assert "finish" not in types(out["chunks"])
    saved = await history(server, "chat-gone")
    assert (saved[1]["status"], saved[1]["content"]) == ("complete", SLOW_ANSWER)


async def test_ai_sdk_file_parts(tmp_path: Path) -> None:
    async with open_server(data_dir=tmp_path) as server:
        await _file_parts(server)


async def _file_parts(server: Server) -> None:
    image = "data:image/png;base64,iVBORw0KGgo="
    note = "data:text/plain;base64," + "aGVsbG8gZmlsZQ=="  # "hello file"
    files = [
        {"mediaType": "image/png", "filename": "dot.png", "url": image},
        {"mediaType": "text/plain", "filename": "notes.txt", "url": note},
    ]
    out = await node("ai-sdk.mjs", server, id="chat-files", text="look", files=files)
    assert out["status"] == 200, out
    saved = await history(server, "chat-files")
    assert saved[0]["content"] == "look"
    assert saved[1]["status"] == "complete"
    # The demo agent echoes what it was given: the image and the upload's path reached it.
    assert "1 image attached" in saved[1]["content"]
    assert "uploads/chat-files/notes.txt" in saved[1]["content"]
    upload = server.app.settings.data_dir / "uploads" / "_anonymous" / "chat-files" / "notes.txt"
    assert upload.read_bytes() == b"hello file"


# -- AG-UI -----------------------------------------------------------------------------------


async def test_ag_ui_plain_answer(server: Server) -> None:
    out = await node("ag-ui.mjs", server, threadId="thread-plain", runId="r-1", text="hello there")
    assert out["invalid"] == []
    assert "error" not in out, out
    assert shape(out["events"]) == [
        "RUN_STARTED",
        "REASONING_START",
        "REASONING_MESSAGE_START",
        "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_END",
        "REASONING_END",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_RESULT",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    started, finished = out["events"][0], out["events"][-1]
    assert (started["threadId"], started["runId"]) == ("thread-plain", "r-1")
    assert (finished["threadId"], finished["runId"]) == ("thread-plain", "r-1")
    assert out["outcome"] == "success"
    roles = [(m["role"], m.get("content")) for m in out["messages"]]
    assert roles[0] == ("user", "hello there")
    assert roles[-1] == ("assistant", "hello there")
    assert ("tool", "2 words") in roles
    saved = await history(server, "thread-plain")
    assert (saved[1]["status"], saved[1]["content"]) == ("complete", "hello there")


async def test_ag_ui_thinking_and_tools(server: Server) -> None:
    steps = script(
        {"think": "hmm"},
        {"tool": "calculator", "args": {"expression": "2+2"}, "result": "4"},
        {"text": "four"},
    )
    out = await node("ag-ui.mjs", server, threadId="thread-tools", text=steps)
    assert out["invalid"] == []
    seen = types(out["events"])
    assert not [t for t in seen if t.startswith("THINKING")]
    reasoning = [e["delta"] for e in out["events"] if e["type"] == "REASONING_MESSAGE_CONTENT"]
    assert "".join(reasoning) == "hmm"
    args = next(e for e in out["events"] if e["type"] == "TOOL_CALL_ARGS")
    assert json.loads(args["delta"]) == {"expression": "2+2"}
    result = next(e for e in out["events"] if e["type"] == "TOOL_CALL_RESULT")
    assert (result["content"], result["toolCallId"]) == ("4", args["toolCallId"])
    calls = [m for m in out["messages"] if m["role"] == "assistant" and m.get("toolCalls")]
    assert calls[0]["toolCalls"][0]["function"] == {"name": "calculator", "arguments": '{"expression":"2+2"}'}


async def test_ag_ui_error(server: Server) -> None:
    out = await node("ag-ui.mjs", server, threadId="thread-error", text=script({"text": "so far "}, {"error": "boom"}))
    assert out["invalid"] == []
    assert types(out["events"])[-2:] == ["TEXT_MESSAGE_END", "RUN_ERROR"]
    assert out["runError"] == "boom"
    saved = await history(server, "thread-error")
    assert (saved[1]["status"], saved[1]["content"]) == ("error", "so far ")


async def test_ag_ui_stop_mid_stream(server: Server) -> None:
    out = await node("ag-ui.mjs", server, threadId="thread-stop", text=SLOW_TEXT, stopAfter="TEXT_MESSAGE_CONTENT")
    assert out["invalid"] == []
    assert "error" not in out, out
    assert out["stop"]["ok"] is True
    last = out["events"][-1]
    assert (last["type"], last["outcome"]) == ("RUN_FINISHED", {"type": "cancelled"})
    assert out["outcome"] == "cancelled"
    saved = await history(server, "thread-stop")
    assert saved[1]["status"] == "stopped"
    said = "".join(e["delta"] for e in out["events"] if e["type"] == "TEXT_MESSAGE_CONTENT")
    assert said == saved[1]["content"]
    assert 0 < len(said) < len(SLOW_ANSWER)


async def test_ag_ui_client_that_goes_away(server: Server) -> None:
    out = await node("ag-ui.mjs", server, threadId="thread-gone", text=SLOW_TEXT, abortAfter="TEXT_MESSAGE_CONTENT")
    assert out["aborted"] is True
    assert "RUN_FINISHED" not in types(out["events"])
    saved = await history(server, "thread-gone")
    assert (saved[1]["status"], saved[1]["content"]) == ("complete", SLOW_ANSWER)


# -- auth and access, as the HTTP routes ------------------------------------------------------


async def test_auth_and_access_with_the_real_clients(tmp_path: Path) -> None:
    async with open_server(auth="required", data_dir=tmp_path) as server:
        store = server.registry.store
        _, alice = await add_user(store, "alice")
        _, bob = await add_user(store, "bob")
        none = await node("ai-sdk.mjs", server, id="alices", text="hi")
        assert none["status"] == 401
        assert "Authentication required" in none["error"]
        ok = await node("ai-sdk.mjs", server, id="alices", text="hi", token=alice)
        assert (ok["status"], text_parts(ok["message"])) == (200, "hi")
        other = await node("ai-sdk.mjs", server, id="alices", text="mine now", token=bob)
        assert other["status"] == 403
        other_resume = await node("ai-sdk.mjs", server, id="alices", action="resume", token=bob)
        assert other_resume["status"] == 403
        ag_none = await node("ag-ui.mjs", server, threadId="alices", text="hi")
        assert "HTTP 401" in ag_none["error"]
        assert ag_none["events"] == []
        ag_other = await node("ag-ui.mjs", server, threadId="alices", text="hi", token=bob)
        assert "HTTP 403" in ag_other["error"]
        assert ag_other["events"] == []
        ag_ok = await node("ag-ui.mjs", server, threadId="alices", text="again", token=alice)
        assert ag_ok["outcome"] == "success"
        saved = await history(server, "alices", alice)
        assert [m["content"] for m in saved if m["role"] == "user"] == ["hi", "again"]


@pytest.mark.parametrize("js", ["ai-sdk.mjs", "ag-ui.mjs"])
async def test_a_run_already_active_is_refused(server: Server, js: str) -> None:
    sid = await server.new_session()
    async with server.connect(sid) as ws:
        assert (await ws.recv())["type"] == "session_sync"
        await ws.send_message(script({"text": "busy"}, {"sleep": 3600}))
        await ws.until("stream_delta")
        out = await node(js, server, id=sid, threadId=sid, text="me too")
        assert "Agent is already running for this session." in out.get("error", ""), out
        await ws.send({"type": "stop"})
        assert (await ws.until_terminal())[-1]["type"] == "stream_stopped"


# -- the docs' examples ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("js", "said", "logged"),
    [
        ("example-ai-sdk.mjs", "hello from the AI SDK", ""),
        ("example-ag-ui.mjs", "hello from AG-UI", "[run finished: success]"),
    ],
)
async def test_the_docs_examples_run(server: Server, js: str, said: str, logged: str) -> None:
    node_bin = shutil.which("node")
    assert node_bin is not None
    with trio.fail_after(NODE_S):
        done = await trio.run_process(
            [node_bin, str(JS / js), server.base], capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip().split("\r")[-1] == said
    assert logged in done.stderr.decode()

"""CONTRACT section 5: the ``openai`` agent against a fake OpenAI-compatible server.

The fake (tests/fake_openai.py) is a real HTTP server on 127.0.0.1:0 in the test's trio
run; the agent talks to it with its real HTTP client. Runs are driven either directly
through a :class:`RunRegistry` with a :class:`MemoryStore`, or end to end through a real
hypercorn server and a WebSocket client. Real clock throughout (real sockets, real
timeouts); the retry backoff base is shortened so retries are fast.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio

from navi_trio import uploads
from navi_trio.agents import make_agent
from navi_trio.agents import openai as openai_agent
from navi_trio.agents import tools as builtin_tools
from navi_trio.broker import InProcessBroker
from navi_trio.events import TERMINAL_TYPES, check_grammar
from navi_trio.lifecycle import Run, RunRequest
from navi_trio.runs import RunRegistry
from navi_trio.settings import Settings
from navi_trio.store.base import MessageRecord
from navi_trio.store.memory import MemoryStore

from .fake_openai import (
    MODEL,
    NEVER,
    FakeOpenAI,
    Recorded,
    Reply,
    content,
    error_reply,
    finish,
    open_fake_openai,
    reasoning,
    stream,
    summary_reply,
    text_reply,
    tool_fragment,
    tool_reply,
)
from .helpers import Server, assert_grammar, open_server, run_events, text_of

KEY = "sk-test-SECRET"
SID = "s1"
ATTEMPTS = openai_agent.RETRY_ATTEMPTS
ALL_TOOLS = ["clock", "calculator", "list_files", "read_file", "delegate"]

Events = list[dict[str, Any]]

# The agent reads every response body to its end (after [DONE], and for a bounded time
# after a malformed chunk), so no test needs to ignore httpx2's abandoned-iterator warning.


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backoff base is configuration: keep the retries of these tests short."""
    monkeypatch.setattr(openai_agent, "RETRY_BASE_S", 0.01)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as f:
        yield f


# -- helpers ---------------------------------------------------------------------------
def settings_for(base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "agent": "openai",
        "openai_base_url": base_url,
        "openai_api_key": KEY,
        "openai_model": MODEL,
        "store": "memory",
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


def openai_server(fake: FakeOpenAI, data_dir: Path) -> AbstractAsyncContextManager[Server]:
    """A real hypercorn server on 127.0.0.1 whose agent is the OpenAI one, talking to ``fake``."""
    return open_server(
        agent="openai", openai_base_url=fake.base_url, openai_api_key=KEY, openai_model=MODEL, data_dir=data_dir
    )


def events_of(run: Run) -> Events:
    """The run's log as wire objects, checked against the grammar (one terminal event)."""
    check_grammar([(e.type, e.seq) for e in run.log.events])
    evs = [json.loads(e.wire) for e in run.log.events]
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert sum(e["type"] in TERMINAL_TYPES for e in evs) == 1
    assert evs[-1]["type"] in TERMINAL_TYPES
    return evs


def types(evs: Events) -> list[str]:
    return [e["type"] for e in evs]


def collapse(evs: Events) -> list[str]:
    """Event types with runs of the same delta type collapsed to one."""
    out: list[str] = []
    for t in types(evs):
        if t in ("stream_delta", "thinking_delta") and out and out[-1] == t:
            continue
        out.append(t)
    return out


def of_type(evs: Events, type_: str) -> Events:
    return [e for e in evs if e["type"] == type_]


async def new_store(sid: str = SID) -> MemoryStore:
    store = MemoryStore()
    await store.create_session(sid, "t", None)
    return store


async def play(
    base_url: str,
    text: str,
    *,
    store: MemoryStore | None = None,
    images: tuple[str, ...] = (),
    upload_dir: Path | None = None,
    **overrides: Any,
) -> tuple[Run, Events, MemoryStore]:
    """One run of the openai agent through a RunRegistry, to its end."""
    store = store if store is not None else await new_store()
    async with trio.open_nursery() as nursery:
        agent = make_agent(settings_for(base_url, **overrides))
        registry = RunRegistry(nursery, store, agent, broker=InProcessBroker())
        run = registry.submit(RunRequest(SID, None, text, text, list(images), upload_dir=upload_dir))
        assert run is not None
        await run.done.wait()
    return run, events_of(run), store


async def saved_answer(store: MemoryStore, sid: str = SID) -> MessageRecord:
    msgs = await store.list_messages(sid)
    assert msgs[-1].role == "assistant"
    return msgs[-1]


def tool_messages(req: Recorded) -> list[dict[str, Any]]:
    return [m for m in req.messages if m["role"] == "tool"]


def assert_user_error(evs: Events, *phrases: str) -> str:
    """The run ended with exactly one ``error`` a user can read, free of the API key."""
    assert evs[-1]["type"] == "error", evs
    message: str = evs[-1]["message"]
    for phrase in phrases:
        assert phrase in message, message
    assert KEY not in message
    assert all(KEY not in json.dumps(e) for e in evs)
    for noise in ("Traceback", "httpx", "Exception", "failed unexpectedly"):
        assert noise not in message, message
    return message


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is bound but not listening: connecting is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# -- plain text, end to end ------------------------------------------------------------
async def test_plain_text_streams_and_the_request_is_complete(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.script(text_reply("Hello", ", ", "world", "!"))
    with trio.fail_after(10):
        async with openai_server(fake, tmp_path) as server:
            sid = await server.new_session()
            async with server.connect(sid) as client:
                assert await client.recv() == {"type": "session_sync"}
                await client.send_message("Say hello")
                got = await client.until_terminal()
            assert_grammar(got)
            evs = run_events(got)
            assert sum(e["type"] in TERMINAL_TYPES for e in evs) == 1
            assert set(types(evs[1:-1])) == {"stream_delta"}
            assert text_of(evs) == "Hello, world!"
            assert evs[-1] == {"type": "stream_end", "seq": evs[-1]["seq"], "content": "Hello, world!"}
            r = await server.http.get(f"/sessions/{sid}/messages")
            answer = r.json()[-1]
            assert (answer["role"], answer["status"], answer["content"]) == ("assistant", "complete", "Hello, world!")

    [req] = fake.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"].startswith("application/json")
    body = req.json
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == openai_agent.SYSTEM_PROMPT
    assert body["messages"][1]["content"] == "Say hello"
    assert req.tool_names == ALL_TOOLS
    for tool in body["tools"]:
        assert tool["type"] == "function"
        assert tool["function"]["parameters"]["type"] == "object"


async def test_each_content_chunk_is_one_stream_delta(fake: FakeOpenAI) -> None:
    fake.script(text_reply("one ", "two ", "three"))
    with trio.fail_after(10):
        _run, evs, store = await play(fake.base_url, "count")
    assert [e["delta"] for e in of_type(evs, "stream_delta")] == ["one ", "two ", "three"]
    assert evs[-1] == {"type": "stream_end", "seq": 5, "content": "one two three"}
    assert (await saved_answer(store)).status == "complete"


async def test_temperature_and_max_tokens_are_sent_when_set(fake: FakeOpenAI) -> None:
    fake.script(text_reply("ok"))
    with trio.fail_after(10):
        await play(fake.base_url, "hi", openai_temperature=0.25, openai_max_tokens=77)
    body = fake.requests[0].json
    assert (body["temperature"], body["max_tokens"]) == (0.25, 77)


async def test_no_authorization_header_without_an_api_key(fake: FakeOpenAI) -> None:
    """A local endpoint (Ollama, llama.cpp) needs no key: none is invented."""
    fake.script(text_reply("ok"))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "hi", openai_api_key="")
    assert evs[-1]["type"] == "stream_end"
    assert "authorization" not in fake.requests[0].headers


async def test_crlf_framing_comments_and_compact_data_lines(fake: FakeOpenAI) -> None:
    def crlf(obj: dict[str, Any]) -> str:
        return "data:" + json.dumps(obj) + "\r\n\r\n"

    fake.script(
        stream(
            ": keep-alive\r\n\r\n",
            crlf(content("Hello")),
            "event: message\r\n" + crlf(content(" there")),
            crlf(finish()),
            ending="end",
        )
    )
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "hi")
    assert evs[-1] == {"type": "stream_end", "seq": 4, "content": "Hello there"}


# -- reasoning -------------------------------------------------------------------------
REASONING_STREAMS = {
    "reasoning_content": [
        reasoning("let me "),
        reasoning("think"),
        content("The answer"),
        content(" is 42."),
        finish(),
    ],
    "reasoning": [
        reasoning("let me ", "reasoning"),
        reasoning("think", "reasoning"),
        content("The answer"),
        content(" is 42."),
        finish(),
    ],
    "inline": [content("<think>let me think</think>The answer is 42."), finish()],
    "inline_split": [
        content("<thi"),
        content("nk>let me "),
        content("thi"),
        content("nk</th"),
        content("ink>The answer"),
        content(" is 42."),
        finish(),
    ],
    "inline_tag_per_char": [
        *(content(c) for c in "<think>let me think</think>"),
        content("The answer is 42."),
        finish(),
    ],
}


@pytest.mark.parametrize("kind", list(REASONING_STREAMS))
async def test_reasoning_becomes_thinking_then_text(fake: FakeOpenAI, kind: str) -> None:
    fake.script(stream(*REASONING_STREAMS[kind]))
    with trio.fail_after(10):
        _run, evs, store = await play(fake.base_url, "6*7?")
    assert collapse(evs) == ["stream_start", "thinking_delta", "thinking_end", "stream_delta", "stream_end"]
    assert "".join(e["delta"] for e in of_type(evs, "thinking_delta")) == "let me think"
    assert len(of_type(evs, "thinking_end")) == 1
    deltas = [e["delta"] for e in of_type(evs, "stream_delta")]
    assert "".join(deltas) == "The answer is 42."
    assert not any("<" in d or ">" in d for d in deltas)
    assert evs[-1]["content"] == "The answer is 42."
    answer = await saved_answer(store)
    assert (answer.content, answer.thinking, answer.status) == ("The answer is 42.", "let me think", "complete")


async def test_thinking_that_never_closes_still_gets_thinking_end(fake: FakeOpenAI) -> None:
    fake.script(stream(content("<think>pondering"), content(" forever"), finish()))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "hm")
    assert collapse(evs) == ["stream_start", "thinking_delta", "thinking_end", "stream_end"]
    assert "".join(e["delta"] for e in of_type(evs, "thinking_delta")) == "pondering forever"
    assert evs[-1]["content"] == ""


# -- tools -----------------------------------------------------------------------------
async def test_a_tool_call_split_over_many_chunks(fake: FakeOpenAI) -> None:
    args = '{"expression": "6*7"}'
    fragments = [
        tool_fragment(0, id="call_abc", name="calc", arguments=""),
        tool_fragment(0, name="ulator"),
        *(tool_fragment(0, arguments=ch) for ch in args),
        finish("tool_calls"),
    ]
    fake.script(stream(*fragments), text_reply("It is ", "42."))
    with trio.fail_after(10):
        _run, evs, store = await play(fake.base_url, "what is 6*7?")
    assert collapse(evs) == ["stream_start", "tool_started", "tool_call", "stream_delta", "stream_end"]
    started, call = of_type(evs, "tool_started")[0], of_type(evs, "tool_call")[0]
    assert started == {
        "type": "tool_started",
        "seq": 2,
        "tool": "calculator",
        "args": {"expression": "6*7"},
        "is_subagent": False,
    }
    assert (call["tool"], call["result"], call["success"], call["is_subagent"]) == ("calculator", "42", True, False)
    assert evs[-1]["content"] == "It is 42."

    assert len(fake.requests) == 2
    second = fake.requests[1].messages
    assert second[:2] == fake.requests[0].messages  # system + user, unchanged
    assert second[2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_abc", "type": "function", "function": {"name": "calculator", "arguments": args}}],
    }
    assert second[3] == {"role": "tool", "tool_call_id": "call_abc", "content": "42"}
    answer = await saved_answer(store)
    assert answer.tool_calls == [{"tool": "calculator", "args": {"expression": "6*7"}, "result": "42", "success": True}]


async def test_two_tool_calls_in_one_turn_are_run_and_fed_back_in_order(fake: FakeOpenAI) -> None:
    fake.script(
        tool_reply(("c1", "calculator", '{"expression": "2+3"}'), ("c2", "calculator", '{"expression": "10*10"}')),
        text_reply("5 and 100"),
    )
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "two sums")
    assert types(evs) == [
        "stream_start",
        "tool_started",
        "tool_call",
        "tool_started",
        "tool_call",
        "stream_delta",
        "stream_end",
    ]
    calls = of_type(evs, "tool_call")
    assert [(c["args"], c["result"], c["success"]) for c in calls] == [
        ({"expression": "2+3"}, "5", True),
        ({"expression": "10*10"}, "100", True),
    ]
    second = fake.requests[1]
    assistant = [m for m in second.messages if m["role"] == "assistant"]
    assert [c["id"] for c in assistant[0]["tool_calls"]] == ["c1", "c2"]
    assert tool_messages(second) == [
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "tool", "tool_call_id": "c2", "content": "100"},
    ]
    assert second.messages[-2:] == tool_messages(second)  # right after the assistant turn


async def test_clock_tool_gives_the_time(fake: FakeOpenAI) -> None:
    fake.script(tool_reply(("c1", "clock", "")), text_reply("it is now"))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "time?")
    [call] = of_type(evs, "tool_call")
    assert call["success"] is True
    assert call["args"] == {}
    assert call["result"][:2] == "20" and "T" in call["result"]
    assert tool_messages(fake.requests[1])[0]["content"] == call["result"]


@pytest.mark.parametrize(
    ("name", "arguments", "event_args", "error"),
    [
        ("calculator", '{"expression": "1/0"}', {"expression": "1/0"}, "division by zero"),
        ("calculator", '{"expression": "__import__(\'os\')"}', {"expression": "__import__('os')"}, "not allowed"),
        ("teleport", "{}", {}, "no tool named 'teleport'"),
        ("calculator", '{"expression": ', '{"expression": ', "not a JSON object"),
        ("calculator", "[1, 2]", "[1, 2]", "not a JSON object"),
    ],
    ids=["division_by_zero", "not_arithmetic", "unknown_tool", "bad_json", "json_not_object"],
)
async def test_a_failing_tool_reports_to_the_model_which_goes_on(
    fake: FakeOpenAI, name: str, arguments: str, event_args: Any, error: str
) -> None:
    fake.script(tool_reply(("c1", name, arguments)), text_reply("Sorry, that failed."))
    with trio.fail_after(10):
        _run, evs, store = await play(fake.base_url, "try it")
    assert collapse(evs) == ["stream_start", "tool_started", "tool_call", "stream_delta", "stream_end"]
    [call] = of_type(evs, "tool_call")
    assert (call["tool"], call["args"], call["success"]) == (name, event_args, False)
    assert error in call["result"]
    assert len(fake.requests) == 2  # the model was called again
    [fed_back] = tool_messages(fake.requests[1])
    assert fed_back["tool_call_id"] == "c1"
    assert error in fed_back["content"]
    assert evs[-1]["content"] == "Sorry, that failed."
    assert (await saved_answer(store)).status == "complete"


async def test_tool_rounds_are_capped(fake: FakeOpenAI) -> None:
    fake.fallback = tool_reply(("again", "clock", "{}"))
    with trio.fail_after(10):
        _run, evs, store = await play(fake.base_url, "loop forever", max_tool_rounds=2)
    assert_user_error(evs, "2 rounds")
    assert len(of_type(evs, "tool_call")) == 2
    assert len(fake.requests) == 3
    assert (await saved_answer(store)).status == "error"


async def test_a_tool_call_without_a_name_is_an_error(fake: FakeOpenAI) -> None:
    fake.script(stream(tool_fragment(0, id="c1", arguments="{}"), finish("tool_calls")))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "hm")
    assert_user_error(evs, "tool call without a name")
    assert not of_type(evs, "tool_started")


# -- files: only the session's own uploads ---------------------------------------------
async def test_file_tools_see_only_the_sessions_uploads(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.script(
        tool_reply(
            ("c1", "list_files", "{}"),
            ("c2", "read_file", '{"name": "notes.txt"}'),
            ("c3", "read_file", '{"name": "../x"}'),
            ("c4", "read_file", '{"name": "link.txt"}'),
            ("c5", "read_file", '{"name": "secret.txt"}'),
            ("c6", "read_file", "{}"),
        ),
        text_reply("read them"),
    )
    with trio.fail_after(10):
        async with openai_server(fake, tmp_path) as server:
            sid = await server.new_session()
            mine = uploads.session_dir(tmp_path, None, sid)
            mine.mkdir(parents=True)
            (mine / "notes.txt").write_text("my own notes")
            other = uploads.session_dir(tmp_path, None, "other-session")
            other.mkdir(parents=True)
            (other / "secret.txt").write_text("TOP-SECRET")
            (mine.parent / "x").write_text("TOP-SECRET")
            os.symlink(other / "secret.txt", mine / "link.txt")
            async with server.connect(sid) as client:
                await client.until("session_sync")
                await client.send_message("look at my files")
                got = await client.until_terminal()
    assert_grammar(got)
    evs = run_events(got)
    assert evs[-1]["type"] == "stream_end"
    calls = of_type(evs, "tool_call")
    assert [(c["tool"], c["success"]) for c in calls] == [
        ("list_files", True),
        ("read_file", True),
        ("read_file", False),
        ("read_file", False),
        ("read_file", False),
        ("read_file", False),
    ]
    assert calls[0]["result"] == "notes.txt"
    assert calls[1]["result"] == "my own notes"
    assert "../x" in calls[2]["result"]
    assert "link.txt" in calls[3]["result"]
    assert "secret.txt" in calls[4]["result"]
    for c in calls[2:]:
        assert c["result"].startswith("Error:"), c
    assert all("TOP-SECRET" not in c["result"] for c in calls)
    assert "TOP-SECRET" not in fake.requests[1].body.decode()


async def test_read_file_is_bounded(fake: FakeOpenAI, tmp_path: Path) -> None:
    folder = tmp_path / "up"
    folder.mkdir()
    (folder / "big.txt").write_text("a" * (builtin_tools.MAX_READ_BYTES + 5000))
    fake.script(tool_reply(("c1", "read_file", '{"name": "big.txt"}')), text_reply("long"))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "read it", upload_dir=folder)
    [call] = of_type(evs, "tool_call")
    assert call["success"] is True
    assert call["result"] == "a" * builtin_tools.MAX_READ_BYTES + "\n[truncated]"


async def test_file_tools_without_an_upload_folder(fake: FakeOpenAI) -> None:
    fake.script(tool_reply(("c1", "list_files", "{}"), ("c2", "read_file", '{"name": "a.txt"}')), text_reply("none"))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "files?")
    listed, read = of_type(evs, "tool_call")
    assert (listed["result"], listed["success"]) == ("No uploaded files.", True)
    assert read["success"] is False
    assert evs[-1]["type"] == "stream_end"


# -- images and uploaded files reach the model -----------------------------------------
async def test_images_and_the_files_note_reach_the_model(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.script(text_reply("nice picture"))
    png = "iVBORw0KGgoAAAANSUhEUg=="
    with trio.fail_after(10):
        async with openai_server(fake, tmp_path) as server:
            sid = await server.new_session()
            r = await server.http.post(f"/sessions/{sid}/files", params={"name": "report.txt"}, content=b"numbers")
            assert r.status_code == 201, r.text
            upload = r.json()
            async with server.connect(sid) as client:
                await client.until("session_sync")
                await client.send_message(
                    "describe these", images=[f"data:image/png;base64,{png}", png], files=[upload]
                )
                got = await client.until_terminal()
            assert_grammar(got)
            assert got[-1]["type"] == "stream_end"
            history = (await server.http.get(f"/sessions/{sid}/messages")).json()
    user = fake.requests[0].messages[-1]
    assert user["role"] == "user"
    parts = user["content"]
    assert isinstance(parts, list)
    assert parts[0]["type"] == "text"
    text = parts[0]["text"]
    assert text.startswith("describe these")
    assert "2 images attached" in text
    assert "[Uploaded files on disk:" in text
    assert "report.txt" in text and upload["path"] in text
    assert parts[1:] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]
    assert history[0]["content"] == "describe these"  # the note is for the model only


async def test_a_data_url_keeps_its_media_type(fake: FakeOpenAI, tmp_path: Path) -> None:
    """A JPEG sent as ``data:image/jpeg;base64,...`` reaches the model as a JPEG."""
    fake.script(text_reply("a photo"))
    jpeg = "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ=="
    with trio.fail_after(10):
        async with openai_server(fake, tmp_path) as server:
            sid = await server.new_session()
            async with server.connect(sid) as client:
                await client.until("session_sync")
                await client.send_message("what is this", images=[jpeg])
                got = await client.until_terminal()
    assert got[-1]["type"] == "stream_end"
    parts = fake.requests[0].messages[-1]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": jpeg}}


# -- sub-agents ------------------------------------------------------------------------
async def test_delegate_runs_a_nested_turn_whose_text_is_the_tool_result(fake: FakeOpenAI) -> None:
    fake.script(
        tool_reply(("d1", "delegate", '{"task": "compute 6*7"}')),
        stream(
            reasoning("sub thinks"),
            content("<think>inner</think>"),
            tool_fragment(0, id="s1", name="calculator", arguments='{"expression": "6*7"}'),
            finish("tool_calls"),
        ),
        text_reply("SUB-RESULT ", "42"),
        text_reply("Final: 42"),
    )
    with trio.fail_after(10):
        _run, evs, store = await play(fake.base_url, "please delegate")
    assert [(e["type"], e.get("tool"), e.get("is_subagent")) for e in evs] == [
        ("stream_start", None, None),
        ("tool_started", "delegate", False),
        ("tool_started", "calculator", True),
        ("tool_call", "calculator", True),
        ("tool_call", "delegate", False),
        ("stream_delta", None, None),
        ("stream_end", None, None),
    ]
    inner, outer = of_type(evs, "tool_call")
    assert (inner["result"], inner["success"]) == ("42", True)
    assert outer["args"] == {"task": "compute 6*7"}
    assert (outer["result"], outer["success"]) == ("SUB-RESULT 42", True)
    assert evs[-1]["content"] == "Final: 42"
    assert "SUB-RESULT" not in json.dumps([e for e in evs if e["type"] != "tool_call"])

    parent1, sub1, sub2, parent2 = fake.requests
    assert parent1.tool_names == ALL_TOOLS
    assert sub1.tool_names == ALL_TOOLS[:-1]  # no delegating further
    assert sub1.messages[-1] == {"role": "user", "content": "compute 6*7"}
    assert "please delegate" not in sub1.body.decode()
    assert tool_messages(sub2) == [{"role": "tool", "tool_call_id": "s1", "content": "42"}]
    assert tool_messages(parent2) == [{"role": "tool", "tool_call_id": "d1", "content": "SUB-RESULT 42"}]
    assert (await saved_answer(store)).content == "Final: 42"


async def test_delegate_without_a_task_fails_as_a_tool(fake: FakeOpenAI) -> None:
    fake.script(tool_reply(("d1", "delegate", "{}")), text_reply("ok"))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "delegate nothing")
    [call] = of_type(evs, "tool_call")
    assert (call["tool"], call["success"]) == ("delegate", False)
    assert "task" in call["result"]
    assert len(fake.requests) == 2
    assert evs[-1]["type"] == "stream_end"


async def test_the_endpoint_failing_during_the_sub_agent_is_one_error(fake: FakeOpenAI) -> None:
    fake.script(tool_reply(("d1", "delegate", '{"task": "t"}')), *[error_reply(500, "down")] * ATTEMPTS)
    with trio.fail_after(10):
        _run, evs, store = await play(fake.base_url, "go")
    assert types(evs) == ["stream_start", "tool_started", "tool_call", "error"]
    assert of_type(evs, "tool_call")[0]["success"] is False
    assert_user_error(evs, "500")
    assert len(fake.requests) == 1 + ATTEMPTS
    assert (await saved_answer(store)).status == "error"


async def test_stop_during_a_sub_agent_tool_cancels_inner_and_outer(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in tool that blocks makes "a tool of the sub-agent is running" observable."""
    started = trio.Event()

    async def wait_forever(ctx: builtin_tools.ToolContext, args: dict[str, Any]) -> str:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setitem(builtin_tools.BUILTIN_TOOLS, "wait_forever", wait_forever)
    fake.script(
        tool_reply(("d1", "delegate", '{"task": "wait"}')),
        tool_reply(("s1", "wait_forever", "{}")),
    )
    store = await new_store()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            registry = RunRegistry(nursery, store, make_agent(settings_for(fake.base_url)), broker=InProcessBroker())
            run = registry.submit(RunRequest(SID, None, "go", "go"))
            assert run is not None
            await started.wait()
            t0 = time.monotonic()
            registry.stop(SID)
            await run.done.wait()
            assert time.monotonic() - t0 < 0.5
        await fake.wait_no_connections()
    evs = events_of(run)
    assert [(e["type"], e.get("tool"), e.get("is_subagent"), e.get("result"), e.get("success")) for e in evs] == [
        ("stream_start", None, None, None, None),
        ("tool_started", "delegate", False, None, None),
        ("tool_started", "wait_forever", True, None, None),
        ("tool_call", "wait_forever", True, "cancelled", False),
        ("tool_call", "delegate", False, "cancelled", False),
        ("stream_stopped", None, None, None, None),
    ]
    assert evs[-1]["reason"] == "user"
    assert len(fake.requests) == 2
    assert (await saved_answer(store)).status == "stopped"


async def test_stop_while_the_sub_agent_streams_cancels_both(fake: FakeOpenAI) -> None:
    fake.script(
        tool_reply(("d1", "delegate", '{"task": "write a long text"}')),
        stream(content("sub "), content("agent "), delay=0.05, ending="hang"),
    )
    store = await new_store()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            registry = RunRegistry(nursery, store, make_agent(settings_for(fake.base_url)), broker=InProcessBroker())
            run = registry.submit(RunRequest(SID, None, "go", "go"))
            assert run is not None
            await fake.wait_for(lambda: len(fake.requests) == 2 and fake.requests[1].responded)
            t0 = time.monotonic()
            registry.stop(SID)
            await run.done.wait()
            assert time.monotonic() - t0 < 0.5
        await fake.wait_no_connections()
    evs = events_of(run)
    assert [(e["type"], e.get("tool"), e.get("result")) for e in evs] == [
        ("stream_start", None, None),
        ("tool_started", "delegate", None),
        ("tool_call", "delegate", "cancelled"),
        ("stream_stopped", None, None),
    ]
    assert evs[-1]["content"] == ""  # the sub-agent's text was never the user's answer
    assert fake.requests[1].client_gone


# -- context compression ---------------------------------------------------------------
async def seed_history(store: MemoryStore, pairs: list[tuple[str, str]]) -> list[str]:
    ids = []
    for i, (role, text) in enumerate(pairs):
        mid = f"m{i:02d}"
        store.messages[SID].append(MessageRecord(mid, role, text, f"2024-01-01T00:00:{i:02d}.000Z", "complete"))
        ids.append(mid)
    await trio.lowlevel.checkpoint()
    return ids


async def test_a_long_history_is_summarised_and_the_next_run_starts_from_it(fake: FakeOpenAI) -> None:
    store = await new_store()
    old = [("user" if i % 2 == 0 else "assistant", f"OLD-TURN-{i} " + "blah " * 60) for i in range(6)]
    recent = [("user", "recent question A"), ("assistant", "recent answer A")]
    recent += [("user", "recent question B"), ("assistant", "recent answer B")]
    ids = await seed_history(store, old + recent)

    fake.script(summary_reply("SUMMARY-XYZ: the user likes blah"), text_reply("first answer"))
    with trio.fail_after(10):
        _run, evs, _ = await play(fake.base_url, "new question", store=store, context_tokens=200)
    assert types(evs) == ["stream_start", "context_compressed", "stream_delta", "stream_end"]
    summary_req, turn_req = fake.requests
    assert summary_req.path == "/v1/chat/completions"
    assert summary_req.json["stream"] is False
    assert summary_req.json["model"] == MODEL
    assert "tools" not in summary_req.json
    transcript = json.dumps(summary_req.messages)
    assert all(f"OLD-TURN-{i}" in transcript for i in range(6))
    assert "recent question B" not in transcript
    assert store.summaries[SID] == ("SUMMARY-XYZ: the user likes blah", ids[5])

    sent = turn_req.messages
    assert turn_req.streaming
    assert "OLD-TURN" not in turn_req.body.decode()
    assert sent[0]["role"] == "system"
    assert sent[1] == {
        "role": "system",
        "content": "Summary of the earlier conversation:\nSUMMARY-XYZ: the user likes blah",
    }
    assert [m["content"] for m in sent[2:]] == [text for _, text in recent] + ["new question"]

    # The next run starts from the saved summary, without summarising again.
    summary, history = await store.load_context(SID)
    assert summary == "SUMMARY-XYZ: the user likes blah"
    assert "OLD-TURN" not in json.dumps(history)
    fake.script(text_reply("second answer"))
    with trio.fail_after(10):
        _run, evs2, _ = await play(fake.base_url, "follow-up", store=store, context_tokens=200)
    assert types(evs2) == ["stream_start", "stream_delta", "stream_end"]
    assert len(fake.requests) == 3
    nxt = fake.requests[2]
    assert nxt.streaming
    assert "SUMMARY-XYZ" in json.dumps(nxt.messages[1])
    assert "OLD-TURN" not in nxt.body.decode()
    assert [m["content"] for m in nxt.messages[2:]] == [text for _, text in recent] + [
        "new question",
        "first answer",
        "follow-up",
    ]


async def test_a_short_history_is_sent_whole_without_summary(fake: FakeOpenAI) -> None:
    store = await new_store()
    await seed_history(store, [("user", "earlier q"), ("assistant", "earlier a")])
    fake.script(text_reply("ok"))
    with trio.fail_after(10):
        _run, evs, _ = await play(fake.base_url, "now", store=store)
    assert "context_compressed" not in types(evs)
    [req] = fake.requests
    assert [(m["role"], m["content"]) for m in req.messages[1:]] == [
        ("user", "earlier q"),
        ("assistant", "earlier a"),
        ("user", "now"),
    ]
    assert SID not in store.summaries


async def test_a_malformed_summary_reply_is_an_error(fake: FakeOpenAI) -> None:
    store = await new_store()
    await seed_history(store, [("user", "x" * 400)] * 6)
    fake.script(Reply(status=200, body=b'{"choices": []}', headers=(("content-type", "application/json"),)))
    with trio.fail_after(10):
        _run, evs, _ = await play(fake.base_url, "now", store=store, context_tokens=100)
    assert_user_error(evs, "malformed")
    assert SID not in store.summaries


# -- the endpoint failing --------------------------------------------------------------
ERROR_CASES: dict[str, tuple[list[Reply], dict[str, Any], tuple[str, ...], int]] = {
    # name: (replies, settings, phrases the message contains, requests the fake sees)
    "timeout": ([NEVER], {"openai_timeout_s": 0.3}, ("did not answer within 0.3 s",), 1),
    "401": ([error_reply(401, f"Incorrect API key provided: {KEY}")], {}, ("API key", "401"), 1),
    "403": ([error_reply(403, f"key {KEY} is not allowed")], {}, ("API key", "403"), 1),
    "404_model": ([error_reply(404, f"The model `{MODEL}` does not exist")], {}, (MODEL, "404"), 1),
    "400": ([error_reply(400, f"bad request for {KEY}")], {}, ("rejected", "400"), 1),
    "429": ([error_reply(429, "Rate limit reached")] * ATTEMPTS, {}, ("rate-limiting", "429"), ATTEMPTS),
    "500": ([error_reply(500, "boom")] * ATTEMPTS, {}, ("failed", "500"), ATTEMPTS),
    "503": ([error_reply(503, "overloaded")] * ATTEMPTS, {}, ("failed", "503"), ATTEMPTS),
    "malformed_chunk": ([stream(content("Hel"), "data: {oops\n\n")], {}, ("malformed",), 1),
    "error_in_stream": ([stream({"error": {"message": "upstream overloaded"}})], {}, ("upstream overloaded",), 1),
    "truncated": ([stream(content("Hel"), content("lo"), ending="end")], {}, ("ended before it was complete",), 1),
    "dropped": ([stream(content("Hel"), content("lo"), ending="drop")], {}, ("connection", "broke"), 1),
    "stalled": ([stream(content("Hel"), ending="hang")], {"openai_timeout_s": 0.3}, ("model endpoint",), 1),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
async def test_a_failing_endpoint_ends_the_run_with_a_readable_error(fake: FakeOpenAI, case: str) -> None:
    replies, overrides, phrases, n_requests = ERROR_CASES[case]
    fake.script(*replies)
    with trio.fail_after(10):
        t0 = time.monotonic()
        _run, evs, store = await play(fake.base_url, "hello", **overrides)
        elapsed = time.monotonic() - t0
        await fake.wait_no_connections()
    if "openai_timeout_s" in overrides:  # the configured timeout, not some default
        assert overrides["openai_timeout_s"] * 0.9 <= elapsed < overrides["openai_timeout_s"] + 1.0, elapsed
    assert_user_error(evs, *phrases)
    assert len(fake.requests) == n_requests
    answer = await saved_answer(store)
    assert answer.status == "error"
    assert answer.content == "".join(e["delta"] for e in of_type(evs, "stream_delta"))


async def test_an_error_in_the_stream_never_shows_the_api_key(fake: FakeOpenAI) -> None:
    """An endpoint (or a proxy in front of it) that echoes the key in an in-stream error."""
    fake.script(stream(content("Hi"), {"error": {"message": f"invalid api key {KEY}"}}))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "hello")
    assert_user_error(evs, "invalid api key")


async def test_connection_refused(dead_port: int) -> None:
    with trio.fail_after(10):
        _run, evs, store = await play(f"http://127.0.0.1:{dead_port}/v1", "hello")
    assert_user_error(evs, "Could not connect", f"127.0.0.1:{dead_port}")
    assert (await saved_answer(store)).status == "error"


async def test_429_then_200_succeeds_after_a_retry(fake: FakeOpenAI) -> None:
    fake.script(error_reply(429, "slow down"), text_reply("made ", "it"))
    with trio.fail_after(10):
        _run, evs, store = await play(fake.base_url, "hello")
    assert evs[-1] == {"type": "stream_end", "seq": 4, "content": "made it"}
    assert len(fake.requests) == 2
    assert fake.requests[0].body == fake.requests[1].body
    assert (await saved_answer(store)).status == "complete"


async def test_500_then_200_succeeds_after_a_retry(fake: FakeOpenAI) -> None:
    fake.script(error_reply(502, "bad gateway"), error_reply(500, "boom"), text_reply("ok"))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "hello")
    assert evs[-1]["type"] == "stream_end"
    assert len(fake.requests) == 3


async def test_retry_after_is_honoured(fake: FakeOpenAI) -> None:
    fake.script(error_reply(429, "slow down", headers=(("retry-after", "0.4"),)), text_reply("ok"))
    with trio.fail_after(10):
        t0 = time.monotonic()
        _run, evs, _store = await play(fake.base_url, "hello")
        elapsed = time.monotonic() - t0
    assert evs[-1]["type"] == "stream_end"
    assert elapsed >= 0.3  # 0.4 s with jitter of at most -20 %; the backoff base is 0.01 s


async def test_a_client_error_is_not_retried(fake: FakeOpenAI) -> None:
    fake.script(error_reply(401, "no"), text_reply("never sent"))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "hello")
    assert evs[-1]["type"] == "error"
    assert len(fake.requests) == 1


async def test_the_endpoint_failing_after_a_tool_round_is_still_one_error(fake: FakeOpenAI) -> None:
    fake.script(tool_reply(("c1", "clock", "{}")), stream(content("par"), ending="drop"))
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "hello")
    assert types(evs)[:3] == ["stream_start", "tool_started", "tool_call"]
    assert_user_error(evs, "broke")


@pytest.mark.parametrize(
    "replies",
    [
        [error_reply(401, f"Incorrect API key provided: {KEY}")],
        [error_reply(500, f"upstream said {KEY}")] * ATTEMPTS,
        [stream(content("a"), {"error": {"message": f"bad key {KEY}"}})],
    ],
    ids=["401", "500", "error_in_stream"],
)
async def test_the_api_key_never_reaches_the_logs(
    fake: FakeOpenAI, log_events: list[dict[str, Any]], replies: list[Reply]
) -> None:
    fake.script(*replies)
    with trio.fail_after(10):
        _run, evs, _store = await play(fake.base_url, "hello")
    assert evs[-1]["type"] == "error"
    assert any(e["event"] == "run.agent_error" for e in log_events)
    leaked = [e for e in log_events if KEY in repr(e)]
    assert leaked == []


# -- resources -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reply",
    [
        text_reply("all ", "done"),
        tool_reply(("c1", "calculator", '{"expression": "1+1"}')),
        stream(content("Hel"), content("lo"), ending="drop"),
    ],
    ids=["text", "tool_round", "dropped"],
)
async def test_the_response_stream_is_closed_not_abandoned(fake: FakeOpenAI, reply: Reply) -> None:
    """A turn that ends normally (``[DONE]``) or by a dropped connection leaves none of the
    response's async iterators for the garbage collector to find unexhausted (trio then
    warns ``ResourceWarning``, which ``filterwarnings = error`` makes a failure).

    Not checked: leaving the stream on a malformed chunk. httpx2's own
    ``AsyncResponseStream.__aiter__`` abandons httpcore2's iterator on any early exit,
    which the agent cannot avoid short of reading the rest of a broken stream."""
    fake.script(reply, text_reply("ok"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with trio.fail_after(10):
            _run, evs, _store = await play(fake.base_url, "hello")
            await fake.wait_no_connections()
            gc.collect()
            for _ in range(3):
                await trio.lowlevel.checkpoint()  # let trio finalise what GC found
    assert evs[-1]["type"] in ("stream_end", "error")
    abandoned = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert abandoned == []


# -- stop ------------------------------------------------------------------------------
async def test_stop_during_slow_tokens_is_prompt_and_closes_the_connection(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.script(text_reply(*(f"tok{i} " for i in range(200)), delay=0.05))
    with trio.fail_after(15):
        async with openai_server(fake, tmp_path) as server:
            sid = await server.new_session()
            async with server.connect(sid) as client:
                await client.until("session_sync")
                await client.send_message("write a lot")
                got = []
                while len(of_type(got, "stream_delta")) < 3:
                    got.append(await client.recv())
                t0 = time.monotonic()
                r = await server.http.post(f"/sessions/{sid}/stop")
                elapsed = time.monotonic() - t0
                assert r.status_code == 200
                assert r.json()["ok"] is True
                got += await client.until_terminal()
            with trio.fail_after(1):
                await fake.wait_no_connections()
            history = (await server.http.get(f"/sessions/{sid}/messages")).json()
    assert elapsed < 0.5, elapsed
    assert_grammar(got)
    evs = run_events(got)
    assert evs[-1]["type"] == "stream_stopped"
    assert evs[-1]["reason"] == "user"
    partial = evs[-1]["content"]
    assert partial.startswith("tok0 tok1 tok2 ")
    assert len(partial) < len("".join(f"tok{i} " for i in range(200)))
    assert text_of(evs) == partial
    [req] = fake.requests
    assert req.client_gone
    assert not req.finished
    assert fake.open_connections == 0
    answer = history[-1]
    assert (answer["role"], answer["status"], answer["content"]) == ("assistant", "stopped", partial)


async def test_stop_while_the_model_has_not_answered_yet(fake: FakeOpenAI) -> None:
    fake.script(NEVER)
    store = await new_store()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            registry = RunRegistry(nursery, store, make_agent(settings_for(fake.base_url)), broker=InProcessBroker())
            run = registry.submit(RunRequest(SID, None, "hi", "hi"))
            assert run is not None
            await fake.wait_requests(1)
            t0 = time.monotonic()
            registry.stop(SID)
            await run.done.wait()
            assert time.monotonic() - t0 < 0.5
        await fake.wait_no_connections()
    evs = events_of(run)
    assert types(evs) == ["stream_start", "stream_stopped"]
    assert fake.requests[0].client_gone


async def test_stop_during_the_retry_backoff(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_agent, "RETRY_BASE_S", 30.0)
    fake.script(error_reply(503, "busy"))
    store = await new_store()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            registry = RunRegistry(nursery, store, make_agent(settings_for(fake.base_url)), broker=InProcessBroker())
            run = registry.submit(RunRequest(SID, None, "hi", "hi"))
            assert run is not None
            await fake.wait_for(lambda: bool(fake.requests) and fake.requests[0].finished)
            t0 = time.monotonic()
            registry.stop(SID)
            await run.done.wait()
            assert time.monotonic() - t0 < 0.5
    assert types(events_of(run)) == ["stream_start", "stream_stopped"]
    assert len(fake.requests) == 1

"""The AI SDK translator and body parser on their own (sans-IO): the run's real event
grammar (a RunLog) in, UI message chunks out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from navi_trio.errors import BadClientMessage
from navi_trio.events import Event, RunLog, encode, next_frame
from navi_trio.protocols import sse
from navi_trio.protocols.ai_sdk import UIMessageStream, parse_chat_body


def feed_all(stream: UIMessageStream, events: list[Event]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ev in events:
        out.extend(stream.feed(orjson.loads(ev.wire)))
    return out


def played(*steps: str) -> RunLog:
    """A run log from a tiny script: t=text, k=thinking, K=thinking end, (=tool started,
    )=tool ok, !=tool failed, c=compressed."""
    log = RunLog("run-1")
    log.start()
    for step in steps:
        if step.startswith("t"):
            log.text_delta(step[1:])
        elif step.startswith("k"):
            log.thinking_delta(step[1:])
        elif step == "K":
            log.thinking_end()
        elif step.startswith("("):
            log.tool_started(step[1:] or "clock", {"x": 1}, is_subagent=log.tool_open)
        elif step == ")":
            log.tool_call("ok", success=True)
        elif step == "!":
            log.tool_call("bad", success=False)
        elif step == "c":
            log.context_compressed()
    return log


def test_a_plain_answer() -> None:
    log = played("ta", "tb")
    log.end()
    chunks = feed_all(UIMessageStream("answer-1"), log.events)
    assert chunks == [
        {"type": "start", "messageId": "answer-1"},
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "a"},
        {"type": "text-delta", "id": "text-1", "delta": "b"},
        {"type": "text-end", "id": "text-1"},
        {"type": "finish", "finishReason": "stop"},
    ]


def test_message_id_defaults_to_the_run_id() -> None:
    log = played()
    assert feed_all(UIMessageStream(), log.events) == [{"type": "start", "messageId": "run-1"}]


def test_blocks_keep_the_runs_order() -> None:
    log = played("khm", "ta", "(clock", ")", "tb", "(calc", "!", "c", "tc")
    log.end()
    chunks = feed_all(UIMessageStream("m"), log.events)
    assert [c["type"] for c in chunks] == [
        "start",
        "reasoning-start",
        "reasoning-delta",
        "reasoning-end",  # the grammar ends thinking before the text
        "text-start",
        "text-delta",
        "text-end",
        "tool-input-available",
        "tool-output-available",
        "text-start",
        "text-delta",
        "text-end",
        "tool-input-available",
        "tool-output-error",
        "data-context-compressed",
        "text-start",
        "text-delta",
        "text-end",
        "finish",
    ]
    tools = [c for c in chunks if c["type"].startswith("tool-")]
    assert tools[0] == {
        "type": "tool-input-available",
        "toolCallId": "call-5",
        "toolName": "clock",
        "input": {"x": 1},
        "dynamic": True,
    }
    assert tools[1]["toolCallId"] == "call-5"
    assert tools[1]["output"] == "ok"
    assert tools[3] == {
        "type": "tool-output-error",
        "toolCallId": tools[2]["toolCallId"],
        "errorText": "bad",
        "dynamic": True,
    }
    text_ids = [c["id"] for c in chunks if c["type"] == "text-start"]
    assert len(set(text_ids)) == 3


def test_nested_tools_get_their_own_results() -> None:
    log = played("(outer", "(inner", ")", ")")
    log.end()
    chunks = [c for c in feed_all(UIMessageStream("m"), log.events) if c["type"].startswith("tool-")]
    outer, inner = chunks[0]["toolCallId"], chunks[1]["toolCallId"]
    assert outer != inner
    assert [c["toolCallId"] for c in chunks[2:]] == [inner, outer]


def test_a_stop_with_a_tool_open_is_an_abort() -> None:
    log = played("ta", "(slow")
    log.stopped("user")
    chunks = feed_all(UIMessageStream("m"), log.events)
    assert [c["type"] for c in chunks][-4:] == ["text-end", "tool-input-available", "tool-output-error", "abort"]
    assert chunks[-2]["errorText"] == "cancelled"
    assert chunks[-1] == {"type": "abort", "reason": "user"}


@pytest.mark.parametrize("reason", ["user", "deleted", "shutdown"])
def test_every_stop_reason(reason: str) -> None:
    log = played("ta")
    log.stopped(reason)
    assert feed_all(UIMessageStream("m"), log.events)[-2:] == [
        {"type": "text-end", "id": "text-1"},
        {"type": "abort", "reason": reason},
    ]


def test_an_error_closes_the_text_first() -> None:
    log = played("ta")
    log.error("boom")
    assert feed_all(UIMessageStream("m"), log.events)[-2:] == [
        {"type": "text-end", "id": "text-1"},
        {"type": "error", "errorText": "boom"},
    ]


def test_nothing_after_the_terminal_event_and_frames_that_are_not_run_events() -> None:
    stream = UIMessageStream("m")
    assert stream.feed({"type": "replay_start", "count": 3}) == []
    assert stream.feed({"type": "heartbeat"}) == []
    assert stream.feed({"type": "error", "message": "Invalid JSON"}) == []  # no seq: not the run's
    log = played("ta")
    log.end()
    feed_all(stream, log.events)
    assert stream.done
    assert stream.feed({"type": "session_sync"}) == []
    assert stream.feed({"type": "stream_delta", "seq": 9, "delta": "late"}) == []


def test_merged_deltas_carry_the_same_text() -> None:
    log = played("ta", "tb", "tc", "(t", ")", "td", "te")
    log.end()
    frames: list[dict[str, Any]] = []
    after = 0
    while after < log.last_seq:
        frame, after = next_frame(log.events, after, log.last_seq)
        frames.append(orjson.loads(frame))
    assert len(frames) < len(log.events)
    stream = UIMessageStream("m")
    chunks = [c for f in frames for c in stream.feed(f)]
    assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == "abcde"
    assert stream.done


def test_sse_framing() -> None:
    part = {"type": "text-delta", "id": "t", "delta": "two\nlines"}
    assert sse.data(part) == b'data: {"type":"text-delta","id":"t","delta":"two\\nlines"}\n\n'
    assert sse.encode_all([part, part]) == sse.data(part) * 2
    assert sse.KEEP_ALIVE.startswith(b":")
    assert encode({"a": 1}) == '{"a":1}'


# -- the body useChat sends ---------------------------------------------------------------


def ui(role: str, *parts: dict[str, Any]) -> dict[str, Any]:
    return {"id": "x", "role": role, "parts": list(parts)}


def test_the_last_user_message_is_taken() -> None:
    body = {
        "id": "chat_1",
        "trigger": "submit-message",
        "messages": [
            ui("user", {"type": "text", "text": "old"}),
            ui("assistant", {"type": "text", "text": "answer"}),
            ui(
                "user",
                {"type": "text", "text": "new"},
                {"type": "reasoning", "text": "ignored"},
                {"type": "text", "text": "second"},
                {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAAA"},
                {"type": "file", "mediaType": "text/plain", "filename": "a.txt", "url": "data:text/plain;base64,YQ=="},
                {"type": "file", "mediaType": "image/png", "url": "https://example.invalid/remote.png"},
            ),
        ],
    }
    req = parse_chat_body(body)
    assert req.session_id == "chat_1"
    assert req.text == "new\n\nsecond"
    assert req.images == ["data:image/png;base64,AAAA"]
    assert [(f.name, f.media_type) for f in req.files] == [("a.txt", "text/plain")]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "JSON object"),
        ({"messages": [ui("user", {"type": "text", "text": "x"})]}, "id must be"),
        ({"id": "../x", "messages": [ui("user", {"type": "text", "text": "x"})]}, "id must be"),
        ({"id": "c", "messages": []}, "non-empty"),
        ({"id": "c", "messages": [ui("assistant", {"type": "text", "text": "x"})]}, "last message"),
        ({"id": "c", "messages": [{"role": "user", "content": "x"}]}, "no parts"),
    ],
)
def test_bad_bodies(body: Any, says: str) -> None:
    with pytest.raises(BadClientMessage, match=says):
        parse_chat_body(body)

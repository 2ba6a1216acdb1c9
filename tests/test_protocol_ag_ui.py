"""The AG-UI translator and RunAgentInput parser on their own (sans-IO): the run's real
event grammar (a RunLog) in, AG-UI events out."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from navi_trio.errors import BadClientMessage
from navi_trio.events import Event, next_frame
from navi_trio.protocols.ag_ui import AgUiStream, parse_run_input

from .test_protocol_ai_sdk import played


def feed_all(stream: AgUiStream, events: list[Event]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ev in events:
        out.extend(stream.feed(orjson.loads(ev.wire)))
    return out


def check_pairs(events: list[dict[str, Any]]) -> None:
    """What @ag-ui/client's verifier insists on: every START ended before RUN_FINISHED,
    content only inside its message, nothing after the end."""
    open_: set[tuple[str, str]] = set()
    for i, e in enumerate(events):
        t = e["type"]
        key = e.get("messageId") or e.get("toolCallId") or ""
        for kind in ("TEXT_MESSAGE", "REASONING_MESSAGE", "TOOL_CALL"):
            if t == f"{kind}_START":
                assert (kind, key) not in open_
                open_.add((kind, key))
            elif t in (f"{kind}_CONTENT", f"{kind}_ARGS"):
                assert (kind, key) in open_, e
            elif t == f"{kind}_END":
                open_.remove((kind, key))
        if t == "REASONING_START":
            open_.add(("REASONING", key))
        elif t == "REASONING_END":
            open_.remove(("REASONING", key))
        if t in ("RUN_FINISHED", "RUN_ERROR"):
            assert not open_, open_
            assert i == len(events) - 1
    assert events[0]["type"] == "RUN_STARTED"


def test_a_plain_answer() -> None:
    log = played("ta", "tb")
    log.end()
    events = feed_all(AgUiStream("thread", "run"), log.events)
    check_pairs(events)
    assert events[0] == {
        "type": "RUN_STARTED",
        "threadId": "thread",
        "runId": "run",
        "rawEvent": {"type": "stream_start", "seq": 1, "run_id": "run-1"},
    }
    assert events[1:] == [
        {"type": "TEXT_MESSAGE_START", "messageId": "run-text-1", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "run-text-1", "delta": "a"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "run-text-1", "delta": "b"},
        {"type": "TEXT_MESSAGE_END", "messageId": "run-text-1"},
        {"type": "RUN_FINISHED", "threadId": "thread", "runId": "run"},
    ]


def test_reasoning_tools_and_order() -> None:
    log = played("khm", "ta", "(clock", ")", "(calc", "!", "c", "tb")
    log.end()
    events = feed_all(AgUiStream("th", "r"), log.events)
    check_pairs(events)
    types = [e["type"] for e in events]
    assert not [t for t in types if t.startswith("THINKING")]
    assert types[:6] == [
        "RUN_STARTED",
        "REASONING_START",
        "REASONING_MESSAGE_START",
        "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_END",
        "REASONING_END",
    ]
    start = next(e for e in events if e["type"] == "TOOL_CALL_START")
    assert start["toolCallName"] == "clock"
    assert start["parentMessageId"] == "r-text-2"  # the text it followed
    args = next(e for e in events if e["type"] == "TOOL_CALL_ARGS")
    assert json.loads(args["delta"]) == {"x": 1}
    results = [e for e in events if e["type"] == "TOOL_CALL_RESULT"]
    assert [(r["content"], r["rawEvent"]["success"]) for r in results] == [("ok", True), ("bad", False)]
    assert results[0]["toolCallId"] == start["toolCallId"]
    assert results[0]["messageId"] != results[1]["messageId"]
    assert {"type": "CUSTOM", "name": "context_compressed", "value": {}} in events


def test_a_stop_is_a_cancelled_run() -> None:
    log = played("ta", "(slow")
    log.stopped("user")
    events = feed_all(AgUiStream("th", "r"), log.events)
    check_pairs(events)
    assert events[-2]["content"] == "cancelled"
    last = events[-1]
    assert (last["type"], last["outcome"], last["rawEvent"]["reason"]) == (
        "RUN_FINISHED",
        {"type": "cancelled"},
        "user",
    )


def test_an_error_is_run_error() -> None:
    log = played("ta")
    log.error("boom")
    events = feed_all(AgUiStream("th", "r"), log.events)
    check_pairs(events)
    assert events[-1] == {"type": "RUN_ERROR", "message": "boom", "code": "agent_error"}


def test_reasoning_cut_short_is_ended() -> None:
    log = played("kdeep")
    log.stopped("shutdown")
    events = feed_all(AgUiStream("th", "r"), log.events)
    check_pairs(events)


def test_nothing_after_the_end_and_frames_that_are_not_run_events() -> None:
    stream = AgUiStream("th", "r")
    assert stream.feed({"type": "replay_end"}) == []
    assert stream.feed({"type": "error", "message": "Invalid JSON"}) == []
    log = played()
    log.end()
    feed_all(stream, log.events)
    assert stream.done
    assert stream.feed({"type": "stream_delta", "seq": 5, "delta": "late"}) == []


def test_merged_deltas_carry_the_same_text() -> None:
    log = played("ka", "kb", "K", "tc", "td")
    log.end()
    stream = AgUiStream("th", "r")
    frames = []
    after = 0
    while after < log.last_seq:
        frame, after = next_frame(log.events, after, log.last_seq)
        frames.append(orjson.loads(frame))
    events = [e for f in frames for e in stream.feed(f)]
    check_pairs(events)
    assert "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT") == "cd"
    assert "".join(e["delta"] for e in events if e["type"] == "REASONING_MESSAGE_CONTENT") == "ab"


# -- RunAgentInput ------------------------------------------------------------------------


def test_the_last_user_message_is_taken() -> None:
    body = {
        "threadId": "t-1",
        "runId": "r-1",
        "state": {"ignored": True},
        "tools": [{"name": "frontend"}],
        "messages": [
            {"id": "1", "role": "user", "content": "old"},
            {"id": "2", "role": "assistant", "content": "answer"},
            {
                "id": "3",
                "role": "user",
                "content": [
                    {"type": "text", "text": "new"},
                    {"type": "image", "source": {"type": "data", "value": "AAAA", "mimeType": "image/jpeg"}},
                    {"type": "image", "source": {"type": "url", "value": "https://example.invalid/x.png"}},
                    {"type": "text", "text": "more"},
                ],
            },
        ],
    }
    inp = parse_run_input(body)
    assert (inp.thread_id, inp.run_id, inp.text) == ("t-1", "r-1", "new\n\nmore")
    assert inp.images == ["data:image/jpeg;base64,AAAA"]
    assert parse_run_input({**body, "messages": [{"role": "user", "content": "plain"}]}).text == "plain"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("x", "RunAgentInput"),
        ({"runId": "r", "messages": [{"role": "user", "content": "x"}]}, "threadId"),
        ({"threadId": "a/b", "runId": "r", "messages": [{"role": "user", "content": "x"}]}, "threadId"),
        ({"threadId": "t", "messages": [{"role": "user", "content": "x"}]}, "runId"),
        ({"threadId": "t", "runId": "r", "messages": []}, "user's message"),
        ({"threadId": "t", "runId": "r", "messages": [{"role": "assistant", "content": "x"}]}, "user's message"),
    ],
)
def test_bad_inputs(body: Any, says: str) -> None:
    with pytest.raises(BadClientMessage, match=says):
        parse_run_input(body)

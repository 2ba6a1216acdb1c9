"""Layer 1, sans-IO: the run log's grammar, encode-once and delta merging (navi_trio.events).

No trio here: ``events.py`` is plain synchronous code, so these are plain tests.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from navi_trio import events as events_mod
from navi_trio.errors import GrammarError
from navi_trio.events import (
    MERGE_MAX_CHARS,
    TERMINAL_TYPES,
    Event,
    RunLog,
    check_grammar,
    count_frames,
    next_frame,
)


def decoded(log: RunLog) -> list[dict[str, Any]]:
    return [json.loads(e.wire) for e in log.events]


def types(log: RunLog) -> list[str]:
    return [e.type for e in log.events]


def started(run_id: str = "r1") -> RunLog:
    log = RunLog(run_id)
    log.start()
    return log


def snapshot(log: RunLog) -> tuple[Any, ...]:
    return (
        [e.wire for e in log.events],
        log.content,
        log.thinking_text,
        [t.as_dict() for t in log.tool_calls],
        log.tool_open,
        log.terminal,
    )


def all_frames(log: RunLog, after: int = 0, until: int | None = None, max_chars: int = MERGE_MAX_CHARS) -> list[str]:
    """Every frame a reader at seq ``after`` gets, calling next_frame until up to date."""
    until = log.last_seq if until is None else until
    out: list[str] = []
    while after < until:
        frame, new_after = log.next_frame(after, until, max_chars)
        assert new_after > after
        out.append(frame)
        after = new_after
    assert after == until
    return out


def mixed_log() -> RunLog:
    """A log with every kind of event, deltas of both kinds in runs of several."""
    log = started()
    for w in ("let ", "me ", "think"):
        log.thinking_delta(w)
    log.text_delta("Hello")  # closes thinking
    log.text_delta(", ")
    log.text_delta("world")
    log.tool_started("calc", {"expression": "1+1"})
    log.tool_call("2", success=True)
    log.text_delta("!")
    log.context_compressed()
    log.thinking_delta("more")
    log.thinking_delta(" thought")
    log.text_delta(" bye")
    log.text_delta(".")
    log.end()
    return log


# -- grammar -------------------------------------------------------------------------


def test_seq_is_one_to_n_and_stream_start_first() -> None:
    log = mixed_log()
    assert [e.seq for e in log.events] == list(range(1, len(log.events) + 1))
    assert log.last_seq == len(log.events)
    assert log.events[0].type == "stream_start"
    assert decoded(log)[0] == {"type": "stream_start", "seq": 1, "run_id": "r1"}
    assert [e["seq"] for e in decoded(log)] == [e.seq for e in log.events]
    terminals = [e for e in log.events if e.type in TERMINAL_TYPES]
    assert terminals == [log.events[-1]]
    assert log.terminal is log.events[-1]
    assert log.finished
    check_grammar([(e.type, e.seq) for e in log.events])


def test_nothing_before_stream_start_and_no_second_start() -> None:
    log = RunLog("r")
    assert not log.finished
    assert log.last_seq == 0
    with pytest.raises(GrammarError):
        log.text_delta("x")
    with pytest.raises(GrammarError):
        log.end()
    assert log.events == []
    log.start()
    with pytest.raises(GrammarError):
        log.start()
    assert types(log) == ["stream_start"]


@pytest.mark.parametrize(
    "terminate",
    [
        lambda log: log.end(),
        lambda log: log.stopped("user"),
        lambda log: log.stopped("shutdown"),
        lambda log: log.error("boom"),
    ],
    ids=["end", "stopped-user", "stopped-shutdown", "error"],
)
def test_exactly_one_terminal_nothing_after(terminate: Any) -> None:
    log = started()
    log.text_delta("a")
    terminate(log)
    n = log.last_seq
    attempts = [
        lambda: log.text_delta("b"),
        lambda: log.thinking_delta("t"),
        lambda: log.tool_started("x", {}),
        lambda: log.context_compressed(),
        lambda: log.end(),
        lambda: log.stopped("user"),
        lambda: log.error("again"),
    ]
    for attempt in attempts:
        with pytest.raises(GrammarError):
            attempt()
    assert log.last_seq == n
    assert sum(e.type in TERMINAL_TYPES for e in log.events) == 1
    assert log.events[-1] is log.terminal


def test_tool_call_without_tool_started() -> None:
    log = started()
    with pytest.raises(GrammarError):
        log.tool_call("r", success=True)
    log.tool_started("t", {"a": 1})
    log.tool_call("r", success=True)
    with pytest.raises(GrammarError):  # the tool is closed: a second tool_call is refused
        log.tool_call("r", success=True)
    assert types(log) == ["stream_start", "tool_started", "tool_call"]


@pytest.mark.parametrize(
    "event",
    [
        lambda log: log.text_delta("x"),
        lambda log: log.thinking_delta("x"),
        lambda log: log.tool_started("other", {}),
        lambda log: log.context_compressed(),
    ],
    ids=["text", "thinking", "tool_started", "compressed"],
)
def test_no_event_while_a_tool_is_open(event: Any) -> None:
    log = started()
    log.tool_started("t", {})
    before = snapshot(log)
    with pytest.raises(GrammarError):
        event(log)
    assert snapshot(log) == before
    assert log.tool_open
    log.tool_call("ok", success=True)
    n = log.last_seq
    event(log)  # allowed again once the tool has its tool_call
    assert log.last_seq == n + 1


def test_unknown_stop_reason() -> None:
    log = started()
    log.tool_started("t", {})
    before = snapshot(log)
    with pytest.raises(GrammarError):
        log.stopped("bored")
    assert snapshot(log) == before  # nothing closed, nothing appended
    assert not log.finished
    for reason in ("user", "deleted", "shutdown"):
        lg = started()
        lg.stopped(reason)
        assert decoded(lg)[-1] == {"type": "stream_stopped", "seq": 2, "content": "", "reason": reason}


def test_rejected_append_leaves_log_state_unchanged() -> None:
    """A GrammarError must not change the log: content stays the concatenated deltas
    actually logged (RunLog docstring: "event emitted" and "state updated" never come apart)."""
    log = started()
    log.text_delta("kept")
    log.end()
    before = snapshot(log)
    with pytest.raises(GrammarError):
        log.text_delta(" lost")
    with pytest.raises(GrammarError):
        log.thinking_delta("lost thought")
    with pytest.raises(GrammarError):
        log.tool_started("t", {})
    assert snapshot(log) == before
    assert log.content == "kept" == "".join(e.delta or "" for e in log.events if e.type == "stream_delta")

    fresh = RunLog("r")
    with pytest.raises(GrammarError):
        fresh.text_delta("before start")
    assert fresh.content == ""


# -- auto-closing ----------------------------------------------------------------------


def test_thinking_auto_closed_by_text_delta() -> None:
    log = started()
    assert log.thinking_delta("hmm") == [log.events[-1]]
    out = log.text_delta("answer")
    assert [e.type for e in out] == ["thinking_end", "stream_delta"]
    assert out == log.events[-2:]
    assert types(log) == ["stream_start", "thinking_delta", "thinking_end", "stream_delta"]
    assert log.thinking_end() == []  # already closed: nothing more


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (lambda log: log.tool_started("t", {}), "tool_started"),
        (lambda log: log.context_compressed(), "context_compressed"),
        (lambda log: log.end(), "stream_end"),
        (lambda log: log.error("e"), "error"),
    ],
    ids=["tool", "compressed", "end", "error"],
)
def test_thinking_auto_closed_by_other_events(event: Any, expected: str) -> None:
    log = started()
    log.thinking_delta("a")
    log.thinking_delta("b")
    out = event(log)
    assert [e.type for e in out] == ["thinking_end", expected]
    assert types(log).count("thinking_end") == 1


def test_thinking_end_explicit_and_idempotent() -> None:
    log = started()
    assert log.thinking_end() == []
    log.thinking_delta("a")
    assert [e.type for e in log.thinking_end()] == ["thinking_end"]
    assert log.thinking_end() == []
    log.text_delta("x")
    assert types(log) == ["stream_start", "thinking_delta", "thinking_end", "stream_delta"]


def test_stop_closes_open_tool_with_cancelled_tool_call() -> None:
    log = started()
    log.text_delta("part")
    log.tool_started("search", {"q": "x"}, is_subagent=True)
    out = log.stopped("user")
    assert [e.type for e in out] == ["tool_call", "stream_stopped"]
    call, stop = (json.loads(e.wire) for e in out)
    assert call == {
        "type": "tool_call",
        "seq": 4,
        "tool": "search",
        "args": {"q": "x"},
        "result": "cancelled",
        "success": False,
        "is_subagent": True,
    }
    assert stop == {"type": "stream_stopped", "seq": 5, "content": "part", "reason": "user"}
    assert [t.as_dict() for t in log.tool_calls] == [
        {"tool": "search", "args": {"q": "x"}, "result": "cancelled", "success": False}
    ]
    assert not log.tool_open


def test_stop_closes_open_thinking_before_terminal() -> None:
    log = started()
    log.thinking_delta("deep")
    out = log.stopped("shutdown")
    assert [e.type for e in out] == ["thinking_end", "stream_stopped"]
    assert types(log) == ["stream_start", "thinking_delta", "thinking_end", "stream_stopped"]


def test_close_open_with_nothing_open_is_empty() -> None:
    log = started()
    log.text_delta("x")
    assert log.close_open() == []
    assert types(log) == ["stream_start", "stream_delta"]


@pytest.mark.parametrize(
    ("finish", "terminal_type"),
    [(lambda log: log.end(), "stream_end"), (lambda log: log.error("bad"), "error")],
    ids=["end", "error"],
)
def test_end_and_error_also_close_open_tool(finish: Any, terminal_type: str) -> None:
    log = started()
    log.tool_started("t", [1, 2])
    out = finish(log)
    assert [e.type for e in out] == ["tool_call", terminal_type]
    assert json.loads(out[0].wire)["result"] == "cancelled"
    assert json.loads(out[0].wire)["success"] is False


# -- state -----------------------------------------------------------------------------


def test_content_thinking_text_and_tool_calls() -> None:
    log = mixed_log()
    assert log.content == "Hello, world! bye."
    assert log.thinking_text == "let me thinkmore thought"
    assert [t.as_dict() for t in log.tool_calls] == [
        {"tool": "calc", "args": {"expression": "1+1"}, "result": "2", "success": True}
    ]
    wire = decoded(log)
    assert wire[-1] == {"type": "stream_end", "seq": log.last_seq, "content": "Hello, world! bye."}
    assert "".join(e["delta"] for e in wire if e["type"] == "stream_delta") == log.content
    assert "".join(e["delta"] for e in wire if e["type"] == "thinking_delta") == log.thinking_text
    tool_started = next(e for e in wire if e["type"] == "tool_started")
    assert tool_started == {
        "type": "tool_started",
        "seq": tool_started["seq"],
        "tool": "calc",
        "args": {"expression": "1+1"},
        "is_subagent": False,
    }
    deltas = [e for e in log.events if e.type in ("stream_delta", "thinking_delta")]
    assert all(e.delta == json.loads(e.wire)["delta"] for e in deltas)
    assert all(e.delta is None for e in log.events if e not in deltas)


def test_error_event_fields() -> None:
    log = started()
    log.text_delta("so far")
    log.error("boom")
    assert decoded(log)[-1] == {"type": "error", "seq": 3, "message": "boom"}
    assert log.content == "so far"


def test_unicode_survives_encoding() -> None:
    log = started()
    log.text_delta('héllo ☃ \U0001f600 "q" \n')
    assert json.loads(log.events[-1].wire)["delta"] == 'héllo ☃ \U0001f600 "q" \n'


# -- encode once -----------------------------------------------------------------------


def test_each_event_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = events_mod.encode

    def counting(obj: dict[str, Any]) -> str:
        calls.append(obj)
        return real(obj)

    monkeypatch.setattr(events_mod, "encode", counting)
    log = mixed_log()
    assert len(calls) == len(log.events)
    # The wire str is a JSON object whose first two keys are type and seq.
    for ev in log.events:
        assert isinstance(ev.wire, str)
        obj = json.loads(ev.wire)
        assert list(obj)[:2] == ["type", "seq"]
        assert (obj["type"], obj["seq"]) == (ev.type, ev.seq)
        assert ev.wire.startswith(f'{{"type":"{ev.type}","seq":{ev.seq}')
    # A reader that is up to date gets the very same str objects: no re-encoding.
    calls.clear()
    after = 0
    while after < log.last_seq:
        frame, after_new = log.next_frame(after, after + 1)
        assert frame is log.events[after].wire
        after = after_new
    assert calls == []


# -- merging ---------------------------------------------------------------------------


def test_next_frame_merges_consecutive_deltas_of_one_kind() -> None:
    log = started()
    for d in ("a", "b", "c"):
        log.text_delta(d)
    log.end()
    frame, after = log.next_frame(0)
    assert frame is log.events[0].wire
    assert after == 1
    frame, after = log.next_frame(1)
    assert json.loads(frame) == {"type": "stream_delta", "seq": 4, "delta": "abc"}
    assert list(json.loads(frame))[:2] == ["type", "seq"]
    assert after == 4
    frame, after = log.next_frame(4)
    assert frame is log.events[4].wire
    assert after == 5
    with pytest.raises(IndexError):
        log.next_frame(5)


def test_next_frame_never_merges_across_kinds_or_non_deltas() -> None:
    log = mixed_log()
    frames = [json.loads(f) for f in all_frames(log)]
    assert [f["type"] for f in frames] == [
        "stream_start",
        "thinking_delta",  # "let me think"
        "thinking_end",
        "stream_delta",  # "Hello, world"
        "tool_started",
        "tool_call",
        "stream_delta",  # "!"
        "context_compressed",
        "thinking_delta",  # "more thought"
        "thinking_end",
        "stream_delta",  # " bye."
        "stream_end",
    ]
    deltas = [f["delta"] for f in frames if "delta" in f]
    assert deltas == ["let me think", "Hello, world", "!", "more thought", " bye."]
    # Each merged frame carries the seq of the last event merged.
    by_seq = {e.seq: e for e in log.events}
    for f in frames:
        assert by_seq[f["seq"]].type == f["type"]
    check_grammar([(f["type"], f["seq"]) for f in frames])
    assert frames[-1]["seq"] == log.last_seq


def test_thinking_then_text_deltas_adjacent_are_not_merged() -> None:
    # Direct adjacency of the two delta kinds (no thinking_end between) at the events level.
    evs = [
        Event(1, "stream_start", '{"type":"stream_start","seq":1}'),
        Event(2, "thinking_delta", '{"type":"thinking_delta","seq":2,"delta":"t"}', "t"),
        Event(3, "stream_delta", '{"type":"stream_delta","seq":3,"delta":"s"}', "s"),
        Event(4, "stream_delta", '{"type":"stream_delta","seq":4,"delta":"u"}', "u"),
    ]
    frame, after = next_frame(evs, 1, 4)
    assert (json.loads(frame), after) == ({"type": "thinking_delta", "seq": 2, "delta": "t"}, 2)
    frame, after = next_frame(evs, 2, 4)
    assert (json.loads(frame), after) == ({"type": "stream_delta", "seq": 4, "delta": "su"}, 4)


def test_merge_bound_max_chars() -> None:
    log = started()
    for d in ("abcde", "fghij", "k", "lmnopqrstuvwxyz", "0"):
        log.text_delta(d)
    frames = [json.loads(f) for f in all_frames(log, after=1, max_chars=10)]
    # 5+5 fits exactly; "k" would exceed; a delta longer than the bound goes out whole.
    assert [(f["seq"], f["delta"]) for f in frames] == [(3, "abcdefghij"), (4, "k"), (5, "lmnopqrstuvwxyz"), (6, "0")]


def test_merge_bound_default_max_chars() -> None:
    log = started()
    big = "x" * (MERGE_MAX_CHARS // 3)
    for _ in range(7):
        log.text_delta(big)
    log.end()
    frames = [json.loads(f) for f in all_frames(log, after=1)]
    sizes = [len(f.get("delta", "")) for f in frames]
    assert all(s <= MERGE_MAX_CHARS for s in sizes)
    assert sizes == [3 * len(big), 3 * len(big), len(big), 0]
    assert "".join(f.get("delta", "") for f in frames) == log.content
    assert [f["seq"] for f in frames] == [4, 7, 8, 9]


def test_next_frame_until_bound() -> None:
    log = started()
    for d in "abcdef":
        log.text_delta(d)
    frame, after = log.next_frame(1, until=4)
    assert (json.loads(frame), after) == ({"type": "stream_delta", "seq": 4, "delta": "abc"}, 4)
    with pytest.raises(IndexError):
        log.next_frame(4, until=4)
    frame, after = log.next_frame(4)
    assert (json.loads(frame), after) == ({"type": "stream_delta", "seq": 7, "delta": "def"}, 7)
    with pytest.raises(IndexError):
        log.next_frame(7)
    # until == after + 1 gives exactly that event, unmerged
    frame, after = log.next_frame(2, until=3)
    assert frame is log.events[2].wire
    assert after == 3


def test_merged_frames_lose_no_text_from_any_position() -> None:
    log = mixed_log()
    for start in range(log.last_seq):
        for max_chars in (1, 3, 7, MERGE_MAX_CHARS):
            frames = [json.loads(f) for f in all_frames(log, after=start, max_chars=max_chars)]
            seqs = [f["seq"] for f in frames]
            assert seqs == sorted(set(seqs))
            assert seqs[-1] == log.last_seq
            assert all(s > start for s in seqs)
            want = "".join(e.delta or "" for e in log.events[start:] if e.type == "stream_delta")
            assert "".join(f["delta"] for f in frames if f["type"] == "stream_delta") == want


def test_count_frames_equals_number_of_next_frame_calls() -> None:
    log = mixed_log()
    evs = log.events
    n = len(evs)
    for max_chars in (1, 4, 10, MERGE_MAX_CHARS):
        for after in range(n + 1):
            for until in range(after, n + 1):
                calls = 0
                a = after
                while True:
                    try:
                        _, a = next_frame(evs, a, until, max_chars)
                    except IndexError:
                        break
                    calls += 1
                assert a == until
                assert count_frames(evs, after, until, max_chars) == calls, (after, until, max_chars)
    assert count_frames(evs, 0, n) == 12
    assert count_frames(evs, n, n) == 0


# -- check_grammar ---------------------------------------------------------------------


def test_check_grammar_accepts_full_and_merged_views() -> None:
    check_grammar([("stream_start", 1), ("stream_delta", 2), ("stream_end", 3)])
    check_grammar([("stream_start", 1), ("stream_delta", 5), ("thinking_end", 6), ("stream_stopped", 9)])
    check_grammar([("stream_start", 1), ("error", 2)])


@pytest.mark.parametrize(
    "view",
    [
        [],
        [("stream_delta", 1), ("stream_end", 2)],  # no stream_start
        [("stream_start", 1), ("stream_delta", 3), ("stream_delta", 2), ("stream_end", 4)],  # out of order
        [("stream_start", 1), ("stream_delta", 2), ("stream_delta", 2), ("stream_end", 3)],  # duplicate
        [("stream_start", 1), ("stream_end", 2), ("stream_end", 3)],  # two terminals
        [("stream_start", 1), ("stream_stopped", 2), ("error", 3)],  # two terminals, mixed
        [("stream_start", 1), ("stream_end", 2), ("stream_delta", 3)],  # event after terminal
        [("stream_start", 1), ("stream_delta", 2)],  # no terminal
        [("stream_start", 1), ("stream_delta", None), ("stream_end", 3)],  # seq missing
        [("stream_start", 0), ("stream_end", 1)],  # seq starts at 1
    ],
    ids=[
        "empty",
        "no-start",
        "out-of-order",
        "duplicate",
        "two-terminals",
        "two-terminals-mixed",
        "after-terminal",
        "no-terminal",
        "seq-missing",
        "seq-zero",
    ],
)
def test_check_grammar_rejects(view: list[tuple[str, int | None]]) -> None:
    with pytest.raises(GrammarError):
        check_grammar(view)

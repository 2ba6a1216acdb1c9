"""A run's event log: the grammar, ``seq`` numbering, encode-once, and delta merging.

This module is sans-IO on purpose (no trio import), like hypercorn's ``protocol/``: the
rules of CONTRACT section 3 live here as plain synchronous code with plain tests.

The log is the source of truth for replay, resume and for subscribers that fall behind.
Each event is encoded to JSON exactly once, when it is appended; every subscriber then
shares the same ``str``. Only a reader that is behind gets new text: consecutive deltas of
one kind merged into one frame that carries the seq of the last event merged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import orjson

from .errors import GrammarError

TERMINAL_TYPES: Final = frozenset({"stream_end", "stream_stopped", "error"})
DELTA_TYPES: Final = frozenset({"stream_delta", "thinking_delta"})
STOP_REASONS: Final = frozenset({"user", "deleted", "shutdown"})

#: A merged catch-up frame stops growing past this many characters of delta text, so a
#: reader that is far behind never makes the server build one huge string for it.
MERGE_MAX_CHARS: Final = 64 * 1024


def encode(obj: dict[str, Any]) -> str:
    """Encode one wire object to JSON text (compact, UTF-8 safe)."""
    return orjson.dumps(obj).decode()


HEARTBEAT: Final = encode({"type": "heartbeat"})
SESSION_SYNC: Final = encode({"type": "session_sync"})
REPLAY_END: Final = encode({"type": "replay_end"})


def error_frame(message: str) -> str:
    """The ``error`` answer to a bad client message (no seq: not part of a run)."""
    return encode({"type": "error", "message": message})


def replay_start_frame(count: int) -> str:
    return encode({"type": "replay_start", "count": count})


@attrs.frozen
class Event:
    """One event of a run, already encoded.

    ``delta`` is kept for the delta types only, so that a lagging reader's frames can be
    merged without decoding ``wire``.
    """

    seq: int
    type: str
    wire: str
    delta: str | None = None
    #: When the event was appended, on the run's clock (lets a writer see how far behind
    #: its reader is).
    t: float = 0.0


@attrs.define(eq=False)
class ToolCall:
    tool: str
    args: Any
    result: str
    success: bool

    def as_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "args": self.args, "result": self.result, "success": self.success}


class RunLog:
    """The events of one run, in order, with ``seq`` 1..n and exactly one terminal event.

    Every method appends synchronously and returns the new events; nothing here can be
    interrupted half-way, so "event emitted" and "state updated" never come apart.
    """

    __slots__ = (
        "_clock",
        "_open_tools",
        "_thinking_open",
        "events",
        "run_id",
        "terminal",
        "text",
        "thinking",
        "tool_calls",
    )

    def __init__(self, run_id: str, clock: Callable[[], float] | None = None) -> None:
        self.run_id = run_id
        self._clock = clock
        self.events: list[Event] = []
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.terminal: Event | None = None
        self._thinking_open = False
        #: Tools started and not yet finished: a stack, since a sub-agent's tools run
        #: inside the tool that delegated to it (``is_subagent: true``).
        self._open_tools: list[tuple[str, Any, bool]] = []

    # -- state -------------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return len(self.events)

    @property
    def answer_changes(self) -> int:
        """How many changes what a saved answer holds has seen (text and thinking deltas,
        finished tool calls; the lists only grow): a checkpoint skips a run whose count
        has not moved (a run waiting on a tool has nothing new to save)."""
        return len(self.text) + len(self.thinking) + len(self.tool_calls)

    @property
    def finished(self) -> bool:
        return self.terminal is not None

    @property
    def content(self) -> str:
        """The answer so far: the concatenated text deltas."""
        return "".join(self.text)

    @property
    def thinking_text(self) -> str:
        return "".join(self.thinking)

    @property
    def tool_open(self) -> bool:
        return bool(self._open_tools)

    def has_room(self, max_events: int) -> bool:
        """Whether one more body event (with the ``thinking_end`` it may close first) still
        leaves room under ``max_events`` for what a stop appends: a ``tool_call`` per open
        tool, a ``thinking_end`` and the terminal event. A run's log never holds more."""
        return len(self.events) + len(self._open_tools) + self._thinking_open + 3 <= max_events

    # -- appending ---------------------------------------------------------------------
    def _append(self, type_: str, fields: dict[str, Any] | None = None, delta: str | None = None) -> Event:
        if self.terminal is not None:
            raise GrammarError(f"run {self.run_id} already ended; cannot append {type_}")
        if not self.events and type_ != "stream_start":
            raise GrammarError("the first event of a run is stream_start")
        seq = len(self.events) + 1
        obj: dict[str, Any] = {"type": type_, "seq": seq}
        if fields:
            obj.update(fields)
        event = Event(seq, type_, encode(obj), delta, self._clock() if self._clock is not None else 0.0)
        self.events.append(event)
        if type_ in TERMINAL_TYPES:
            self.terminal = event
        return event

    def _check_open(self, type_: str) -> None:
        """Refuse an append before any state changes, so a rejected event leaves no trace."""
        if self.terminal is not None:
            raise GrammarError(f"run {self.run_id} already ended; cannot append {type_}")
        if not self.events:
            raise GrammarError("the first event of a run is stream_start")

    def _body_event(self, type_: str, *, subagent_tool: bool = False) -> list[Event]:
        """Checks shared by every non-terminal event after stream_start. While a tool runs
        only a sub-agent's own tool may start (nested inside it)."""
        self._check_open(type_)
        if self._open_tools and not subagent_tool:
            raise GrammarError(f"{type_} while tool {self._open_tools[-1][0]!r} is running")
        out: list[Event] = []
        if self._thinking_open and type_ not in ("thinking_delta", "thinking_end"):
            out.append(self._end_thinking())
        return out

    def _end_thinking(self) -> Event:
        self._thinking_open = False
        return self._append("thinking_end")

    def start(self) -> Event:
        if self.events:
            raise GrammarError("stream_start twice")
        return self._append("stream_start", {"run_id": self.run_id})

    def thinking_delta(self, delta: str) -> list[Event]:
        out = self._body_event("thinking_delta")
        self._thinking_open = True
        self.thinking.append(delta)
        out.append(self._append("thinking_delta", {"delta": delta}, delta))
        return out

    def thinking_end(self) -> list[Event]:
        self._check_open("thinking_end")
        if not self._thinking_open:
            return []
        return [self._end_thinking()]

    def text_delta(self, delta: str) -> list[Event]:
        out = self._body_event("stream_delta")
        self.text.append(delta)
        out.append(self._append("stream_delta", {"delta": delta}, delta))
        return out

    def tool_started(self, tool: str, args: Any, *, is_subagent: bool = False) -> list[Event]:
        out = self._body_event("tool_started", subagent_tool=is_subagent)
        self._open_tools.append((tool, args, is_subagent))
        out.append(self._append("tool_started", {"tool": tool, "args": args, "is_subagent": is_subagent}))
        return out

    def tool_call(self, result: str, *, success: bool) -> list[Event]:
        self._check_open("tool_call")
        if not self._open_tools:
            raise GrammarError("tool_call without tool_started")
        tool, args, is_subagent = self._open_tools.pop()
        self.tool_calls.append(ToolCall(tool, args, result, success))
        fields = {"tool": tool, "args": args, "result": result, "success": success, "is_subagent": is_subagent}
        return [self._append("tool_call", fields)]

    def context_compressed(self) -> list[Event]:
        out = self._body_event("context_compressed")
        out.append(self._append("context_compressed"))
        return out

    def close_open(self) -> list[Event]:
        """Close what a stop cut short: an open tool gets its ``tool_call`` with
        ``success: false, result: "cancelled"``, open thinking gets ``thinking_end``."""
        out: list[Event] = []
        while self._open_tools:
            out.extend(self.tool_call("cancelled", success=False))
        if self._thinking_open:
            out.append(self._end_thinking())
        return out

    def end(self) -> list[Event]:
        out = self.close_open()
        out.append(self._append("stream_end", {"content": self.content}))
        return out

    def stopped(self, reason: str) -> list[Event]:
        if reason not in STOP_REASONS:
            raise GrammarError(f"unknown stop reason {reason!r}")
        out = self.close_open()
        out.append(self._append("stream_stopped", {"content": self.content, "reason": reason}))
        return out

    def error(self, message: str) -> list[Event]:
        out = self.close_open()
        out.append(self._append("error", {"message": message}))
        return out

    # -- reading -----------------------------------------------------------------------
    def next_frame(self, after: int, until: int | None = None, max_chars: int = MERGE_MAX_CHARS) -> tuple[str, int]:
        """The next frame for a reader that has everything up to seq ``after``.

        Consecutive deltas of one kind are merged (up to ``max_chars`` of delta text, and
        never past seq ``until``) into one frame carrying the seq of the last delta
        merged. Returns ``(frame, new_after)``. Raises ``IndexError`` when up to date.
        """
        return next_frame(self.events, after, len(self.events) if until is None else until, max_chars)


def merges(first: Event, ev: Event, size: int, max_chars: int = MERGE_MAX_CHARS) -> bool:
    """The one merge rule, for catch-up from the log and for a writer's queued deltas
    alike: ``ev`` joins a merged frame that began with the delta ``first`` and holds
    ``size`` characters if it is a delta of the same kind and the frame stays within
    ``max_chars`` (a single delta longer than that still goes out, on its own)."""
    delta = ev.delta
    return delta is not None and ev.type == first.type and size + len(delta) <= max_chars


def _merge_end(events: Sequence[Event], after: int, until: int, max_chars: int) -> int:
    """Index one past the last event merged into the frame that starts at ``events[after]``."""
    first = events[after]
    end = after + 1
    if first.delta is None:
        return end
    size = len(first.delta)
    while end < until:
        ev = events[end]
        if not merges(first, ev, size, max_chars):
            break
        size += len(ev.delta or "")
        end += 1
    return end


def merged_frame(first: Event, last: Event, parts: list[str]) -> str:
    """The frame of consecutive deltas ``first`` .. ``last``: their text, the seq of the last."""
    return encode({"type": first.type, "seq": last.seq, "delta": "".join(parts)})


def next_frame(events: Sequence[Event], after: int, until: int, max_chars: int = MERGE_MAX_CHARS) -> tuple[str, int]:
    """See :meth:`RunLog.next_frame`; ``events[i].seq == i + 1``."""
    if after >= until:
        raise IndexError("up to date")
    first = events[after]
    end = _merge_end(events, after, until, max_chars)
    if end == after + 1:
        return first.wire, first.seq
    last = events[end - 1]
    return merged_frame(first, last, [e.delta for e in events[after:end] if e.delta is not None]), last.seq


def count_frames(events: Sequence[Event], after: int, until: int, max_chars: int = MERGE_MAX_CHARS) -> int:
    """How many frames :func:`next_frame` gives from seq ``after`` to seq ``until``
    (a replay announces this count before its frames are built)."""
    count = 0
    while after < until:
        after = _merge_end(events, after, until, max_chars)
        count += 1
    return count


def check_grammar(types_and_seqs: Sequence[tuple[str, int | None]]) -> None:
    """Assert a subscriber's view of one run follows the contract grammar.

    ``types_and_seqs`` are the run events a client received, in order (merged deltas
    allowed: seq must then strictly increase rather than be consecutive). Raises
    ``GrammarError`` naming the first violation. Used by the tests and handy for clients.
    """
    if not types_and_seqs or types_and_seqs[0][0] != "stream_start":
        raise GrammarError("a run starts with stream_start")
    last = 0
    terminals = 0
    for i, (type_, seq) in enumerate(types_and_seqs):
        if seq is None or seq <= last:
            raise GrammarError(f"event {i} ({type_}) has seq {seq} after {last}")
        last = seq
        if terminals:
            raise GrammarError(f"{type_} after the terminal event")
        if type_ in TERMINAL_TYPES:
            terminals += 1
    if terminals != 1:
        raise GrammarError("a run ends with exactly one terminal event")

"""AG-UI events, from a run's events (sans-IO).

What ``@ag-ui/client``'s ``HttpAgent`` reads from ``POST /ag-ui``: SSE with one AG-UI
event per ``data:`` line. The mapping:

============================  =====================================================
run event                     AG-UI events
============================  =====================================================
``stream_start``              ``RUN_STARTED`` (the client's ``threadId`` and
                              ``runId``; ``rawEvent`` carries navi-trio's own event,
                              with its ``run_id``)
``thinking_delta``            ``REASONING_START`` and ``REASONING_MESSAGE_START``
                              (first of a block), ``REASONING_MESSAGE_CONTENT``
``thinking_end``              ``REASONING_MESSAGE_END``, ``REASONING_END``
``stream_delta``              ``TEXT_MESSAGE_START`` (first of a block, role
                              ``assistant``), ``TEXT_MESSAGE_CONTENT``
``tool_started``              ``TOOL_CALL_START``, ``TOOL_CALL_ARGS`` (the arguments
                              as JSON), ``TOOL_CALL_END``
``tool_call``                 ``TOOL_CALL_RESULT`` (``content``: the result; the
                              ``rawEvent`` says ``success``)
``context_compressed``        ``CUSTOM`` named ``context_compressed``
``stream_end``                ``RUN_FINISHED``
``stream_stopped``            ``RUN_FINISHED`` with ``outcome: {"type": "cancelled"}``
                              (AG-UI 1.0's word for a run stopped by whoever ran it;
                              ``rawEvent`` carries the reason)
``error``                     ``RUN_ERROR`` (``message``: the run's; ``code``:
                              ``agent_error``)
============================  =====================================================

A text message is ended before any other event, so a tool call or reasoning never
lands inside it; the deprecated ``THINKING_*`` events are never sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs
import orjson

from ..errors import BadClientMessage
from .ai_sdk import SESSION_ID

HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class AgUiStream:
    """Translates one run's events into AG-UI events; :attr:`done` after the terminal
    event (nothing is translated after it)."""

    def __init__(self, thread_id: str, run_id: str) -> None:
        self.thread_id = thread_id
        self.run_id = run_id
        self._text: str | None = None
        self._reasoning: str | None = None
        self._last_text: str | None = None
        self._blocks = 0
        self._tools: list[str] = []
        self.done = False

    def _block_id(self, kind: str) -> str:
        self._blocks += 1
        return f"{self.run_id}-{kind}-{self._blocks}"

    def _close_text(self, out: list[dict[str, Any]]) -> None:
        if self._text is not None:
            out.append({"type": "TEXT_MESSAGE_END", "messageId": self._text})
            self._text = None

    def _close_reasoning(self, out: list[dict[str, Any]]) -> None:
        if self._reasoning is not None:
            out.append({"type": "REASONING_MESSAGE_END", "messageId": self._reasoning})
            out.append({"type": "REASONING_END", "messageId": self._reasoning})
            self._reasoning = None

    def _close(self, out: list[dict[str, Any]]) -> None:
        self._close_text(out)
        self._close_reasoning(out)

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The AG-UI events for one run event (frames that are not run events give none)."""
        if self.done:
            return []
        type_ = event.get("type")
        out: list[dict[str, Any]] = []
        ids = {"threadId": self.thread_id, "runId": self.run_id}
        if type_ == "stream_start":
            out.append({"type": "RUN_STARTED", **ids, "rawEvent": dict(event)})
        elif type_ == "stream_delta":
            self._close_reasoning(out)
            if self._text is None:
                self._text = self._last_text = self._block_id("text")
                out.append({"type": "TEXT_MESSAGE_START", "messageId": self._text, "role": "assistant"})
            if event["delta"]:
                out.append({"type": "TEXT_MESSAGE_CONTENT", "messageId": self._text, "delta": event["delta"]})
        elif type_ == "thinking_delta":
            self._close_text(out)
            if self._reasoning is None:
                self._reasoning = self._block_id("reasoning")
                out.append({"type": "REASONING_START", "messageId": self._reasoning})
                out.append({"type": "REASONING_MESSAGE_START", "messageId": self._reasoning, "role": "reasoning"})
            if event["delta"]:
                out.append({"type": "REASONING_MESSAGE_CONTENT", "messageId": self._reasoning, "delta": event["delta"]})
        elif type_ == "thinking_end":
            self._close_reasoning(out)
        elif type_ == "tool_started":
            self._close(out)
            call_id = f"{self.run_id}-call-{event['seq']}"
            self._tools.append(call_id)
            start: dict[str, Any] = {"type": "TOOL_CALL_START", "toolCallId": call_id, "toolCallName": event["tool"]}
            if self._last_text is not None:
                start["parentMessageId"] = self._last_text
            out.append(start)
            args = orjson.dumps(event.get("args")).decode()
            out.append({"type": "TOOL_CALL_ARGS", "toolCallId": call_id, "delta": args})
            out.append({"type": "TOOL_CALL_END", "toolCallId": call_id})
        elif type_ == "tool_call":
            if self._tools:
                call_id = self._tools.pop()
                out.append(
                    {
                        "type": "TOOL_CALL_RESULT",
                        "messageId": f"{call_id}-result",
                        "toolCallId": call_id,
                        "content": event["result"],
                        "role": "tool",
                        "rawEvent": dict(event),
                    }
                )
        elif type_ == "context_compressed":
            self._close(out)
            out.append({"type": "CUSTOM", "name": "context_compressed", "value": {}})
        elif type_ == "stream_end":
            self._close(out)
            out.append({"type": "RUN_FINISHED", **ids})
            self.done = True
        elif type_ == "stream_stopped":
            self._close(out)
            out.append({"type": "RUN_FINISHED", **ids, "outcome": {"type": "cancelled"}, "rawEvent": dict(event)})
            self.done = True
        elif type_ == "error" and "seq" in event:  # an error without seq is not the run's
            self._close(out)
            out.append({"type": "RUN_ERROR", "message": event.get("message", ""), "code": "agent_error"})
            self.done = True
        return out


@attrs.frozen
class RunInput:
    """What navi-trio takes from a ``RunAgentInput``."""

    thread_id: str
    run_id: str
    text: str
    images: list[str]


def parse_run_input(body: Any) -> RunInput:
    """The thread (the session), the client's ``runId`` and the last message of
    ``messages``, which must be the user's.

    The server keeps the history, so earlier messages are ignored, as are ``state``,
    ``tools`` (frontend tools: navi-trio's agents run their own), ``context``,
    ``forwardedProps`` and ``resume``. Of the last message: its text (a string, or its
    ``text`` parts joined by blank lines) and its ``image`` parts with ``data`` sources;
    other parts are ignored. Raises :class:`BadClientMessage` (an HTTP 422).
    """
    if not isinstance(body, dict):
        raise BadClientMessage("Expected a RunAgentInput JSON object.")
    thread_id = body.get("threadId")
    if not isinstance(thread_id, str) or not SESSION_ID.match(thread_id):
        raise BadClientMessage("threadId must be a session id: 1 to 64 letters, digits, '-' or '_'.")
    run_id = body.get("runId")
    if not isinstance(run_id, str) or not run_id or len(run_id) > 200:
        raise BadClientMessage("runId must be a non-empty string.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        raise BadClientMessage("messages must end with the user's message.")
    last = messages[-1]
    if last.get("role") != "user":
        raise BadClientMessage("messages must end with the user's message.")
    content = last.get("content")
    texts: list[str] = []
    images: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image":
                source = part.get("source")
                if isinstance(source, dict) and source.get("type") == "data" and isinstance(source.get("value"), str):
                    mime = source.get("mimeType") if isinstance(source.get("mimeType"), str) else "image/png"
                    images.append(f"data:{mime};base64,{source['value']}")
    return RunInput(thread_id, run_id, "\n\n".join(t for t in texts if t), images)

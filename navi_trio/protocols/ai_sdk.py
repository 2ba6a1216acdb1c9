"""The AI SDK UI message stream protocol (v1), from a run's events (sans-IO).

What ``useChat`` and the ``ai`` package's ``DefaultChatTransport`` read: SSE with one
``UIMessageChunk`` per event and ``[DONE]`` at the end, the response carrying
``x-vercel-ai-ui-message-stream: v1``. The mapping:

============================  =====================================================
run event                     chunks
============================  =====================================================
``stream_start``              ``start`` (``messageId``: the answer's id)
``thinking_delta``            ``reasoning-start`` (first of a block), ``reasoning-delta``
``thinking_end``              ``reasoning-end``
``stream_delta``              ``text-start`` (first of a block), ``text-delta``
``tool_started``              ``tool-input-available`` (``dynamic``: the client need not
                              know our tools)
``tool_call``                 ``tool-output-available``, or ``tool-output-error`` when
                              it failed (a tool cut short by a stop: ``cancelled``)
``context_compressed``        a transient ``data-context-compressed`` part
``stream_end``                ``finish`` (``finishReason: "stop"``)
``stream_stopped``            ``abort`` (``reason``: ``user``, ``deleted``, ``shutdown``)
``error``                     ``error`` (``errorText``: the run's message)
============================  =====================================================

An open text block is closed (``text-end``) before any other part, so the parts of the
message keep the run's order. Merged deltas (a reader that fell behind) are one delta.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ..errors import BadClientMessage

#: The response headers of the protocol (as the ``ai`` package's
#: ``UI_MESSAGE_STREAM_HEADERS``).
HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-vercel-ai-ui-message-stream", b"v1"),
    (b"x-accel-buffering", b"no"),
]
SESSION_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class UIMessageStream:
    """Translates one run's events into UI message chunks; :attr:`done` after the
    terminal event (nothing is translated after it)."""

    def __init__(self, message_id: str | None = None) -> None:
        self._message_id = message_id
        self._text: str | None = None
        self._reasoning: str | None = None
        self._blocks = 0
        #: Tool call ids of tools started and not finished (a sub-agent's nest).
        self._tools: list[str] = []
        self.done = False

    def _block_id(self, kind: str) -> str:
        self._blocks += 1
        return f"{kind}-{self._blocks}"

    def _close_text(self, out: list[dict[str, Any]]) -> None:
        if self._text is not None:
            out.append({"type": "text-end", "id": self._text})
            self._text = None

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The chunks for one run event (frames that are not run events, such as
        ``replay_start`` or ``session_sync``, give none)."""
        if self.done:
            return []
        type_ = event.get("type")
        out: list[dict[str, Any]] = []
        if type_ == "stream_start":
            out.append({"type": "start", "messageId": self._message_id or str(event.get("run_id", ""))})
        elif type_ == "stream_delta":
            if self._text is None:
                self._text = self._block_id("text")
                out.append({"type": "text-start", "id": self._text})
            out.append({"type": "text-delta", "id": self._text, "delta": event["delta"]})
        elif type_ == "thinking_delta":
            self._close_text(out)
            if self._reasoning is None:
                self._reasoning = self._block_id("reasoning")
                out.append({"type": "reasoning-start", "id": self._reasoning})
            out.append({"type": "reasoning-delta", "id": self._reasoning, "delta": event["delta"]})
        elif type_ == "thinking_end":
            if self._reasoning is not None:
                out.append({"type": "reasoning-end", "id": self._reasoning})
                self._reasoning = None
        elif type_ == "tool_started":
            self._close_text(out)
            call_id = f"call-{event['seq']}"
            self._tools.append(call_id)
            out.append(
                {
                    "type": "tool-input-available",
                    "toolCallId": call_id,
                    "toolName": event["tool"],
                    "input": event.get("args"),
                    "dynamic": True,
                }
            )
        elif type_ == "tool_call":
            if self._tools:
                call_id = self._tools.pop()
                part: dict[str, Any] = {"toolCallId": call_id, "dynamic": True}
                if event.get("success"):
                    part.update(type="tool-output-available", output=event["result"])
                else:
                    part.update(type="tool-output-error", errorText=event["result"])
                out.append(part)
        elif type_ == "context_compressed":
            self._close_text(out)
            out.append({"type": "data-context-compressed", "data": {}, "transient": True})
        elif type_ == "stream_end":
            self._close_text(out)
            out.append({"type": "finish", "finishReason": "stop"})
            self.done = True
        elif type_ == "stream_stopped":
            self._close_text(out)
            out.append({"type": "abort", "reason": event.get("reason", "user")})
            self.done = True
        elif type_ == "error" and "seq" in event:  # an error without seq is not the run's
            self._close_text(out)
            out.append({"type": "error", "errorText": event.get("message", "")})
            self.done = True
        return out


@attrs.frozen
class FilePart:
    """A file the user attached (a ``file`` part with a ``data:`` URL)."""

    name: str
    media_type: str
    url: str


@attrs.frozen
class ChatRequest:
    """What navi-trio takes from a ``useChat`` body: the session and its new user message."""

    session_id: str
    text: str
    images: list[str]
    files: list[FilePart]


def parse_chat_body(body: Any) -> ChatRequest:
    """The session ``id`` and the last message of ``messages``, which must be the user's.

    The server keeps the history itself, so every earlier message is ignored, as are
    ``trigger``, ``messageId`` and any extra fields. Of the last message: its ``text``
    parts (joined by blank lines) and its ``file`` parts with a ``data:`` URL (images
    go to the model as images, other files become uploads of the session); every other
    part (``reasoning``, tool parts, ``source-*``, ``data-*``, files by remote URL) is
    ignored. Raises :class:`BadClientMessage` (an HTTP 422) naming what is wrong.
    """
    if not isinstance(body, dict):
        raise BadClientMessage("Expected a JSON object with id and messages.")
    sid = body.get("id")
    if not isinstance(sid, str) or not SESSION_ID.match(sid):
        raise BadClientMessage("id must be a session id: 1 to 64 letters, digits, '-' or '_'.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        raise BadClientMessage("messages must be a non-empty list of UI messages.")
    last = messages[-1]
    if last.get("role") != "user":
        raise BadClientMessage("The last message must be the user's.")
    parts = last.get("parts")
    if not isinstance(parts, list):
        raise BadClientMessage("The user's message has no parts.")
    texts: list[str] = []
    images: list[str] = []
    files: list[FilePart] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "file":
            url, media_type = part.get("url"), part.get("mediaType")
            if not isinstance(url, str) or not url.startswith("data:") or not isinstance(media_type, str):
                continue
            if media_type.startswith("image/"):
                images.append(url)
            else:
                name = part.get("filename")
                files.append(FilePart(name if isinstance(name, str) and name else "attachment", media_type, url))
    return ChatRequest(sid, "\n\n".join(t for t in texts if t), images, files)

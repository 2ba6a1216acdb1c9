"""Parsing a streamed chat completion (sans-IO: no trio, no HTTP).

- :class:`SSEDecoder`: server-sent-event lines to ``data`` payloads.
- :class:`ThinkSplitter`: inline ``<think>...</think>`` reasoning split from the answer,
  even when a tag is cut across chunks.
- :class:`ToolCallAssembler`: tool calls put together from fragments, several per turn.
"""

from __future__ import annotations

from typing import Any, Final

import attrs
import orjson

DONE: Final = "[DONE]"
_OPEN: Final = "<think>"
_CLOSE: Final = "</think>"


class StreamFormatError(ValueError):
    """The stream is not a chat-completion stream (bad JSON, wrong shape)."""


class SSEDecoder:
    """Feed lines (without newline); get each complete event's ``data``."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            data = "\n".join(self._data)
            self._data = []
            return data
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        return self.feed_line("")


def parse_chunk(data: str) -> dict[str, Any]:
    """One ``chat.completion.chunk``; raises :class:`StreamFormatError`."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise StreamFormatError("a chunk of the stream is not JSON") from None
    if not isinstance(chunk, dict):
        raise StreamFormatError("a chunk of the stream is not an object")
    if "error" in chunk:
        err = chunk["error"]
        message = err.get("message") if isinstance(err, dict) else str(err)
        raise StreamFormatError(f"the model reported an error: {message}")
    return chunk


class ThinkSplitter:
    """Split content into ``("think", text)`` and ``("text", text)`` pieces."""

    def __init__(self) -> None:
        self._buf = ""
        self.inside = False

    def feed(self, chunk: str) -> list[tuple[str, str]]:
        self._buf += chunk
        out: list[tuple[str, str]] = []
        while self._buf:
            tag = _CLOSE if self.inside else _OPEN
            at = self._buf.find(tag)
            if at >= 0:
                self._emit(out, self._buf[:at])
                self._buf = self._buf[at + len(tag) :]
                self.inside = not self.inside
                if self.inside:
                    out.append(("think_start", ""))
                else:
                    out.append(("think_end", ""))
                continue
            keep = _partial_suffix(self._buf, tag)
            self._emit(out, self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(out, self._buf)
        self._buf = ""
        return out

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if text:
            out.append(("think" if self.inside else "text", text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@attrs.define
class ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: str = ""


class ToolCallAssembler:
    """Collects ``delta.tool_calls`` fragments by ``index``."""

    def __init__(self) -> None:
        self._calls: dict[int, ToolCallParts] = {}

    def feed(self, fragments: Any) -> None:
        if not isinstance(fragments, list):
            raise StreamFormatError("tool_calls is not a list")
        for frag in fragments:
            if not isinstance(frag, dict):
                raise StreamFormatError("a tool call fragment is not an object")
            index = frag.get("index", len(self._calls))
            if not isinstance(index, int):
                raise StreamFormatError("a tool call index is not an integer")
            parts = self._calls.setdefault(index, ToolCallParts())
            if isinstance(frag.get("id"), str):
                parts.id = frag["id"]
            fn = frag.get("function") or {}
            if isinstance(fn.get("name"), str):
                parts.name += fn["name"]
            if isinstance(fn.get("arguments"), str):
                parts.arguments += fn["arguments"]

    def calls(self) -> list[ToolCallParts]:
        return [self._calls[i] for i in sorted(self._calls)]

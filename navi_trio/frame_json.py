"""JSON of client frames, without holding the event loop for a large one.

A WebSocket message may carry 50 MB of base64 images, and ``orjson.loads`` of such a
frame holds the event loop for ~130 ms (a worker thread would not help: orjson keeps the
GIL). Yet such a frame is a small JSON skeleton around a few long string literals. So a
frame over :data:`LARGE_FRAME` characters is read in steps with a checkpoint between them:
each string literal of :data:`LONG_STRING` characters or more is found with ``str.find``
(memchr speed), checked in chunks, cut out as one slice of the frame and replaced by a
placeholder; orjson then parses the skeleton, and the placeholders get their strings back.

:func:`loads` answers what ``orjson.loads`` would (the same value, ``JSONDecodeError`` for
what it refuses), so every check after it stays the same. What keeps the old single call:
a frame whose skeleton is itself large (not the shape of any message), and a long literal
that contains escapes (rare: base64 and ``data:`` URLs need none), which orjson decodes.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Final

import orjson
import trio

#: Frames up to this size are parsed in one call (orjson: ~5 ms per MB here).
LARGE_FRAME: Final = 256 * 1024
#: String literals this long are cut out of a large frame.
LONG_STRING: Final = 16 * 1024
#: A skeleton larger than this is no message: parsed in one call, as any frame was.
MAX_SKELETON: Final = 1024 * 1024
#: Characters checked between two checkpoints (~0.2 ms of work here).
CHUNK: Final = 64 * 1024
#: Characters searched (``str.find``, memchr speed) between two checkpoints.
WINDOW: Final = 1024 * 1024
#: Printable ASCII, allowed raw in a JSON string (everything but U+0000..U+001F).
_JSON_ASCII: Final = bytes(range(0x20, 0x80))
_CONTROL: Final = re.compile("[\x00-\x1f]")


async def loads(text: str, *, images_checked_later: bool = False) -> Any:
    """``orjson.loads(text)``, in steps for a large frame (see the module docstring).

    Raises ``orjson.JSONDecodeError`` as orjson would. With ``images_checked_later``, the
    long strings of a top-level ``"images"`` list are not checked for the control
    characters JSON forbids in a string: the caller checks them as base64, which allows
    none, so that pass over 50 MB is not made twice.

    Cancellation: a cancel between steps abandons the parse; nothing is kept.
    """
    if len(text) <= LARGE_FRAME:
        return orjson.loads(text)
    tag = f"\x00navi-long-string:{secrets.token_hex(8)}:"
    parts: list[str] = []
    cut: dict[str, tuple[int, int]] = {}
    kept = 0  # characters of the skeleton so far
    pos = 0  # text[:pos] is in parts, or cut out
    scan = 0  # where the next string literal may begin
    while True:
        quote = text.find('"', scan)
        if quote < 0:
            break
        end = await _plain_end(text, quote)
        if end == -1:
            break  # unterminated: orjson says so on the skeleton
        if end == -2:
            # An escape: this literal may not even end at the next quote. Rare for a long
            # one (base64 needs none), and short ones are what orjson does fast; a long one
            # takes the one-call path.
            end = _escaped_end(text, quote)
            if end < 0:
                await trio.lowlevel.checkpoint()
                return orjson.loads(text)
        if end - quote - 1 >= LONG_STRING:
            key = f"{tag}{len(cut)}"
            parts.append(text[pos:quote])
            parts.append(orjson.dumps(key).decode())
            kept += quote - pos + len(parts[-1])
            cut[key] = (quote + 1, end)
            pos = end + 1
            await trio.lowlevel.checkpoint()
        scan = end + 1
        if scan - pos + kept > MAX_SKELETON:
            await trio.lowlevel.checkpoint()
            return orjson.loads(text)
    parts.append(text[pos:])
    skeleton = "".join(parts)
    if len(skeleton) > MAX_SKELETON:
        await trio.lowlevel.checkpoint()
        return orjson.loads(text)
    data = orjson.loads(skeleton)
    if not cut:
        return data
    later = data.get("images") if images_checked_later and isinstance(data, dict) else None
    skip = {v for v in later if isinstance(v, str)} if isinstance(later, list) else set()
    for key, (start, end) in cut.items():
        if key not in skip and await _has_control(text, start, end):
            raise orjson.JSONDecodeError("control character in a string", text, start)
    return await _restore(data, cut, text)


async def _plain_end(text: str, quote: int) -> int:
    """Index of the quote that ends the literal opening at ``quote`` if no backslash comes
    first (-2 if one does, -1 if no quote ends it); a checkpoint after every :data:`WINDOW`."""
    at = quote + 1
    n = len(text)
    while at < n:
        stop = min(n, at + WINDOW)
        end = text.find('"', at, stop)
        if text.find("\\", at, stop if end < 0 else end) >= 0:
            return -2
        if end >= 0:
            return end
        at = stop
        await trio.lowlevel.checkpoint()
    return -1


_ESCAPED: Final = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)


def _escaped_end(text: str, quote: int) -> int:
    """Index of the quote closing the literal with escapes that opens at ``quote``, if
    it is short (under :data:`LONG_STRING`); else -1 (the caller parses in one call)."""
    limit = min(len(text), quote + 1 + LONG_STRING)
    m = _ESCAPED.match(text, quote + 1, limit)
    assert m is not None  # the pattern matches the empty string
    end = m.end()
    return end if end < limit and text[end] == '"' else -1


async def _has_control(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` holds a character JSON forbids raw in a string; a
    checkpoint after every :data:`CHUNK` characters."""
    for at in range(start, end, CHUNK):
        chunk = text[at : min(end, at + CHUNK)]
        if chunk.isascii():
            bad = bool(chunk.encode("ascii").translate(None, _JSON_ASCII))
        else:
            bad = _CONTROL.search(chunk) is not None
        await trio.lowlevel.checkpoint()
        if bad:
            return True
    return False


async def _restore(data: Any, cut: dict[str, tuple[int, int]], text: str) -> Any:
    """``data`` (fresh from orjson, so ours to change) with each placeholder replaced by
    its slice of ``text``, keys too, at any depth; without recursion (orjson allows
    deeper nesting than Python's stack)."""

    async def restored(value: str) -> str:
        span = cut[value]
        await trio.lowlevel.checkpoint()
        return text[span[0] : span[1]]

    if isinstance(data, str):
        return await restored(data) if data in cut else data
    stack: list[Any] = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, str):
                    if v in cut:
                        node[i] = await restored(v)
                elif isinstance(v, (list, dict)):
                    stack.append(v)
        elif isinstance(node, dict):
            for k in [k for k in node if k in cut]:
                node[await restored(k)] = node.pop(k)
            for k, v in node.items():
                if isinstance(v, str):
                    if v in cut:
                        node[k] = await restored(v)
                elif isinstance(v, (list, dict)):
                    stack.append(v)
    return data

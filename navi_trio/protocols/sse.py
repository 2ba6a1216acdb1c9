"""Server-Sent Events framing (sans-IO): one JSON object per ``data:`` line.

Both protocols use the same framing: ``data: <json>\\n\\n`` per part; a comment line
(``: ...``) is the keep-alive during silence, which every SSE parser skips.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

#: Sent when nothing else was sent for ``heartbeat_s``: keeps proxies and clients from
#: timing the stream out while a tool runs or the model thinks.
KEEP_ALIVE: Final = b": keep-alive\n\n"
#: The AI SDK's end of stream marker.
DONE: Final = b"data: [DONE]\n\n"


def data(part: dict[str, Any]) -> bytes:
    """One part as an SSE event. orjson never writes a raw newline (it escapes them), so
    the JSON always fits on the one ``data:`` line."""
    return b"data: " + orjson.dumps(part) + b"\n\n"


def encode_all(parts: list[dict[str, Any]]) -> bytes:
    return b"".join(data(p) for p in parts)

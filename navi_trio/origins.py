"""Which browser origins may use the server, and CORS for those that may.

A page on another site can open a WebSocket to any server the browser reaches (loopback
too) and the browser sends no token-less guard of its own: only the ``Origin`` header
says who is asking. So a request that carries one is served only if that origin is the
server's own (its ``host[:port]`` equals the request's ``Host``, which holds behind a TLS
proxy too) or is listed in ``NAVI_ALLOWED_ORIGINS`` (comma-separated, ``*`` for any).
Requests without ``Origin`` (curl, SDKs, the terminal client) are not browsers' and are
not affected. Allowed origins get CORS headers, and preflights (``OPTIONS``) an answer on
every route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import attrs

from .responses import RequestBody, send_json

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .asgi_types import Message, Receive, Scope, Send

    AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REFUSED: Final = "Origin not allowed"
PREFLIGHT_MAX_AGE_S: Final = 600
ALLOW_METHODS: Final = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
DEFAULT_ALLOW_HEADERS: Final = b"authorization, content-type"


def normalize(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, as browsers send it."""
    return origin.strip().rstrip("/").lower()


@attrs.frozen
class OriginPolicy:
    """Parsed ``NAVI_ALLOWED_ORIGINS``."""

    listed: frozenset[str] = frozenset()
    any_origin: bool = False

    @classmethod
    def parse(cls, raw: str) -> OriginPolicy:
        """Raises ``ValueError`` for an entry that is not ``*`` or ``scheme://host[:port]``."""
        listed: set[str] = set()
        any_origin = False
        for entry in (e.strip() for e in raw.split(",")):
            if not entry:
                continue
            if entry == "*":
                any_origin = True
                continue
            parts = urlsplit(entry)
            if not parts.scheme or not parts.netloc or parts.path.strip("/") or parts.query:
                raise ValueError(f"NAVI_ALLOWED_ORIGINS: {entry!r} is not an origin like https://host[:port]")
            listed.add(normalize(entry))
        return cls(frozenset(listed), any_origin)

    def allows(self, origin: str, host: str | None) -> bool:
        """Whether a request from ``origin`` that names ``host`` in its ``Host`` header may
        be served."""
        if self.any_origin or normalize(origin) in self.listed:
            return True
        return host is not None and is_own(origin, host)


def is_own(origin: str, host: str) -> bool:
    """The origin's ``host[:port]`` is the request's ``Host`` (case-insensitive)."""
    parts = urlsplit(origin.strip())
    return bool(parts.scheme) and parts.netloc.lower() == host.strip().lower()


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


async def serve_http(
    policy: OriginPolicy,
    app: AsgiApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    on_refused: Callable[[], None] | None = None,
) -> None:
    """Run ``app`` for an HTTP request, as the Origin rules say: refused with 403 (and
    ``on_refused`` told, for the metrics), a preflight answered here, an allowed origin's
    answers given CORS headers."""
    origin = header(scope, b"origin")
    if origin is None:
        await app(scope, receive, send)
        return
    if not policy.allows(origin, header(scope, b"host")):
        if on_refused is not None:
            on_refused()
        await send_json(send, 403, {"detail": REFUSED}, request_body=RequestBody(receive, scope))
        return
    cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin")]
    wanted = header(scope, b"access-control-request-method")
    if scope["method"] == "OPTIONS" and wanted is not None:
        asked = header(scope, b"access-control-request-headers")
        preflight = [
            *cors,
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", asked.encode("latin-1") if asked else DEFAULT_ALLOW_HEADERS),
            (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
        ]
        await send_json(send, 204, None, headers=preflight, request_body=RequestBody(receive, scope))
        return
    cors.append((b"access-control-expose-headers", b"*"))

    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *cors]}
        await send(message)

    await app(scope, receive, send_with_cors)

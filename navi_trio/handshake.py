"""The WebSocket handshake: from ``websocket.connect`` to a :class:`Connection` or a
refusal with the contract's close code (CONTRACT sections 3 and 6).

The handshake is accepted first so that refusals reach the client as close codes (4003
authentication or access, 4004 no such session, 1008 too many connections): a browser
never sees the HTTP status of a refused upgrade.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs

from .auth import AccessDenied, AuthError, authenticate, bearer_token, check_access
from .connection import CLOSE_DENIED, CLOSE_NOT_FOUND, CLOSE_POLICY, Connection
from .origins import REFUSED as ORIGIN_REFUSED
from .origins import OriginPolicy, header
from .store import find_session

if TYPE_CHECKING:
    from collections.abc import Callable

    from .agents.pacing import Pacer
    from .asgi_types import Receive, Scope, Send
    from .runs import RunRegistry
    from .settings import Settings

WS_PATH: Final = re.compile(r"^/ws/sessions/(?P<sid>[A-Za-z0-9_-]{1,64})$")


async def handshake(
    scope: Scope,
    receive: Receive,
    send: Send,
    registry: RunRegistry,
    settings: Settings,
    pacer: Pacer,
    origins: OriginPolicy,
    origin_refused: Callable[[], None],
) -> tuple[Connection, str | None, int | None] | None:
    """Accept the WebSocket, then refuse it with a close code or return its
    :class:`Connection` and resume point (``run_id``, ``after``)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    await send({"type": "websocket.accept"})

    async def close(code: int, reason: str) -> None:
        await send({"type": "websocket.close", "code": code, "reason": reason})

    origin = header(scope, b"origin")  # a browser's: a page of another site must not hijack
    if origin is not None and not origins.allows(origin, header(scope, b"host")):
        origin_refused()
        await close(CLOSE_DENIED, ORIGIN_REFUSED)
        return None

    try:
        user = await authenticate(registry.store, settings.auth, bearer_token(scope["headers"], _first(query, "token")))
    except AuthError as exc:
        registry.metrics.refused("auth")
        await close(CLOSE_DENIED, str(exc))
        return None
    m = WS_PATH.match(scope["path"])
    session = await find_session(registry.store, m["sid"]) if m else None
    if session is None:
        registry.metrics.refused("not_found")
        await close(CLOSE_NOT_FOUND, "Session not found")
        return None
    try:
        check_access(session, user)
    except (AuthError, AccessDenied) as exc:
        registry.metrics.refused("forbidden")
        await close(CLOSE_DENIED, str(exc))
        return None
    user_id = user.id if user else None
    if user_id is not None and registry.local.connections_of(user_id) >= settings.max_connections_per_user:
        registry.metrics.refused("limit")
        await close(CLOSE_POLICY, f"Too many connections (max {settings.max_connections_per_user} per user)")
        return None
    conn = Connection(
        registry,
        session.id,
        user_id,
        send,
        receive,
        heartbeat_s=settings.heartbeat_s,
        outbox_size=settings.outbox_size,
        uploads_root=settings.data_dir,
        session_owner=session.user_id,
        max_message_chars=settings.max_message_chars,
        pacer=pacer,
    )
    return conn, _first(query, "run_id"), _int_or_none(_first(query, "after"))


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return max(0, int(value))
    except ValueError:
        return None

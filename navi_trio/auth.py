"""Users, tokens and the one access rule (CONTRACT section 6).

Tokens are random (256 bits); the store keeps only their SHA-256, so a leaked database
gives no usable token. A random token needs no slow password hash; the final comparison
of digests is constant-time anyway. Nothing here logs or returns a token except
:func:`new_token`, whose result is printed once by ``navi-trio users add``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from .errors import NaviError

# A store record (``store/base.py``); named here too for the callers that take it from auth.
from .store.base import User as User

if TYPE_CHECKING:
    from .store.base import SessionRecord, Store

TOKEN_PREFIX: Final = "nv_"
_TOKEN_SHAPE: Final = re.compile(r"^nv_[A-Za-z0-9_-]{40,64}$")
_USER_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ROLES: Final = ("user", "admin")


class AuthError(NaviError):
    """Authentication failed: 401 over HTTP, close code 4003 on the WebSocket."""


class AccessDenied(NaviError):
    """Authenticated (or anonymous), but not allowed to reach this session."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def well_formed(token: str) -> bool:
    return bool(_TOKEN_SHAPE.match(token))


def valid_user_name(name: str) -> bool:
    return bool(_USER_NAME.match(name))


def bearer_token(headers: Iterable[tuple[bytes, bytes]], query_token: str | None = None) -> str | None:
    """The token a request carries: ``Authorization: Bearer <token>``, else ``?token=``.

    Returns None when there is none. Raises :class:`AuthError` for an Authorization
    header that is present but not a bearer token: a malformed credential is refused,
    never taken as anonymous.
    """
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise AuthError("Invalid token")
            return token
    return query_token


async def authenticate(store: Store, mode: str, token: str | None) -> User | None:
    """The caller: a user, or None (anonymous, allowed only in ``optional`` mode).

    Raises :class:`AuthError` for a missing token in ``required`` mode, and for a
    malformed, unknown or revoked token in any mode (never treated as anonymous).
    """
    if token is None:
        if mode == "required":
            raise AuthError("Authentication required")
        return None
    if not well_formed(token):
        raise AuthError("Invalid token")
    user = await store.user_for_token_hash(hash_token(token))
    if user is None or user.revoked:
        raise AuthError("Invalid token")
    return user


def check_access(session: SessionRecord, user: User | None) -> None:
    """The one access rule, for every route and the WebSocket: the owner or an admin;
    anonymous callers reach only owner-less sessions. Raises :class:`AccessDenied`
    (anonymous on an owned session: :class:`AuthError`, as the seed answered)."""
    if user is None:
        if session.user_id is not None:
            raise AuthError("Authentication required")
        return
    if user.is_admin or session.user_id == user.id:
        return
    raise AccessDenied("Access denied")

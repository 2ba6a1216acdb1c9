"""The Redis connection of a cluster, its key names, and the error it raises.

coredis is the client: it runs on anyio, so on Trio (redis-py's asyncio client does not),
and a blocking ``XREAD`` is cancellable like any Trio wait.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeAlias

import attrs
import coredis
import coredis.exceptions

from ..broker import BrokerUnavailable

Client: TypeAlias = "coredis.Redis[str]"

#: What a dropped or refused connection raises (coredis's and the OS's).
CONNECTION_ERRORS = (coredis.exceptions.ConnectionError, TimeoutError, OSError)


class RedisUnavailable(BrokerUnavailable):
    """Redis could not be reached or stopped answering; ``str(exc)`` names it for the user
    (never the URL: it may carry a password)."""


@attrs.frozen
class Keys:
    """Every key a cluster uses, under one prefix (the tests give each test its own)."""

    prefix: str = "navi"

    def lease(self, session_id: str) -> str:
        """The session's run: ``"<run_id> <owner>"`` while it is held."""
        return f"{self.prefix}:lease:{session_id}"

    def log(self, run_id: str) -> str:
        """The run's events, entry id ``0-<seq>``; ``1-0`` once its answer is saved."""
        return f"{self.prefix}:log:{run_id}"

    def queue(self, session_id: str) -> str:
        return f"{self.prefix}:queue:{session_id}"

    @property
    def bus(self) -> str:
        return f"{self.prefix}:bus"


@contextlib.asynccontextmanager
async def connect(url: str, *, timeout_s: float = 5.0) -> AsyncIterator[Client]:
    """A client of the Redis at ``url``, checked with a ``PING`` before it is handed out.

    Raises:
        RedisUnavailable: it does not answer (refused, timed out, wrong password).

    Cancellation: a cancel while connecting or pinging closes the pool and goes on.
    """
    client: Client = coredis.Redis.from_url(url, decode_responses=True, connect_timeout=timeout_s)
    try:
        async with client:
            try:
                await client.ping()
            except (*CONNECTION_ERRORS, coredis.exceptions.AuthenticationError) as exc:
                raise RedisUnavailable(f"Redis is unreachable: {_reason(exc)}") from None
            yield client
    except BaseExceptionGroup as group:
        # coredis's pool runs a task group: whatever the block (or the pool) raised comes
        # out wrapped; a lone exception is handed on as itself, so callers catch it plainly.
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        leaf = leaves[0]
        if isinstance(leaf, CONNECTION_ERRORS):
            raise RedisUnavailable(f"Redis is unreachable: {_reason(leaf)}") from None
        raise leaf from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _reason(exc: BaseException) -> str:
    """What went wrong, without the URL (coredis's messages name host and port only)."""
    return str(exc) or type(exc).__name__

"""The notices every process of a cluster hears, on one Redis Stream.

- ``run_started``: a session has a new run (its id, and the process that plays it), so
  every process's followers of that session subscribe to it before its first event is
  read (a follower reads the run's stream from seq 0: it misses nothing);
- ``stop``: stop the session's run with a reason (``user``, ``deleted``, ``shutdown``):
  the process playing it cancels it; the asker waits on the run's stream for the end;
- ``close``: close the followers of a session (a DELETE), with a code and reason.

One stream for the cluster, read by each process with one blocking ``XREAD`` from its own
cursor: a process hears every notice published after it began listening, in order. The
stream is bounded (``MAXLEN ~``); a process that is so far behind that its cursor was
trimmed away simply goes on from what is left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, cast

import coredis
import trio

from ..broker import NOTICE_KINDS, Notice
from .redis import Client, Keys

#: Entries the bus keeps (a process reads it continuously: this is only a bound).
BUS_MAXLEN: Final = 10_000


class Bus:
    """One process's end of the bus."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self._client = client
        self.key = keys.bus

    async def publish(self, notice: Notice) -> None:
        """Tell every process (this one too). Cancellation: one ``XADD``, sent or not."""
        await self.publish_in(self._client, notice)

    def publish_in(self, client: Any, notice: Notice) -> Any:
        """:meth:`publish` on ``client``: a pipeline queues it (returns its answer to
        await after the pipeline ran); the client sends it (returns the awaitable)."""
        if notice.kind not in NOTICE_KINDS:
            raise ValueError(f"unknown notice {notice.kind!r}")
        return client.xadd(
            self.key,
            notice.fields(),
            trim_strategy=coredis.PureToken.MAXLEN,
            trim_operator=coredis.PureToken.APPROXIMATELY,
            threshold=BUS_MAXLEN,
        )

    async def listen(  # noqa: ASYNC114
        self,
        on_notice: Callable[[Notice], None],
        *,
        block_ms: int = 5000,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``on_notice`` (synchronously, in order) for every notice published after
        this task has started (``nursery.start`` returns once its cursor is set).

        Raises whatever the client raises when Redis is lost (the caller decides about
        retrying; the cursor is the caller's to keep across a retry via :meth:`cursor`).

        Cancellation: the blocking ``XREAD`` is a plain wait; a cancel ends it.
        """
        cursor = await self.cursor()
        task_status.started()
        await self.follow(on_notice, cursor, block_ms=block_ms)

    async def cursor(self) -> str:
        """The id of the newest notice (``0-0`` if none): read from here to hear the rest."""
        top = await self._client.xrevrange(self.key, "+", "-", count=1)
        return cast(str, top[0].identifier) if top else "0-0"

    async def follow(self, on_notice: Callable[[Notice], None], cursor: str, *, block_ms: int = 5000) -> None:
        """Like :meth:`listen`, from ``cursor``; runs until cancelled."""
        await self.follow_ids(lambda notice, _id: on_notice(notice), cursor, block_ms=block_ms)

    async def follow_ids(
        self,
        on_notice: Callable[[Notice, str], None],
        cursor: str,
        *,
        block_ms: int = 5000,
    ) -> None:
        """:meth:`follow`, telling ``on_notice`` each notice's entry id too (the cursor to
        go on from after an outage)."""
        while True:
            got = await self._client.xread({self.key: cursor}, count=500, block=block_ms)
            if not got:
                continue
            for entry in got.get(self.key, ()):
                cursor = cast(str, entry.identifier)
                on_notice(Notice.from_fields(cast("dict[str, str]", dict(entry.field_values))), cursor)

"""Persistence: the :class:`Store` interface and its implementations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..settings import Settings
from .base import Answer, MessageRecord, NewRun, SessionRecord, Store, User, find_session
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = [
    "Answer",
    "MemoryStore",
    "MessageRecord",
    "NewRun",
    "SessionRecord",
    "SqliteStore",
    "Store",
    "User",
    "find_session",
    "open_store",
]


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """Open the configured store and close it on exit (also when cancelled).

    ``NAVI_DATABASE_URL`` chooses PostgreSQL (psycopg is imported only then); raises
    :class:`~navi_trio.errors.StoreError` naming the server if it cannot be used.
    """
    store: Store
    if settings.store == "memory":
        store = MemoryStore()
    elif settings.database_url:
        from .postgres import POOL_TIMEOUT_S, PostgresStore

        # A refused save must fail (and be retried) before the run's save bound cuts it off.
        store = await PostgresStore.open(
            settings.database_url,
            pool_timeout_s=min(POOL_TIMEOUT_S, settings.save_timeout_s / 2),
            data_dir=settings.data_dir,
        )
    else:
        store = await SqliteStore.open(settings.data_dir / "navi.sqlite3")
    try:
        yield store
    finally:
        store.close()

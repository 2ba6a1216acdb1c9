"""Persistence: the :class:`Store` interface and its implementations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..settings import Settings
from .base import Answer, MessageRecord, NewRun, SessionRecord, Store, find_session
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
    "find_session",
    "open_store",
]


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """Open the configured store and close it on exit (also when cancelled)."""
    store: Store
    if settings.store == "memory":
        store = MemoryStore()
    else:
        store = await SqliteStore.open(settings.data_dir / "navi.sqlite3")
    try:
        yield store
    finally:
        store.close()

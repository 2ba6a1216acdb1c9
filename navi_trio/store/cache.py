"""The in-memory cache of session records that the database stores keep.

A session record never changes once created, and deletes go through the store that
caches it, so a cached record is never stale while one process owns the database (the
run registry is per process too). A hit needs no worker thread: a stop or a WebSocket
handshake reaches its session with no scheduler pass (``Store.cached_session``).
"""

from __future__ import annotations

from typing import Final

from .base import SessionRecord

#: Session records kept (the oldest remembered is dropped first).
SESSION_CACHE_SIZE: Final = 10_000


class SessionCache:
    def __init__(self, size: int = SESSION_CACHE_SIZE) -> None:
        self._size = size
        self._records: dict[str, SessionRecord] = {}
        #: Sessions this process deleted: a read that raced the DELETE (it read the row
        #: before the delete was written) must not put one back (ids are never reused).
        self._deleted: dict[str, None] = {}

    def get(self, session_id: str) -> SessionRecord | None:
        return self._records.get(session_id)

    def remember(self, rec: SessionRecord) -> None:
        if rec.id in self._deleted:
            return
        if len(self._records) >= self._size:
            self._records.pop(next(iter(self._records)))
        self._records[rec.id] = rec

    def forget(self, session_id: str) -> None:
        """The session is being deleted: drop it, and never take it back."""
        self._records.pop(session_id, None)
        if len(self._deleted) >= self._size:
            self._deleted.pop(next(iter(self._deleted)))
        self._deleted[session_id] = None

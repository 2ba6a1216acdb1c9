"""The store interface: what the run lifecycle and the HTTP routes need, nothing more.

Every method is async and never blocks the event loop. A store raises
:class:`~navi_trio.errors.StoreError` for a storage fault, with a message that says
what failed.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio


def utc_now() -> str:
    """ISO 8601 UTC timestamp with milliseconds, as sessions and messages carry it."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@attrs.frozen
class User:
    id: str
    name: str
    role: str
    created_at: str
    revoked: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "created_at": self.created_at,
            "revoked": self.revoked,
        }


def digests_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two token digests (a store checks the hash it keeps)."""
    return hmac.compare_digest(a.encode(), b.encode())


@attrs.frozen
class SessionRecord:
    id: str
    title: str
    user_id: str | None
    created_at: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "user_id": self.user_id, "created_at": self.created_at}


@attrs.frozen
class MessageRecord:
    id: str
    role: str
    content: str
    created_at: str
    status: str
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "created_at": self.created_at,
            "status": self.status,
        }
        if self.role == "assistant":
            d["thinking"] = self.thinking or ""
            d["tool_calls"] = self.tool_calls or []
        return d


@attrs.frozen
class NewRun:
    """What is saved when a run starts: the user's message and the answer's id."""

    session_id: str
    user_message_id: str
    user_content: str
    answer_id: str
    created_at: str


@attrs.frozen
class Answer:
    """An assistant answer as saved when its run ends (or checkpointed while it runs)."""

    id: str
    session_id: str
    status: str  # complete | stopped | error | interrupted | running
    content: str
    thinking: str
    tool_calls: list[dict[str, Any]]


class Store(Protocol):
    async def create_session(self, session_id: str, title: str, user_id: str | None) -> SessionRecord: ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    def cached_session(self, session_id: str) -> SessionRecord | None:
        """The session's record if the store holds it in memory, else None (then ask
        ``get_session``). Synchronous on purpose: no scheduler pass, so a stop reaches its
        run at once even when the event loop is busy."""
        ...

    async def list_sessions(self, user_id: str | None, *, everyone: bool = False) -> list[SessionRecord]: ...

    async def delete_session(self, session_id: str) -> bool: ...

    async def list_messages(self, session_id: str) -> list[MessageRecord]: ...

    async def begin_run(self, new_run: NewRun) -> None:
        """Save the user's message and an answer with status ``running``."""

    async def begin_runs(self, new_runs: list[NewRun]) -> None:
        """:meth:`begin_run` for several runs, in one transaction."""

    async def save_answer(self, answer: Answer) -> None:
        """Write the answer's final state (its status, text, thinking and tool calls)."""

    async def checkpoint(self, answers: list[Answer]) -> None:
        """Write the text so far of answers still ``running``, all in one transaction.
        An answer that already has its final status is left alone."""

    async def recover_interrupted(self) -> int:
        """At start: every answer still ``running`` (the server died mid-run) becomes
        ``interrupted``, keeping the text saved so far. Returns how many."""

    async def load_context(self, session_id: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The saved summary and the messages after it (``id``, ``role``, ``content``),
        oldest first, without answers still running."""
        ...

    async def save_summary(self, session_id: str, summary: str, through_message_id: str) -> None: ...

    # -- uploads (the files are in each process's data dir, see ``uploads.py``) ---------
    async def keep_upload(self, session_id: str, name: str, body: bytes, stamp: int) -> None:
        """Keep an upload's bytes where every process reads them (PostgreSQL), replacing
        an older version; ``stamp`` is its version. Raises
        :class:`~navi_trio.errors.SessionGone` if the session is gone. A store of one
        process keeps nothing: the file in its data dir is the upload."""

    async def local_uploads(self, folder: Path, session_id: str, names: Collection[str] | None = None) -> Path:
        """This process's folder of the session's uploads, with every upload of the
        session (or only ``names``) that it lacks or holds in another version fetched into
        it (each written to a temp file, then renamed). ``folder`` is the session's folder
        as the process that checked the message named it (a queued message may be played
        by another process). A store of one process answers ``folder``: it holds them."""
        ...

    async def sweep_uploads(self) -> int:
        """Remove this process's copies of uploads whose session is gone (deleted on
        another process of a cluster); how many sessions' folders. A store of one process
        removes nothing: its own DELETEs remove the files."""
        ...

    # -- users and tokens (only hashes are stored) ---------------------------------------
    async def add_user(self, user: User, token_hash: str) -> None:
        """Raises :class:`~navi_trio.errors.StoreError` if the name is taken."""

    async def list_users(self) -> list[User]: ...

    async def revoke_user(self, name: str, revoked_at: str) -> User | None:
        """Revoke the user and every token of theirs; None if there is no such user."""

    async def user_for_token_hash(self, token_hash: str) -> User | None: ...

    async def revoked_user_ids(self) -> set[str]: ...

    async def health(self) -> str | None:
        """None while the store can serve; else what is wrong, in a sentence for the log
        (``/healthz`` answers 503 meanwhile). May ask the database (bounded)."""
        ...

    def close(self) -> None: ...


class UploadsInDataDir:
    """The uploads of a store of one process (SQLite, memory): the files in its data dir
    are the uploads, so there is nothing to keep or fetch."""

    async def keep_upload(self, session_id: str, name: str, body: bytes, stamp: int) -> None:
        """Nothing to keep: the file in the data dir is the upload (one process)."""
        await trio.lowlevel.checkpoint()

    async def local_uploads(self, folder: Path, session_id: str, names: Collection[str] | None = None) -> Path:
        """``folder``: the data dir holds every upload (one process)."""
        await trio.lowlevel.checkpoint()
        return folder

    async def sweep_uploads(self) -> int:
        await trio.lowlevel.checkpoint()
        return 0


async def find_session(store: Store, session_id: str) -> SessionRecord | None:
    """``store.get_session``, but a cached record answers with no scheduler pass: under
    load a pass can take a whole round of every busy connection, and a stop or a
    WebSocket handshake should not wait for it. Callers checkpoint soon after (a stop
    waits for its run, every route and handshake sends something)."""
    return store.cached_session(session_id) or await store.get_session(session_id)

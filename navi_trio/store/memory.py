"""An in-process store: the same interface as SQLite, kept in dicts.

For tests in virtual time (a store in a worker thread would let ``autojump_clock`` leap
ahead, see STYLE 4.5) and for throw-away demos (``NAVI_STORE=memory``).
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from ..errors import SessionGone, StoreError
from .base import Answer, MessageRecord, NewRun, SessionRecord, UploadsInDataDir, User, utc_now


class MemoryStore(UploadsInDataDir):
    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.messages: dict[str, list[MessageRecord]] = {}
        self.users: dict[str, User] = {}  # by name
        self.summaries: dict[str, tuple[str, str]] = {}  # session -> (summary, through id)
        self.tokens: dict[str, str] = {}  # token hash -> user id

    async def create_session(self, session_id: str, title: str, user_id: str | None) -> SessionRecord:
        await trio.lowlevel.checkpoint()
        rec = SessionRecord(session_id, title, user_id, utc_now())
        self.sessions[session_id] = rec
        self.messages[session_id] = []
        return rec

    async def get_session(self, session_id: str) -> SessionRecord | None:
        await trio.lowlevel.checkpoint()
        return self.sessions.get(session_id)

    def cached_session(self, session_id: str) -> SessionRecord | None:
        return self.sessions.get(session_id)

    async def list_sessions(self, user_id: str | None, *, everyone: bool = False) -> list[SessionRecord]:
        await trio.lowlevel.checkpoint()
        return [s for s in self.sessions.values() if everyone or s.user_id == user_id]

    async def delete_session(self, session_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        self.messages.pop(session_id, None)
        return self.sessions.pop(session_id, None) is not None

    async def list_messages(self, session_id: str) -> list[MessageRecord]:
        await trio.lowlevel.checkpoint()
        return [m for m in self.messages.get(session_id, []) if m.status != "running"]

    async def begin_run(self, new_run: NewRun) -> None:
        await self.begin_runs([new_run])

    async def begin_runs(self, new_runs: list[NewRun]) -> None:
        """All or nothing, as the database's transaction; a deleted session fails it as
        the database's foreign key would."""
        await trio.lowlevel.checkpoint()
        if any(new_run.session_id not in self.sessions for new_run in new_runs):
            raise SessionGone("the session was deleted before saving the user's message")
        for new_run in new_runs:
            msgs = self.messages.setdefault(new_run.session_id, [])
            msgs.append(
                MessageRecord(new_run.user_message_id, "user", new_run.user_content, new_run.created_at, "complete")
            )
            msgs.append(MessageRecord(new_run.answer_id, "assistant", "", new_run.created_at, "running", "", []))

    async def save_answer(self, answer: Answer) -> None:
        await trio.lowlevel.checkpoint()
        self._update(answer, only_running=False)

    def _update(self, answer: Answer, *, only_running: bool) -> None:
        msgs = self.messages.get(answer.session_id)
        if msgs is None:  # the session was deleted meanwhile
            return
        for i, m in enumerate(msgs):
            if m.id == answer.id:
                if only_running and m.status != "running":
                    return
                status = m.status if only_running else answer.status
                msgs[i] = MessageRecord(
                    m.id, "assistant", answer.content, m.created_at, status, answer.thinking, answer.tool_calls
                )
                return

    async def checkpoint(self, answers: list[Answer]) -> None:
        await trio.lowlevel.checkpoint()
        for answer in answers:
            self._update(answer, only_running=True)

    async def recover_interrupted(self) -> int:
        await trio.lowlevel.checkpoint()
        count = 0
        for msgs in self.messages.values():
            for i, m in enumerate(msgs):
                if m.status == "running":
                    msgs[i] = attrs.evolve(m, status="interrupted")
                    count += 1
        return count

    async def load_context(self, session_id: str) -> tuple[str | None, list[dict[str, Any]]]:
        await trio.lowlevel.checkpoint()
        msgs = [m for m in self.messages.get(session_id, []) if m.status != "running"]
        summary, through = self.summaries.get(session_id, (None, None))
        if through is not None:
            ids = [m.id for m in msgs]
            if through in ids:
                msgs = msgs[ids.index(through) + 1 :]
        return summary, [{"id": m.id, "role": m.role, "content": m.content} for m in msgs]

    async def save_summary(self, session_id: str, summary: str, through_message_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.summaries[session_id] = (summary, through_message_id)

    async def add_user(self, user: User, token_hash: str) -> None:
        await trio.lowlevel.checkpoint()
        if user.name in self.users:
            raise StoreError(f"a user named {user.name!r} exists already")
        self.users[user.name] = user
        self.tokens[token_hash] = user.id

    async def list_users(self) -> list[User]:
        await trio.lowlevel.checkpoint()
        return sorted(self.users.values(), key=lambda u: (u.created_at, u.name))

    async def revoke_user(self, name: str, revoked_at: str) -> User | None:
        await trio.lowlevel.checkpoint()
        user = self.users.get(name)
        if user is None:
            return None
        self.users[name] = attrs.evolve(user, revoked=True)
        return self.users[name]

    async def user_for_token_hash(self, token_hash: str) -> User | None:
        await trio.lowlevel.checkpoint()
        user_id = self.tokens.get(token_hash)
        return next((u for u in self.users.values() if u.id == user_id), None)

    async def revoked_user_ids(self) -> set[str]:
        await trio.lowlevel.checkpoint()
        return {u.id for u in self.users.values() if u.revoked}

    async def health(self) -> str | None:
        await trio.lowlevel.checkpoint()
        return None

    def close(self) -> None:
        pass

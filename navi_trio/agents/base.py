"""The agent interface: an agent gets an explicit :class:`RunContext` and emits through it.

Public as ``navi_trio.Agent`` and ``navi_trio.RunContext``; served with ``--agent
module:factory``; written about for agent authors in docs/agents.md, and checked by
``navi_trio.testing.check_agent``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class RunContext(Protocol):
    """What a run gives its agent: the request, and the only way to emit events.

    Each ``emit_*`` call is synchronous: the event is in the run's log (with its seq) and
    offered to every subscriber before the call returns.
    """

    @property
    def session_id(self) -> str: ...

    @property
    def user_id(self) -> str | None: ...

    @property
    def content(self) -> str:
        """What the agent answers (notes for images and files appended)."""
        ...

    @property
    def user_message(self) -> str:
        """The user's message exactly as sent (``content`` without the notes)."""
        ...

    @property
    def images(self) -> list[str]: ...

    @property
    def upload_dir(self) -> Path | None:
        """This session's upload folder, for tools that read the user's files."""
        ...

    @property
    def history(self) -> list[dict[str, Any]]:
        """Earlier messages (``id``, ``role``, ``content``) after the saved summary, oldest
        first; loaded only for agents with ``wants_history = True``."""
        ...

    @property
    def summary(self) -> str | None:
        """The saved summary of turns older than ``history``, if any."""
        ...

    async def save_summary(self, summary: str, through_message_id: str) -> None:
        """Save a summary of the history up to and including that message."""
        ...

    def emit_thinking(self, delta: str) -> None: ...

    def emit_thinking_end(self) -> None: ...

    def emit_text(self, delta: str) -> None: ...

    def emit_tool_started(self, tool: str, args: Any, *, is_subagent: bool = False) -> None: ...

    def emit_tool_call(self, result: str, *, success: bool) -> None: ...

    def emit_context_compressed(self) -> None: ...


class Agent(Protocol):
    """Anything with ``async def play(self, ctx)``: no base class to inherit. An agent that
    wants ``ctx.history`` and ``ctx.summary`` loaded sets ``wants_history = True``. It may
    also have ``check_message(user_message: str) -> None``, called before a run starts for
    a message: raise :class:`~navi_trio.errors.BadClientMessage` to refuse it with that
    text (the scripted agent refuses scripts over its bounds there), and no run starts."""

    async def play(self, ctx: RunContext) -> None:
        """Produce one answer through ``ctx``.

        Cancellation: a stop cancels this call at its next checkpoint; the run closes what
        was left open (a running tool, open thinking) and writes the terminal event, so an
        agent needs no cleanup of its own for the protocol's sake. It must let
        ``Cancelled`` through, keep shielded waits within the stop budget, start tasks only
        in nurseries it opens, and close the streams it opens (``async with``); a worker
        thread is started with ``abandon_on_cancel=True``.

        Error handling: raise :class:`~navi_trio.errors.AgentError` for a failure whose
        message the user should see; any other exception becomes a generic ``error``.
        """
        ...

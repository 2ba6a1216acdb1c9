"""Domain exceptions. They are turned into the contract's messages at the edge
(``http.py`` and ``connection.py``), never earlier."""

from __future__ import annotations


class NaviError(Exception):
    """Base class of every navi-trio domain error."""


class BadClientMessage(NaviError):
    """A WebSocket client message the contract refuses; ``str(exc)`` is the wire message."""


class ScriptTooLarge(BadClientMessage):
    """A script over one of the scripted agent's bounds; ``str(exc)`` names the bound."""


class RunAlreadyActive(NaviError):
    """A session already has an active run and the client asked to ``reject``."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id


class QueueFull(NaviError):
    """The per-session ``enqueue`` queue is at its bound."""


class ShuttingDown(NaviError):
    """The server is draining and takes no new runs."""


class AgentError(NaviError):
    """The agent failed in a way it chose to report; ``str(exc)`` reaches the user."""


class StoreError(NaviError):
    """The store could not do what was asked (locked, read-only, disk full, ...)."""


class SessionGone(StoreError):
    """The session was deleted: a run or upload racing its DELETE finds it gone."""


class GrammarError(NaviError):
    """Code tried to append an event the run grammar does not allow (a bug, not input)."""


class LifecycleError(NaviError):
    """Code tried a run-state transition the lifecycle does not allow (a bug, not input)."""

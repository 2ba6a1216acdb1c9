"""Agents: what produces a run's events. They never touch the WebSocket or the store."""

from __future__ import annotations

from .base import Agent, RunContext
from .scripted import ScriptedAgent

__all__ = ["Agent", "RunContext", "ScriptedAgent", "make_agent"]


def make_agent(name: str) -> Agent:
    """The agent configured by ``--agent`` / ``NAVI_AGENT``. Raises ``ValueError``."""
    if name == "scripted":
        return ScriptedAgent()
    raise ValueError(f"unknown agent {name!r}")

"""Agents: what produces a run's events. They never touch the WebSocket or the store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Agent, RunContext
from .scripted import ScriptBounds, ScriptedAgent

if TYPE_CHECKING:
    from ..settings import Settings
    from .pacing import Pacer

__all__ = ["Agent", "RunContext", "ScriptBounds", "ScriptedAgent", "make_agent"]


def make_agent(settings: Settings, pacer: Pacer | None = None) -> Agent:
    """The agent configured by ``--agent`` / ``NAVI_AGENT``. Raises ``ValueError``."""
    if settings.agent == "scripted":
        bounds = ScriptBounds(settings.script_max_events, settings.script_max_chars, settings.script_max_seconds)
        return ScriptedAgent(pacer, bounds=bounds)
    if settings.agent == "openai":
        from .openai import OpenAIAgent, OpenAISettings

        return OpenAIAgent(OpenAISettings.from_settings(settings))
    raise ValueError(f"unknown agent {settings.agent!r}")

"""Agents: what produces a run's events. They never touch the WebSocket or the store."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from .base import Agent, RunContext
from .scripted import ScriptBounds, ScriptedAgent

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..settings import Settings
    from .pacing import Pacer

__all__ = ["Agent", "RunContext", "ScriptBounds", "ScriptedAgent", "load_factory", "make_agent"]


def make_agent(settings: Settings, pacer: Pacer | None = None, metrics: Metrics | None = None) -> Agent:
    """The agent configured by ``--agent`` / ``NAVI_AGENT``: ``scripted``, ``openai`` (its
    model calls counted in ``metrics``), or ``module:factory``, a user's agent
    (``factory()`` returns it). Raises ``ValueError`` with a message for the startup error."""
    if settings.agent == "scripted":
        bounds = ScriptBounds(settings.script_max_events, settings.script_max_chars, settings.script_max_seconds)
        return ScriptedAgent(pacer, bounds=bounds)
    if settings.agent == "openai":
        from .openai import OpenAIAgent, OpenAISettings

        return OpenAIAgent(OpenAISettings.from_settings(settings), metrics)
    if ":" in settings.agent:
        factory = load_factory(settings.agent)
        try:
            agent = factory()
        except Exception as exc:
            raise ValueError(f"--agent {settings.agent}: the factory failed: {type(exc).__name__}: {exc}") from exc
        if not callable(getattr(agent, "play", None)):
            raise ValueError(f"--agent {settings.agent}: the factory returned {agent!r}, which has no play(ctx)")
        return cast("Agent", agent)
    raise ValueError(f"unknown agent {settings.agent!r}")


def load_factory(spec: str) -> Callable[[], object]:
    """Import ``module:factory`` (``factory`` may be dotted: ``module:Class.create``) and
    return the callable. Raises ``ValueError`` naming what could not be found."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--agent {spec}: expected module:factory")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or whatever the module raised at import
        raise ValueError(f"--agent {spec}: cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"--agent {spec}: {module_name} has no {attr}") from None
    if not callable(obj):
        raise ValueError(f"--agent {spec}: {attr} is not callable")
    return cast("Callable[[], object]", obj)

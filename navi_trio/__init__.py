"""navi-trio: a cancellation-correct streaming backend for LLM-agent chat on Trio.

The public names for writing an agent are here: :class:`Agent` (``async def play(self,
ctx)``), the :class:`RunContext` it is given, and :class:`AgentError` for a failure the
user should see. ``navi_trio.testing`` proves an agent cancellation-correct.
"""

from __future__ import annotations

from .agents.base import Agent as Agent
from .agents.base import RunContext as RunContext
from .errors import AgentError as AgentError

__version__ = "0.1.0"

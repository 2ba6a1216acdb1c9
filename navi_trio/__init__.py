"""navi-trio: a cancellation-correct streaming backend for LLM-agent chat on Trio."""

from __future__ import annotations

__version__ = "0.1.0"

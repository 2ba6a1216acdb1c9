"""Prove an agent cancellation-correct, in virtual time, with no server (CONTRACT 11).

``await check_agent(agent, message)`` plays the agent once to count its emits and task
steps, then cuts it at every one of them by every path (stop, delete, interrupt, every
client gone, shutdown, a store fault) and checks each case. The pytest plugin
(``navi_trio.testing.pytest_plugin``, registered as a ``pytest11`` entry point) gives the
same as fixtures, and :mod:`navi_trio.testing.fake_openai` is a model server to script.
"""

from __future__ import annotations

from .kit import check_agent as check_agent
from .model import CHECKS as CHECKS
from .model import CUT_PATHS as CUT_PATHS
from .model import AgentCheckFailed as AgentCheckFailed
from .model import Case as Case
from .model import CutPath as CutPath
from .model import CutPoint as CutPoint
from .model import Report as Report
from .model import Violation as Violation

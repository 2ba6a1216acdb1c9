"""The pytest plugin of ``navi_trio.testing`` (registered as a ``pytest11`` entry point, so
it loads wherever navi-trio is installed). Async fixtures need a trio test runner:
pytest-trio (``trio_mode = true``, or ``@pytest.mark.trio``).

Fixtures:
    check_agent: :func:`navi_trio.testing.check_agent` that raises for violations::

        async def test_my_agent(check_agent, autojump_clock):
            report = await check_agent(MyAgent(), "hello")   # raises AgentCheckFailed
            assert report.cases

    fake_model: a :class:`~navi_trio.testing.fake_openai.FakeOpenAI` serving on
        127.0.0.1 for the test; script it (``fake_model.script(...)`` or
        ``fake_model.fallback``) and pass ``model=fake_model`` to ``check_agent``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from .fake_openai import FakeOpenAI, open_fake_openai
from .kit import check_agent as _check_agent
from .model import Report


@pytest.fixture
def check_agent() -> Callable[..., Awaitable[Report]]:
    """``await check_agent(agent, message, **options)``: the report, once every case
    passed; :class:`~navi_trio.testing.AgentCheckFailed` (an ``AssertionError``) with
    the violations otherwise. Options as :func:`navi_trio.testing.check_agent`."""

    async def check(agent: Any, message: str, **options: Any) -> Report:
        report = await _check_agent(agent, message, **options)
        report.raise_for_violations()
        return report

    return check


@pytest.fixture
async def fake_model() -> AsyncIterator[FakeOpenAI]:
    """A fake OpenAI-compatible model server on 127.0.0.1:0 (``fake_model.base_url``)."""
    async with open_fake_openai() as fake:
        yield fake

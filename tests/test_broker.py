"""The broker seam: the in-process broker passes the conformance suite, and nothing
above the seam names an implementation."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from navi_trio.broker import Broker, InProcessBroker

from .broker_conformance import CHECKS, BrokerFactory, check_broker

PACKAGE = Path(__file__).resolve().parent.parent / "navi_trio"


@asynccontextmanager
async def in_process() -> AsyncIterator[Broker]:
    yield InProcessBroker()


async def test_in_process_broker_passes_the_conformance_suite() -> None:
    await check_broker(in_process)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_in_process_broker_each_part(check: object) -> None:
    """The same checks one by one, so a failure names the part of the contract."""
    assert callable(check)
    make: BrokerFactory = in_process
    await check(make)


def test_only_the_composition_roots_name_the_implementation() -> None:
    """Above the seam every module talks to a ``Broker``; only the lifespan (and the
    agent-testing kit's stage, which builds a registry of its own) make one."""
    naming = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if re.search(r"\bInProcessBroker\b", path.read_text()) and path.name != "broker.py"
    }
    assert naming == {"app.py", "testing/_stage.py"}

"""The broker seam: the in-process broker and the Redis broker (on a real redis-server)
pass the same conformance suite, and nothing above the seam names an implementation."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from navi_trio.broker import Broker, InProcessBroker
from navi_trio.cluster.broker import RedisBroker
from navi_trio.cluster.redis import Keys, connect

from .broker_conformance import CHECKS, CROSS_PROCESS_CHECKS, BrokerFactory, PairFactory, check_broker
from .redis_server import RedisServer

PACKAGE = Path(__file__).resolve().parent.parent / "navi_trio"


@asynccontextmanager
async def in_process() -> AsyncIterator[Broker]:
    yield InProcessBroker()


def redis_brokers(server: RedisServer, keys: Keys) -> tuple[BrokerFactory, PairFactory]:
    @asynccontextmanager
    async def one() -> AsyncIterator[Broker]:
        async with connect(server.url) as client:
            yield RedisBroker(client, keys, "A", lease_s=10.0, max_run_events=1000)

    @asynccontextmanager
    async def two() -> AsyncIterator[tuple[Broker, Broker]]:
        async with connect(server.url) as ca, connect(server.url) as cb:
            yield (
                RedisBroker(ca, keys, "A", lease_s=10.0, max_run_events=1000),
                RedisBroker(cb, keys, "B", lease_s=10.0, max_run_events=1000),
            )

    return one, two


async def test_in_process_broker_passes_the_conformance_suite() -> None:
    await check_broker(in_process)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_in_process_broker_each_part(check: Callable[[BrokerFactory], Awaitable[None]]) -> None:
    """The checks one by one, so a failure names the part of the contract."""
    await check(in_process)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_redis_broker_each_part(
    check: Callable[[BrokerFactory], Awaitable[None]], redis_server: RedisServer, redis_keys: Keys
) -> None:
    one, _ = redis_brokers(redis_server, redis_keys)
    await check(one)


@pytest.mark.parametrize("check", CROSS_PROCESS_CHECKS, ids=lambda c: c.__name__)
async def test_redis_broker_across_processes(
    check: Callable[[PairFactory], Awaitable[None]], redis_server: RedisServer, redis_keys: Keys
) -> None:
    _, two = redis_brokers(redis_server, redis_keys)
    await check(two)


def test_only_the_composition_roots_name_an_implementation() -> None:
    """Above the seam every module talks to a ``Broker``; only the lifespan (and the
    agent-testing kit's stage, which builds a registry of its own) make one, and the
    Redis broker is named only inside ``cluster/``."""

    def naming(name: str) -> set[str]:
        return {
            path.relative_to(PACKAGE).as_posix()
            for path in PACKAGE.rglob("*.py")
            if re.search(rf"\b{name}\b", path.read_text())
            and path.name != "broker.py"
            and not path.is_relative_to(PACKAGE / "cluster")
        }

    assert naming("InProcessBroker") == {"app.py", "testing/_stage.py"}
    assert naming("RedisBroker") == set()
    assert naming("open_redis_broker") == {"app.py"}

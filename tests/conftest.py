from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from navi_trio.cluster.redis import Client, Keys, connect
from navi_trio.store import Store

from .helpers import Server, open_server
from .pg import PgServer, opened_store, running_postgres, store_target
from .redis_server import RedisServer, running_redis


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A real hypercorn server (memory store) on 127.0.0.1:0; see ``helpers.open_server``."""
    async with open_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """A real PostgreSQL server for the whole test session (see ``tests/pg.py``); it fails,
    never skips, when PostgreSQL is not installed."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def database_url(postgres: PgServer) -> Iterator[str]:
    """The URL (with its password) of a new, empty PostgreSQL database for one test."""
    with postgres.database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres", "memory"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """``"sqlite"``, ``"memory"``, or the URL of a new PostgreSQL database."""
    return store_target(request)


@pytest.fixture
async def any_store(store_kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    """Each store, open for the test: SQLite, PostgreSQL (a real server) and in memory."""
    async with opened_store(store_kind, tmp_path) as s:
        yield s


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event of the test, with its bound context (nothing printed)."""
    events: list[dict[str, Any]] = []

    def collect(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        events.append(dict(event_dict))
        raise structlog.DropEvent

    old = structlog.get_config()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, collect],
        cache_logger_on_first_use=False,
    )
    try:
        yield events
    finally:
        structlog.configure(**old)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole test session (see ``tests/redis_server.py``); it
    fails, never skips, when redis-server is not installed."""
    with running_redis() as server:
        yield server


@pytest.fixture
def redis_keys() -> Keys:
    """Key names of a test's own (a prefix nobody else uses): tests share one redis-server."""
    return Keys(prefix=f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Client]:
    """A client of the test session's redis-server."""
    async with connect(redis_server.url) as client:
        yield client

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .helpers import Server, open_server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A real hypercorn server (memory store) on 127.0.0.1:0; see ``helpers.open_server``."""
    async with open_server() as srv:
        yield srv

"""Redis lost while runs stream, and back (``navi_trio/cluster/node.py``), on a real
redis-server of the test's own that it stops and starts again."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from navi_trio.cluster.redis import Keys
from navi_trio.events import check_grammar
from navi_trio.lifecycle import How, Run

from .broker_conformance import RecordingOutbox, request, run_events
from .redis_server import RedisServer, running_redis
from .test_cluster_node import node

# coredis leaves the anyio memory streams of a connection attempt that failed unclosed
# (collected later with a ResourceWarning): its own leak, not ours, and only on failures.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


async def wait_for(predicate: object, what: str, timeout_s: float = 10.0) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110  # polls what another process (redis-server) changes
            await trio.sleep(0.01)


async def test_a_lost_redis_ends_the_run_with_an_error_naming_it_and_the_node_recovers(
    own_redis: RedisServer, redis_keys: Keys
) -> None:
    async with node(own_redis, redis_keys, "A") as (a, _), node(own_redis, redis_keys, "B") as (b, b_rec):
        run = Run(request("s"))
        local = RecordingOutbox()
        run.subscribe(local)
        assert await a.claim("s", run.id)
        await a.own(run)
        run.start()
        run.play()
        run.emit_text("before ")
        await trio.testing.wait_all_tasks_blocked()
        own_redis.stop()
        await wait_for(lambda: not a.healthy and not b.healthy, "both nodes see Redis lost")
        run.emit_text("during")  # the writer's append fails: the run is failed
        await wait_for(lambda: run.failure is not None, "the run failed")
        assert run.failure is not None and "Redis" in run.failure
        with run.cancel_scope:
            await trio.lowlevel.checkpoint()  # the run's scope catches the fail
        run.end(How.CANCELLED)
        with contextlib.suppress(Exception):
            assert await a.finish(run) is None
        run.settle()
        frames = local.drain()
        check_grammar(run_events(frames))
        assert frames[-1]["type"] == "error" and "Redis" in frames[-1]["message"]

        own_redis.start()
        await wait_for(lambda: a.healthy and b.healthy, "both nodes see Redis back")
        again = Run(request("s"))  # the old lease was lost with the data: the session is free
        assert await a.claim("s", again.id)
        await a.own(again)
        await wait_for(lambda: any(n.run_id == again.id for n in b_rec.notices), "B hears the new run")
    gc.collect()  # coredis's leaked streams warn now, under this module's filter, not in a later test

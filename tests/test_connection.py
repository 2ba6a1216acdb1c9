"""The connection's receiver never waits on a run (it always drains ``receive()``)."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from navi_trio.agents.scripted import ScriptedAgent
from navi_trio.broker import InProcessBroker
from navi_trio.connection import Connection
from navi_trio.runs import RunRegistry
from navi_trio.store.base import Answer
from navi_trio.store.memory import MemoryStore

from .helpers import message, script

SAVE_S = 10.0


class SlowSaveStore(MemoryStore):
    """A store whose final save takes ``SAVE_S`` (virtual) seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.saved_at: list[float] = []

    async def save_answer(self, answer: Answer) -> None:
        await trio.sleep(SAVE_S)
        self.saved_at.append(trio.current_time())
        await super().save_answer(answer)


async def test_a_disconnect_during_a_stop_is_seen_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """A stop waits for its run's save, but in a task of its own: the receiver goes on
    draining, so the client leaving ends the connection before that save is done."""
    store = SlowSaveStore()
    await store.create_session("s", "t", None)
    to_app_send, to_app = trio.open_memory_channel[dict[str, Any]](10)
    from_app, from_app_recv = trio.open_memory_channel[dict[str, Any]](100)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            registry = RunRegistry(nursery, store, ScriptedAgent(), broker=InProcessBroker(), save_timeout_s=30.0)
            conn = Connection(registry, "s", None, from_app.send, to_app.receive, heartbeat_s=100.0, outbox_size=64)
            closed = trio.Event()

            async def serve() -> None:
                await conn.serve()
                closed.set()

            nursery.start_soon(serve)

            async def recv() -> dict[str, Any]:
                msg = await from_app_recv.receive()
                frame: dict[str, Any] = json.loads(msg["text"])
                return frame

            assert (await recv())["type"] == "session_sync"
            await to_app_send.send({"type": "websocket.receive", "text": message(script({"sleep": 100}))})
            assert (await recv())["type"] == "stream_start"
            run = registry.active("s")
            assert run is not None
            t_stop = trio.current_time()
            await to_app_send.send({"type": "websocket.receive", "text": json.dumps({"type": "stop"})})
            await to_app_send.send({"type": "websocket.disconnect", "code": 1000})
            await closed.wait()
            assert trio.current_time() - t_stop < SAVE_S  # the receiver did not wait for the save
            assert not run.done.is_set()
            await run.done.wait()  # the run still ends and saves, on its own
            assert store.saved_at == [t_stop + SAVE_S]
            assert run.status == "stopped"
            assert registry.local.follower_count == 0

"""The kit's one seam onto navi-trio's run machinery: a :class:`Stage` is a RunRegistry
with a memory store and no HTTP server, and the ways a run can be cut.

Everything the kit needs from the engine goes through here (``RunRegistry(...)``,
``submit``, ``stop``, ``forget_session``, ``drain``, ``serve_checkpoints``, ``follow``
and ``Run.subscribe`` with an outbox), so a change to those internals is mended in this
one module.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ..broker import InProcessBroker
from ..errors import StoreError
from ..events import Event
from ..fanout import Subscriber
from ..lifecycle import Run, RunRequest
from ..runs import RunRegistry
from ..store.base import Answer, NewRun
from ..store.memory import MemoryStore
from .model import CutPath

if TYPE_CHECKING:
    from ..agents.base import Agent

SESSION: Final = "kit-session"
#: Checkpoint interval of the stage: short, so a store fault lands soon (virtual time).
CHECKPOINT_S: Final = 0.05
#: Status each terminal event saves the answer with (CONTRACT section 2).
STATUS_FOR = {"stream_end": "complete", "error": "error"}
STATUS_FOR_STOP = {"user": "stopped", "deleted": "stopped", "shutdown": "interrupted"}


class FaultyStore(MemoryStore):
    """The memory store, with a switch that makes every write fail as a full disk would."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def _check(self) -> None:
        if self.failing:
            raise StoreError("disk full (a fault injected by navi_trio.testing)")

    async def begin_runs(self, new_runs: list[NewRun]) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        await super().begin_runs(new_runs)

    async def save_answer(self, answer: Answer) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        await super().save_answer(answer)

    async def checkpoint(self, answers: list[Answer]) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        await super().checkpoint(answers)


@attrs.define(eq=False)
class Delivered:
    """One frame a client received: its decoded object and the (virtual) time it came."""

    obj: dict[str, Any]
    t: float


class Client:
    """A client following the session: an outbox that never fills (the kit checks what a
    reader that keeps up sees) and a list of what it got, per run."""

    def __init__(self, on_run: Callable[[Run], None]) -> None:
        self.lagging: list[Subscriber] = []
        self.frames: dict[str, list[Delivered]] = {}
        self.subs: list[Subscriber] = []
        self.gone = False
        self._on_run = on_run

    # Follower
    @property
    def user_id(self) -> str | None:
        return None

    def run_started(self, run: Run) -> None:
        self.frames[run.id] = []
        self.subs.append(run.subscribe(_RunOutbox(self, run.id)))
        self._on_run(run)

    def request_close(self, code: int, reason: str) -> None:
        self.gone = True


class _RunOutbox:
    def __init__(self, client: Client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.lagging = client.lagging

    def fall_behind(self, sub: Subscriber) -> None:
        self.lagging.append(sub)

    @property
    def behind(self) -> bool:
        return bool(self.lagging)

    def offer(self, frame: Event | str) -> bool:
        if self.client.gone:
            return False
        wire = frame.wire if isinstance(frame, Event) else frame
        self.client.frames[self.run_id].append(Delivered(json.loads(wire), trio.current_time()))
        return True

    def wake(self) -> None:
        pass


class Stage:
    """One case: a registry, its store, one client, and the runs the case started."""

    def __init__(self, nursery: trio.Nursery, agent: Agent, save_timeout_s: float) -> None:
        self.store = FaultyStore()
        self.registry = RunRegistry(
            nursery, self.store, agent, broker=InProcessBroker(), save_timeout_s=save_timeout_s, max_queued_runs=2
        )
        self.runs: list[Run] = []
        self.client = Client(self._run_started)
        self.registry.follow(SESSION, self.client)
        self._nursery = nursery
        self._drain = trio.Event()
        self._shutdown_requested = False
        self.deleted = False

    async def open_session(self) -> None:
        await self.store.create_session(SESSION, "navi_trio.testing", None)

    def submit(self, message: str) -> Run:
        """Start the first run of the case (synchronous, as the engine's submit is)."""
        run = self.registry.submit(RunRequest(SESSION, None, message, message))
        assert run is not None
        return run

    @property
    def first(self) -> Run:
        return self.runs[0]

    def cancel_requested(self, run: Run) -> bool:
        return run.cancel_scope.cancel_called

    def finished(self, run: Run) -> bool:
        return run.log.finished

    def cut(self, path: CutPath, message: str) -> None:
        """Apply a cut now. Synchronous: called between two task steps (or inside an
        emit), so nothing of the agent runs between the decision and the cut."""
        if path == "stop":
            self.registry.stop(SESSION, "user")
        elif path == "delete":
            self.registry.forget_session(SESSION)
            self.registry.stop(SESSION, "deleted")
            self.deleted = True
        elif path == "interrupt":
            self.registry.submit(RunRequest(SESSION, None, message, message), "interrupt")
        elif path == "clients_gone":
            self.client.gone = True
            self.registry.unfollow(SESSION, self.client)
            for sub in self.client.subs:
                sub.run.unsubscribe(sub)
        elif path == "shutdown":
            self._drain.set()
        elif path == "store_fault":
            self.store.failing = True

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The server's background work for the case: checkpoints, and a drain when the
        shutdown cut asks for one. Runs until the stage's nursery is cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.registry.serve_checkpoints, CHECKPOINT_S)
            task_status.started()
            await self._drain.wait()
            await self.registry.drain(0.0)

    def _run_started(self, run: Run) -> None:
        self.runs.append(run)
        if len(self.runs) > 1:  # an interrupting message's own run is not under test
            run.cancel("user")

    async def wait_all_done(self) -> None:
        """Until every run of the case has ended and saved (a queued one may start late)."""
        while True:
            pending = [r for r in self.runs if not r.done.is_set()]
            if not pending:
                await trio.lowlevel.checkpoint()
                if all(r.done.is_set() for r in self.runs):
                    return
                continue
            await pending[0].done.wait()

    async def settle_store(self) -> None:
        """Heal an injected fault, then wait (checkpoint ticks) until the answers the store
        refused are in: the engine retries them every tick."""
        self.store.failing = False
        if self.deleted:
            await self.store.delete_session(SESSION)
            return
        for _ in range(200):
            if await self.saved(self.first) is not None:
                return
            await trio.sleep(CHECKPOINT_S)

    async def saved(self, run: Run) -> tuple[str, str, str, int] | None:
        """The run's answer as the store holds it (status, content, thinking, tool calls),
        or None while it is missing or still ``running``."""
        for m in await self.store.list_messages(SESSION):
            if m.id == run.answer_id:
                return m.status, m.content, m.thinking or "", len(m.tool_calls or [])
        return None

    def log(self, run: Run) -> list[Delivered]:
        """The run's own event log (the source of truth), decoded, with its times."""
        return [Delivered(json.loads(e.wire), e.t) for e in run.log.events]


@asynccontextmanager
async def open_stage(agent: Agent, save_timeout_s: float) -> AsyncIterator[Stage]:
    """A stage whose background tasks end when the block does.

    Cancellation: leaving the block cancels the stage's nursery; a run still going is
    cancelled from outside and writes its terminal event in its shielded cleanup.
    """
    async with trio.open_nursery() as nursery:
        stage = Stage(nursery, agent, save_timeout_s)
        await stage.open_session()
        await nursery.start(stage.serve, name="navi_trio.testing:stage")
        try:
            yield stage
        finally:
            nursery.cancel_scope.cancel()

"""Watching one case: the agent's emits (a :class:`RunContext` that records and forwards)
and its task steps (a trio :class:`~trio.abc.Instrument`), and applying the cut.

Only public trio API: ``trio.abc.Instrument`` hooks, ``trio.lowlevel.Task`` attributes
(``parent_nursery``, ``child_nurseries``, ``child_tasks``) and ``current_task``.
``tests/test_testing_kit.py`` has a test for each of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..errors import GrammarError
from .model import CutPath, CutPoint

if TYPE_CHECKING:
    from ..agents.base import Agent, RunContext
    from ._stage import Stage

#: The paths whose cut cancels the run (a store fault does once a checkpoint fails).
CANCELLING: frozenset[str] = frozenset({"stop", "delete", "interrupt", "shutdown", "store_fault"})


def all_tasks() -> Iterator[trio.lowlevel.Task]:
    """Every task of the current trio run, by walking the task tree from the root."""
    root = trio.lowlevel.current_root_task()
    stack = [root] if root is not None else []
    while stack:
        task = stack.pop()
        yield task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


def descends_from(task: trio.lowlevel.Task, ancestor: trio.lowlevel.Task) -> bool:
    t: trio.lowlevel.Task | None = task
    while t is not None:
        if t is ancestor:
            return True
        nursery = t.parent_nursery
        t = nursery.parent_task if nursery is not None else None
    return False


class CaseWatch:
    """The state of one case as it plays; one owner: the case task (the instrument and the
    recording context only call into it, synchronously)."""

    def __init__(self, path: CutPath | None, cut: CutPoint, message: str, real_guard_s: float) -> None:
        self.path = path
        self.cut = cut
        self.message = message
        self.stage: Stage | None = None
        self.run_task: trio.lowlevel.Task | None = None
        self.playing = False
        #: The agent's ``play`` ended by raising ``Cancelled`` (it was stopped).
        self.play_cancelled = False
        self.steps = 0
        self.emits = 0
        self.cut_applied = False
        #: Set once the run's cancel was requested (by the cut, or by a drain or a store
        #: fault that followed it): from then on each agent task's yields are watched.
        self.cancel_seen = False
        self.cancel_at: float | None = None
        self.playing_at_cancel = False
        self.frames_at_cut = 0
        #: How often each agent task has, since the cancel, yielded cancelled and
        #: unshielded. Twice means ``Cancelled`` has reached it: the first such yield can
        #: be one that never raises (a successful socket call ends with trio's
        #: ``cancel_shielded_checkpoint``), but the cancellable checkpoint after it does.
        self.exposed: dict[trio.lowlevel.Task, int] = {}
        self.after_cut: list[str] = []
        self.after_end: list[str] = []
        self.refused: list[str] = []
        self.finished = trio.Event()
        #: The kit's wait for this case; cancelled by the real-time guard.
        self.guard = trio.CancelScope()
        self._real_deadline = time.monotonic() + real_guard_s
        self.guard_fired = False

    # -- called from the instrument --------------------------------------------------------
    def is_agent_task(self, task: trio.lowlevel.Task) -> bool:
        return self.run_task is not None and descends_from(task, self.run_task)

    def before_step(self, task: trio.lowlevel.Task) -> None:
        if not self.guard_fired and time.monotonic() > self._real_deadline:
            self.guard_fired = True
            self.guard.cancel()
        self.observe_cancel()

    def after_step(self, task: trio.lowlevel.Task) -> None:
        agent = self.is_agent_task(task)
        if self.playing and agent:
            self.steps += 1
            if self.cut.kind == "step" and self.steps == self.cut.index:
                self.apply_cut()
        if self.cancel_seen and agent:
            # The hook runs as the task that just yielded: its effective deadline says
            # whether it yielded cancelled and unshielded, so that ``Cancelled`` reaches
            # it now. (Tested in tests/test_testing_kit.py, in case trio changes that.)
            try:
                exposed = trio.current_effective_deadline() == -math.inf
            except AttributeError:  # the task has just exited: it emits no more
                return
            except RuntimeError:  # no current task in the hook: assume the worst
                exposed = True
            if exposed:
                self.exposed[task] = self.exposed.get(task, 0) + 1

    # -- the cut ---------------------------------------------------------------------------
    def apply_cut(self) -> None:
        if self.cut_applied or self.stage is None or self.path is None:
            return
        self.cut_applied = True
        first = self.stage.first
        self.frames_at_cut = len(self.stage.client.frames.get(first.id, ()))
        self.stage.cut(self.path, self.message)
        self.observe_cancel()

    def observe_cancel(self) -> None:
        """Note the moment the first run's cancel is requested (by the cut itself, or by
        the drain or the failed checkpoint that followed it)."""
        stage = self.stage
        if self.cancel_seen or stage is None or not stage.runs or self.path not in CANCELLING:
            return
        first = stage.first
        if not stage.cancel_requested(first) or stage.finished(first):
            return
        self.cancel_seen = True
        self.cancel_at = trio.current_time()
        self.playing_at_cancel = self.playing

    # -- called by the recording context, inside an agent's emit ----------------------------
    def emitting(self, what: str) -> bool:
        """Note an emit about to happen; False if it must be dropped (the run is over)."""
        stage = self.stage
        assert stage is not None
        task = trio.lowlevel.current_task()
        self.observe_cancel()
        if stage.finished(stage.first):
            self.after_end.append(what)
            return False
        if self.cancel_seen and (not self.is_agent_task(task) or self.exposed.get(task, 0) >= 2):
            self.after_cut.append(what)
        return True

    def emitted(self) -> None:
        self.emits += 1
        if self.cut.kind == "event" and self.emits == self.cut.index:
            self.apply_cut()


class Watcher(trio.abc.Instrument):
    """Feeds every task step to the case being played (one case at a time)."""

    def __init__(self) -> None:
        self.case: CaseWatch | None = None
        #: A failure in a hook (trio would disable the instrument): reported by the kit.
        self.error: BaseException | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.case is not None:
            try:
                self.case.before_step(task)
            except Exception as exc:
                self.error = self.error or exc

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.case is not None:
            try:
                self.case.after_step(task)
            except Exception as exc:
                self.error = self.error or exc


class ObservedAgent:
    """The agent under test, wrapped: the first run of a case plays it through a
    :class:`RecordingContext`; any later run (an interrupting message's) plays it as is."""

    def __init__(self, agent: Agent, case: CaseWatch) -> None:
        self.agent = agent
        self.case = case
        self.wants_history = getattr(agent, "wants_history", False)
        check = getattr(agent, "check_message", None)
        if check is not None:  # the engine asks the agent before a run starts
            self.check_message = check

    async def play(self, ctx: RunContext) -> None:
        """Cancellation: as the wrapped agent's ``play``."""
        case = self.case
        stage = case.stage
        if stage is None or ctx is not stage.first:
            await self.agent.play(ctx)
            return
        case.run_task = trio.lowlevel.current_task()
        case.playing = True
        try:
            await self.agent.play(RecordingContext(ctx, case))
        except trio.Cancelled:
            case.play_cancelled = True
            raise
        finally:
            case.playing = False


class RecordingContext:
    """A :class:`~navi_trio.RunContext` that forwards everything to the run's and notes
    each emit: when it came (relative to the cut), and whether the grammar refused it."""

    def __init__(self, ctx: RunContext, case: CaseWatch) -> None:
        self._ctx = ctx
        self._case = case

    @property
    def session_id(self) -> str:
        return self._ctx.session_id

    @property
    def user_id(self) -> str | None:
        return self._ctx.user_id

    @property
    def content(self) -> str:
        return self._ctx.content

    @property
    def user_message(self) -> str:
        return self._ctx.user_message

    @property
    def images(self) -> list[str]:
        return self._ctx.images

    @property
    def upload_dir(self) -> Path | None:
        return self._ctx.upload_dir

    @property
    def history(self) -> list[dict[str, Any]]:
        return self._ctx.history

    @property
    def summary(self) -> str | None:
        return self._ctx.summary

    async def save_summary(self, summary: str, through_message_id: str) -> None:
        await self._ctx.save_summary(summary, through_message_id)

    def _emit(self, what: str, emit: Any, *args: Any, **kw: Any) -> None:
        if not self._case.emitting(what):
            return
        try:
            emit(*args, **kw)
        except GrammarError as exc:
            self._case.refused.append(f"{what}: {exc}")
            raise
        self._case.emitted()

    def emit_thinking(self, delta: str) -> None:
        self._emit(f"thinking_delta {delta[:24]!r}", self._ctx.emit_thinking, delta)

    def emit_thinking_end(self) -> None:
        self._emit("thinking_end", self._ctx.emit_thinking_end)

    def emit_text(self, delta: str) -> None:
        self._emit(f"stream_delta {delta[:24]!r}", self._ctx.emit_text, delta)

    def emit_tool_started(self, tool: str, args: Any, *, is_subagent: bool = False) -> None:
        self._emit(f"tool_started {tool!r}", self._ctx.emit_tool_started, tool, args, is_subagent=is_subagent)

    def emit_tool_call(self, result: str, *, success: bool) -> None:
        self._emit(f"tool_call {result[:24]!r}", self._ctx.emit_tool_call, result, success=success)

    def emit_context_compressed(self) -> None:
        self._emit("context_compressed", self._ctx.emit_context_compressed)

"""``check_agent``: prove an agent cancellation-correct by cutting it at every point.

The agent is played once, uncut, through navi-trio's real run machinery (a RunRegistry
with a memory store, no HTTP server), counting its emits and its task steps (each step
ends at a checkpoint). Then it is replayed once per cut path and per point: right after
each emit and after each step. Every case is checked (:data:`~.model.CHECKS`).

Each case runs in a trio system task, so that an agent blocked where no cancel reaches
it (a shielded wait, a thread that is not abandoned) is reported and left, not waited
for: the kit's wait is bounded in virtual time and by a real-time guard.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from ..errors import GrammarError
from ..events import TERMINAL_TYPES, check_grammar
from ._observe import CANCELLING, CaseWatch, ObservedAgent, Watcher, all_tasks, descends_from
from ._stage import STATUS_FOR, STATUS_FOR_STOP, Delivered, Stage, open_stage
from .model import CUT_PATHS, REASON_FOR, UNCUT, Case, CutPath, CutPoint, Report, Violation

if TYPE_CHECKING:
    from ..agents.base import Agent
    from .fake_openai import FakeOpenAI

#: Frames shown before the cut in a violation's trace, and at most after it.
TRACE_BEFORE = 4
TRACE_AFTER = 8


async def check_agent(
    agent: Agent,
    message: str,
    *,
    paths: Iterable[CutPath] = CUT_PATHS,
    model: FakeOpenAI | None = None,
    resources: Mapping[str, Callable[[], int]] | None = None,
    before_each: Callable[[], Awaitable[None] | None] | None = None,
    stop_budget_s: float = 1.0,
    play_budget_s: float = 3600.0,
    deadline_s: float = 30.0,
    real_guard_s: float = 20.0,
    save_timeout_s: float = 5.0,
    max_cuts: int | None = None,
    ignore_task: Callable[[trio.lowlevel.Task], bool] | None = None,
) -> Report:
    """Play ``agent`` on ``message`` uncut, then cut at every emit and step by every path.

    Args:
        agent: anything with ``async def play(self, ctx)`` (:class:`navi_trio.Agent`).
        message: the user's message each play answers.
        paths: the cut paths to try (default all of :data:`CUT_PATHS`).
        model: the fake model the agent talks to, if any: its streams must be closed
            within the stop budget, and its own tasks are not the agent's.
        resources: more probes, by name: each returns how many of something the agent
            holds open (sockets, files); it must be back to its count at the start of the
            case within ``stop_budget_s`` after the run ended.
        before_each: called (and awaited if it returns an awaitable) before every play,
            to reset what the agent depends on (script the fake model again).
        stop_budget_s: virtual seconds a stop may take to give the terminal event, and
            the opened streams to close after it.
        play_budget_s: virtual seconds an uncut play may take.
        deadline_s: virtual seconds after a cut by which the run must have ended; past
            it (or ``real_guard_s`` of real time) the case is reported as blocked.
        real_guard_s: real seconds any one case may take (an agent that loops without
            ever letting the virtual clock move).
        save_timeout_s: the engine's bound on a run's shielded final save.
        max_cuts: at most this many cut points per path (spread evenly), for long agents.
        ignore_task: tasks the "no task left" check leaves alone (the caller's own).

    Returns:
        A :class:`Report`; call ``raise_for_violations()`` on it in a test.

    Cancellation: awaited inside the caller's trio run (any clock; made for
    ``MockClock(autojump_threshold=0)``). If the call is cancelled, the case under way
    is cancelled too and the cancel propagates.
    """
    kit = _Kit(
        agent,
        message,
        model=model,
        resources=dict(resources or {}),
        before_each=before_each,
        stop_budget_s=stop_budget_s,
        play_budget_s=play_budget_s,
        deadline_s=deadline_s,
        real_guard_s=real_guard_s,
        save_timeout_s=save_timeout_s,
        ignore_task=ignore_task,
    )
    watcher = Watcher()
    trio.lowlevel.add_instrument(watcher)
    try:
        return await kit.run(watcher, list(paths), max_cuts)
    finally:
        trio.lowlevel.remove_instrument(watcher)


def spread(points: Sequence[CutPoint], limit: int | None) -> list[CutPoint]:
    """At most ``limit`` of ``points``, evenly spaced, the first and last always kept."""
    if limit is None or len(points) <= limit:
        return list(points)
    if limit <= 1:
        return list(points[:limit])
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


class _Kit:
    def __init__(
        self,
        agent: Agent,
        message: str,
        *,
        model: FakeOpenAI | None,
        resources: dict[str, Callable[[], int]],
        before_each: Callable[[], Awaitable[None] | None] | None,
        stop_budget_s: float,
        play_budget_s: float,
        deadline_s: float,
        real_guard_s: float,
        save_timeout_s: float,
        ignore_task: Callable[[trio.lowlevel.Task], bool] | None,
    ) -> None:
        self.agent = agent
        self.message = message
        self.model = model
        self.resources = resources
        if model is not None:
            self.resources.setdefault("model streams", lambda: model.open_streams)
        self.before_each = before_each
        self.stop_budget_s = stop_budget_s
        self.play_budget_s = play_budget_s
        self.deadline_s = deadline_s
        self.real_guard_s = real_guard_s
        self.save_timeout_s = save_timeout_s
        self.ignore_task = ignore_task
        self.own_tasks: set[trio.lowlevel.Task] = set()
        self.baseline: _Outcome | None = None

    async def run(self, watcher: Watcher, paths: list[CutPath], max_cuts: int | None) -> Report:
        report = Report(agent=type(self.agent).__name__)
        base = await self.play(watcher, None, UNCUT, report)
        if base is None or base.watch.playing or not base.ended:
            return report
        self.baseline = base
        report.events, report.steps = base.watch.emits, base.watch.steps
        points = [CutPoint("event", i) for i in range(1, report.events + 1)]
        points += [CutPoint("step", i) for i in range(1, report.steps + 1)]
        for path in paths:
            for cut in spread(points, max_cuts):
                if await self.play(watcher, path, cut, report) is None:
                    return report  # abandoned: the agent is stuck where nothing reaches it
        return report

    async def play(self, watcher: Watcher, path: CutPath | None, cut: CutPoint, report: Report) -> _Outcome | None:
        """Play one case in a system task and wait for it, bounded; None if abandoned."""
        watch = CaseWatch(path, cut, self.message, self.real_guard_s)
        outcome = _Outcome(watch)
        watcher.case = watch
        give_up = trio.CancelScope(deadline=trio.current_time() + self.play_budget_s + 3 * self.deadline_s)
        outcome.give_up = give_up
        trio.lowlevel.spawn_system_task(self._case_task, outcome, name=f"navi_trio.testing:{path}:{cut}")
        try:
            with watch.guard, give_up:
                await watch.finished.wait()
        finally:
            watcher.case = None
        if watcher.error is not None:
            outcome.violate("kit", f"the kit's instrument failed: {type(watcher.error).__name__}: {watcher.error}")
            watcher.error = None
        if not watch.finished.is_set() and not any(v.check == "ended" for v in outcome.violations):
            how = "the real-time guard" if watch.guard_fired else "the deadline"
            outcome.violate(
                "ended",
                f"the case did not finish (stopped by {how}); the agent is blocked where no cancel "
                "reaches it, and its task was left running",
            )
        if not watch.finished.is_set():
            report.abandoned += 1
            report.cases.append(outcome.case())
            return None
        report.cases.append(outcome.case())
        return outcome

    async def _case_task(self, outcome: _Outcome) -> None:
        """One case, from the snapshot of tasks to the checks. Never raises (a system
        task's exception would crash the caller's run): a kit failure is a violation.

        Cancellation: a cancel of the system nursery (the caller's run ending) goes
        through; the stage's nursery then cancels its runs from outside.
        """
        self.own_tasks.add(trio.lowlevel.current_task())
        watch = outcome.watch
        try:
            before = set(all_tasks())
            if self.before_each is not None:
                result = self.before_each()
                if inspect.isawaitable(result):
                    await result
            start_counts = {name: probe() for name, probe in self.resources.items()}
            async with open_stage(ObservedAgent(self.agent, watch), self.save_timeout_s) as stage:
                watch.stage = stage
                await self._play_case(outcome, stage)
                if not outcome.ended:
                    return
                ended_at = trio.current_time()
                await self._check_resources(outcome, start_counts)
            if await self._check_tasks(outcome, before):
                # A task left behind: give it the stop budget to show what it does.
                await trio.sleep_until(ended_at + self.stop_budget_s)
            self.check_emits_after_end(outcome)
        except Exception as exc:  # a kit bug must not crash the caller's run
            outcome.violate("kit", f"{type(exc).__name__}: {exc}")
        finally:
            watch.finished.set()

    async def _play_case(self, outcome: _Outcome, stage: Stage) -> None:
        watch = outcome.watch
        run = stage.submit(self.message)
        ended = trio.CancelScope(deadline=trio.current_time() + self.play_budget_s)
        with ended:
            while not run.done.is_set():
                # A cut moves the deadline: the run must end within deadline_s of it.
                if watch.cancel_at is not None:
                    ended.deadline = min(ended.deadline, watch.cancel_at + self.deadline_s)
                with trio.move_on_after(self.stop_budget_s):
                    await run.done.wait()
            await stage.wait_all_done()
        if ended.cancelled_caught:
            outcome.frames = list(stage.client.frames.get(run.id, []))
            outcome.violate("ended", "the run did not end: the agent is blocked where a stop cannot reach it")
            outcome.give_up.deadline = trio.current_time() + self.deadline_s
            return
        outcome.ended = True
        with trio.move_on_after(self.deadline_s):
            await stage.settle_store()
        outcome.saved = await stage.saved(run)
        outcome.frames = list(stage.client.frames.get(run.id, []))
        outcome.log = stage.log(run)
        outcome.deleted = stage.deleted
        outcome.clients_gone = stage.client.gone
        self.check_run(outcome)

    # -- the checks ---------------------------------------------------------------------
    def check_run(self, o: _Outcome) -> None:
        w = o.watch
        log_types = [f.obj["type"] for f in o.log]
        frames = [f.obj for f in o.frames]
        terminals = [t for t in log_types if t in TERMINAL_TYPES]
        o.terminal = terminals[-1] if terminals else None
        if len(terminals) != 1 or not log_types or log_types[-1] not in TERMINAL_TYPES:
            o.violate("terminal", f"the run's log ends {log_types[-3:]} with {len(terminals)} terminal events")
        if not o.clients_gone:
            seen = [f["type"] for f in frames]
            seen_terminals = [t for t in seen if t in TERMINAL_TYPES]
            if len(seen_terminals) != 1 or not seen or seen[-1] not in TERMINAL_TYPES:
                o.violate(
                    "terminal", f"the client saw {len(seen_terminals)} terminal events, the last frame {seen[-1:]}"
                )
        views = (("log", [f.obj for f in o.log]), ("delivered", frames))
        for where, objs in views:
            if o.clients_gone and where == "delivered":
                continue
            try:
                check_grammar([(f["type"], f.get("seq")) for f in objs])
                check_pairs(objs)
            except GrammarError as exc:
                o.violate("grammar", f"{where}: {exc}")
        for refused in w.refused:
            o.violate("grammar", f"the run refused the agent's {refused}")
        if w.after_cut:
            more = f" (and {len(w.after_cut) - 1} more)" if len(w.after_cut) > 1 else ""
            o.violate("after_cut", f"{w.after_cut[0]} emitted after the cut{more}")
        self._check_saved(o, frames)
        self._check_stop(o)
        base = self.baseline
        differs = base is not None and (
            o.terminal != base.terminal or (o.saved and base.saved and o.saved[:2] != base.saved[:2])
        )
        if o.clients_gone and base is not None and differs:
            o.violate(
                "runs_on",
                f"with every client gone the run ended {o.terminal} {o.saved and o.saved[:2]!r}, "
                f"not {base.terminal} {base.saved and base.saved[:2]!r} as uncut",
            )

    def check_emits_after_end(self, o: _Outcome) -> None:
        for what in o.watch.after_end:
            o.violate("after_end", f"{what} emitted after the run ended (by a task the run does not own?)")

    def _check_saved(self, o: _Outcome, frames: list[dict[str, Any]]) -> None:
        if o.deleted or o.terminal is None:
            return
        if o.saved is None:
            o.violate("saved", "no final answer was saved")
            return
        status, content, thinking, tools = o.saved
        terminal = next((f.obj for f in reversed(o.log) if f.obj["type"] in TERMINAL_TYPES), None)
        want = STATUS_FOR.get(o.terminal) or STATUS_FOR_STOP.get(str(terminal and terminal.get("reason")), "stopped")
        if status != want:
            o.violate("saved", f"the answer was saved {status!r}, its terminal event says {want!r}")
        if o.clients_gone:
            return
        text = "".join(f["delta"] for f in frames if f["type"] == "stream_delta")
        thought = "".join(f["delta"] for f in frames if f["type"] == "thinking_delta")
        calls = sum(f["type"] == "tool_call" for f in frames)
        if content != text:
            o.violate("saved", f"saved text {_short(content)} but the client got {_short(text)}")
        if thinking != thought:
            o.violate("saved", f"saved thinking {_short(thinking)} but the client got {_short(thought)}")
        if tools != calls:
            o.violate("saved", f"{tools} tool calls saved, {calls} delivered")
        if terminal is not None and "content" in terminal and terminal["content"] != text:
            o.violate("saved", f"the terminal event's content {_short(terminal['content'])} is not the text sent")

    def _check_stop(self, o: _Outcome) -> None:
        w = o.watch
        if not w.cancel_seen or w.cancel_at is None or w.path not in CANCELLING:
            return
        term = next((f for f in o.log if f.obj["type"] in TERMINAL_TYPES), None)
        if term is not None and term.t - w.cancel_at > self.stop_budget_s:
            late = term.t - w.cancel_at
            o.violate(
                "stop_budget", f"the terminal event came {late:.3g} s after the cut (budget {self.stop_budget_s:g} s)"
            )
        if o.terminal == "stream_end" and w.play_cancelled:
            o.violate("honoured", "the agent was cancelled, yet the run ended complete")
        elif w.playing_at_cancel and o.terminal == "stream_end" and w.after_cut:
            o.violate("honoured", "the run was cut but ended complete: the agent caught the cancel and went on")
        reason = term.obj.get("reason") if term is not None else None
        if o.terminal == "stream_stopped" and w.path in REASON_FOR and reason != REASON_FOR[w.path]:
            o.violate("honoured", f"stopped with reason {reason!r}, not {REASON_FOR[w.path]!r}")

    async def _check_resources(self, o: _Outcome, start: dict[str, int]) -> None:
        """Give what the agent opened the stop budget to close."""
        deadline = trio.current_time() + self.stop_budget_s
        if not self.resources:
            return
        while True:
            open_now = {n: p() - start[n] for n, p in self.resources.items() if p() > start[n]}
            if not open_now or trio.current_time() >= deadline:
                break
            await trio.sleep(self.stop_budget_s / 20)
        for name, n in open_now.items():
            o.violate("resources", f"{n} {name} still open {self.stop_budget_s:g} s after the run ended")

    async def _check_tasks(self, o: _Outcome, before: set[trio.lowlevel.Task]) -> bool:
        """Whether a task is left that was not there before the case (and report it)."""
        await trio.testing.wait_all_tasks_blocked()
        here = trio.lowlevel.current_task()
        left = []
        for task in all_tasks():
            if task in before or task in self.own_tasks or descends_from(task, here):
                continue
            if self.ignore_task is not None and self.ignore_task(task):
                continue
            if self.model is not None and self.model.owns(task):
                continue
            left.append(task)
        if left:
            names = ", ".join(sorted(t.name for t in left)[:3])
            o.violate("tasks", f"{len(left)} tasks left running after the run ended: {names}")
        return bool(left)


def check_pairs(objs: Sequence[dict[str, Any]]) -> None:
    """The parts of the grammar ``check_grammar`` leaves out: every ``tool_started`` gets
    its ``tool_call`` (a sub-agent's nested inside) and thinking is closed by
    ``thinking_end`` before anything else, both before the terminal event."""
    tools: list[str] = []
    thinking = False
    for i, f in enumerate(objs):
        kind = f["type"]
        if thinking and kind not in ("thinking_delta", "thinking_end"):
            raise GrammarError(f"event {i} ({kind}) while thinking is open")
        if tools and kind not in ("tool_call", "tool_started", *TERMINAL_TYPES):
            raise GrammarError(f"event {i} ({kind}) while tool {tools[-1]!r} runs")
        if kind == "thinking_delta":
            thinking = True
        elif kind == "thinking_end":
            thinking = False
        elif kind == "tool_started":
            if tools and not f.get("is_subagent"):
                raise GrammarError(f"event {i}: tool {f.get('tool')!r} started while {tools[-1]!r} runs")
            tools.append(str(f.get("tool")))
        elif kind == "tool_call":
            if not tools or tools.pop() != f.get("tool"):
                raise GrammarError(f"event {i}: tool_call for {f.get('tool')!r}, which is not running")
        elif kind in TERMINAL_TYPES and tools:
            raise GrammarError(f"the run ended with tool {tools[-1]!r} still running")


class _Outcome:
    """What one case produced, filled in as it plays (owned by the case task)."""

    def __init__(self, watch: CaseWatch) -> None:
        self.watch = watch
        self.give_up = trio.CancelScope()
        self.ended = False
        self.terminal: str | None = None
        self.saved: tuple[str, str, str, int] | None = None
        self.frames: list[Delivered] = []
        self.log: list[Delivered] = []
        self.deleted = False
        self.clients_gone = False
        self.violations: list[Violation] = []
        self.started = time.monotonic()

    def violate(self, check: str, message: str) -> None:
        self.violations.append(Violation(check, self.watch.path, self.watch.cut, message, self.trace()))

    def trace(self) -> tuple[str, ...]:
        at = self.watch.frames_at_cut if self.watch.cut_applied else len(self.frames)
        out = [_frame_text(f.obj) for f in self.frames[max(0, at - TRACE_BEFORE) : at]]
        if self.watch.cut_applied:
            out.append(f"--- cut: {self.watch.path} ---")
            out += [_frame_text(f.obj) for f in self.frames[at : at + TRACE_AFTER]]
        out += [f"emitted after the cut: {what}" for what in self.watch.after_cut[:3]]
        return tuple(out)

    def case(self) -> Case:
        w = self.watch
        reached = w.path is None or w.cut_applied
        return Case(w.path, w.cut, reached, self.terminal, tuple(self.violations))


def _frame_text(obj: dict[str, Any]) -> str:
    extra = obj.get("delta") or obj.get("tool") or obj.get("reason") or obj.get("message") or ""
    return f"{obj.get('seq')}: {obj['type']} {_short(str(extra))}" if extra else f"{obj.get('seq')}: {obj['type']}"


def _short(text: str, n: int = 32) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")

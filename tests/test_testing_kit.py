"""``navi_trio.testing.check_agent`` (CONTRACT 11): it must flag broken agents, each by the
check that names its bug, and pass navi-trio's own agents.

Every check of the kit has a case here that must fail it: an agent with that bug where an
agent can have it, a made-up outcome where only the engine could (one terminal event,
the saved answer). Virtual time (``autojump_clock``) throughout, except where the fake
model's real sockets or a real thread are involved.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest
import trio
import trio.testing

import navi_trio
from navi_trio import testing
from navi_trio.agents import openai as openai_agent
from navi_trio.agents.openai import OpenAIAgent, OpenAISettings
from navi_trio.agents.scripted import ScriptedAgent
from navi_trio.testing import CHECKS, AgentCheckFailed, CutPoint, Report, check_agent
from navi_trio.testing._observe import CaseWatch, Watcher, all_tasks, descends_from
from navi_trio.testing._stage import Delivered
from navi_trio.testing.fake_openai import (
    FakeOpenAI,
    Recorded,
    Reply,
    content,
    finish,
    open_fake_openai,
    reasoning,
    stream,
    text_reply,
    tool_reply,
)
from navi_trio.testing.kit import _Kit, _Outcome

EVERY_STEP = json.dumps(
    {
        "script": [
            {"think": "let me see"},
            {"text": "Hel", "repeat": 3},
            {"tool": "calc", "args": {"x": 1}, "result": "2", "delay": 0.5},
            {"text": "lo ", "repeat": 2, "delay": 0.1},
            {"compress": True},
            {"sleep": 0.2},
            {"text": "end"},
        ]
    }
)


def checks_failed(report: Report) -> set[str]:
    return {v.check for v in report.violations}


# -- broken agents: each must be flagged by the check that names its bug ----------------
class SwallowsCancel:
    """Catches ``Cancelled`` and goes on emitting."""

    async def play(self, ctx: navi_trio.RunContext) -> None:
        for i in range(4):
            try:  # noqa: SIM105 (the bug, spelled out)
                await trio.sleep(1)
            except trio.Cancelled:
                pass
            ctx.emit_text(f"{i} ")


class ShieldsLongSleep:
    """Shields a sleep far longer than the stop budget."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds

    async def play(self, ctx: navi_trio.RunContext) -> None:
        ctx.emit_text("before ")
        with trio.CancelScope(shield=True):
            await trio.sleep(self.seconds)
        await trio.lowlevel.checkpoint()
        ctx.emit_text("after")


class BlocksWhereNoStopReaches:
    """Waits, shielded, for something only the test can give (released at its end)."""

    def __init__(self) -> None:
        self.release = trio.Event()

    async def play(self, ctx: navi_trio.RunContext) -> None:
        ctx.emit_text("waiting ")
        with trio.CancelScope(shield=True):
            await self.release.wait()


class LeavesTask:
    """Starts a task in a nursery it does not own (the test's), which outlives the run."""

    def __init__(self, nursery: trio.Nursery, *, emit_later: bool = False) -> None:
        self.nursery = nursery
        self.emit_later = emit_later

    async def play(self, ctx: navi_trio.RunContext) -> None:
        self.nursery.start_soon(self._background, ctx)
        ctx.emit_text("hi")
        await trio.sleep(1)

    async def _background(self, ctx: navi_trio.RunContext) -> None:
        await trio.sleep(0.5)
        if self.emit_later:
            ctx.emit_text("late")
        await trio.sleep_forever()


class NeverClosesStream:
    """Streams from the model with a response it never closes (kept, for the test to
    close at its end: an unclosed socket would warn at some later garbage collection)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.clients: list[httpx.AsyncClient] = []
        self.open: list[tuple[httpx.Response, AsyncIterator[str]]] = []

    async def play(self, ctx: navi_trio.RunContext) -> None:
        client = httpx.AsyncClient(base_url=self.base_url, trust_env=False)
        self.clients.append(client)
        request = client.build_request("POST", "/chat/completions", json={"model": "m", "stream": True})
        response = await client.send(request, stream=True)  # never closed: the bug
        lines = response.aiter_lines()
        self.open.append((response, lines))
        while True:
            try:
                line = await lines.__anext__()
            except StopAsyncIteration:
                return
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if piece:
                    ctx.emit_text(piece)
                    await trio.sleep(0.01)  # a cancel here, outside httpx, leaves the response open

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for response, lines in self.open:
                await lines.aclose()  # type: ignore[attr-defined]
                await response.aclose()
            for client in self.clients:
                await client.aclose()


class MisusesGrammar:
    """Sends a tool result for a tool it never started."""

    async def play(self, ctx: navi_trio.RunContext) -> None:
        ctx.emit_text("x")
        await trio.sleep(0.1)
        ctx.emit_tool_call("result", success=True)


async def test_an_agent_that_swallows_cancelled_is_flagged(autojump_clock: trio.testing.MockClock) -> None:
    report = await check_agent(SwallowsCancel(), "hi")
    assert {"after_cut", "honoured"} <= checks_failed(report)
    v = next(v for v in report.violations if v.check == "after_cut")
    assert v.path is not None and v.cut.kind in ("event", "step")
    assert any("cut" in line for line in v.trace), v.trace  # the minimal trace marks the cut
    with pytest.raises(AgentCheckFailed, match="after_cut"):
        report.raise_for_violations()


async def test_an_agent_that_shields_a_long_sleep_misses_the_stop_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = await check_agent(ShieldsLongSleep(), "hi", paths=["stop", "shutdown"])
    assert "stop_budget" in checks_failed(report)
    assert report.abandoned == 0  # 10 s < the deadline: it ended, late


async def test_a_worker_thread_the_stop_does_not_abandon_misses_the_stop_budget() -> None:
    # Real clock: a worker thread makes virtual time leap (STYLE 4.5).
    class WaitsForItsThread:
        def __init__(self, abandon: bool) -> None:
            self.abandon = abandon

        async def play(self, ctx: navi_trio.RunContext) -> None:
            ctx.emit_tool_started("slow", {})
            await trio.to_thread.run_sync(time.sleep, 0.3, abandon_on_cancel=self.abandon)
            ctx.emit_tool_call("done", success=True)

    report = await check_agent(WaitsForItsThread(False), "hi", paths=["stop"], stop_budget_s=0.1)
    assert "stop_budget" in checks_failed(report)  # (its emit once the thread is back: after_cut too)
    # Abandoned on cancel, as the scripted agent's thread tools are: in time.
    (
        await check_agent(WaitsForItsThread(True), "hi", paths=["stop"], stop_budget_s=0.1, max_cuts=1)
    ).raise_for_violations()


async def test_an_agent_blocked_where_no_stop_reaches_is_reported_not_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = BlocksWhereNoStopReaches()
    try:
        with trio.fail_after(3600):
            report = await check_agent(agent, "hi", play_budget_s=60, deadline_s=5)
        assert checks_failed(report) == {"ended"}
        assert report.abandoned == 1
        with pytest.raises(AgentCheckFailed):
            report.raise_for_violations()
    finally:
        agent.release.set()  # lets the abandoned case end with the test


async def test_the_real_time_guard_ends_an_agent_that_never_lets_virtual_time_pass(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Spins:
        stop = False

        async def play(self, ctx: navi_trio.RunContext) -> None:
            ctx.emit_text("spin")
            while not self.stop:  # checkpoints, never blocks: the clock never moves
                try:  # noqa: SIM105 (the bug, spelled out)
                    await trio.lowlevel.checkpoint()
                except trio.Cancelled:
                    pass

    agent = Spins()
    try:
        report = await check_agent(agent, "hi", real_guard_s=0.5)
        assert "ended" in checks_failed(report)
        assert report.abandoned == 1
        assert "real-time guard" in str(report.violations[0])
    finally:
        agent.stop = True


async def test_an_agent_that_leaves_a_task_in_a_nursery_it_does_not_own_is_flagged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        report = await check_agent(LeavesTask(nursery), "hi", paths=["stop"])
        assert "tasks" in checks_failed(report)
        assert report.cases[0].violations  # already the uncut play leaves it
        nursery.cancel_scope.cancel()


async def test_a_task_that_emits_after_the_run_ended_is_flagged(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        report = await check_agent(LeavesTask(nursery, emit_later=True), "hi", paths=["stop"])
        assert {"after_end", "tasks"} <= checks_failed(report)
        nursery.cancel_scope.cancel()


# Closing what the broken agent left open abandons httpx2's nested line iterators: their
# finalizer warns. That is the broken agent's garbage, collected here, not in a later test.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_agent_that_never_closes_its_model_stream_is_flagged() -> None:
    # Real clock: the fake model's sockets are real I/O.
    async with open_fake_openai() as fake:
        fake.fallback = stream(*(content(f"w{i} ") for i in range(40)), finish("stop"), delay=0.05)
        agent = NeverClosesStream(fake.base_url)
        try:
            report = await check_agent(
                agent, "hi", model=fake, paths=["stop"], max_cuts=3, stop_budget_s=0.3, ignore_task=fake.owns
            )
        finally:
            await agent.aclose()
            del agent
            gc.collect()
    assert "resources" in checks_failed(report), report.summary()
    assert any("model streams" in v.message for v in report.violations)


async def test_a_resource_probe_that_stays_up_is_flagged(autojump_clock: trio.testing.MockClock) -> None:
    held: list[object] = []

    class HoldsFiles:
        async def play(self, ctx: navi_trio.RunContext) -> None:
            held.append(object())  # "opens a file" and never closes it
            ctx.emit_text("x")
            await trio.sleep(1)

    report = await check_agent(HoldsFiles(), "hi", resources={"files": lambda: len(held)}, paths=["stop"])
    assert checks_failed(report) == {"resources"}


async def test_an_emit_the_grammar_refuses_is_flagged(autojump_clock: trio.testing.MockClock) -> None:
    report = await check_agent(MisusesGrammar(), "hi", paths=["stop"])
    assert "grammar" in checks_failed(report)
    assert report.cases[0].terminal == "error"


async def test_a_failure_of_the_kit_itself_is_a_violation_not_a_crash(autojump_clock: trio.testing.MockClock) -> None:
    def broken_setup() -> None:
        raise RuntimeError("setup broke")

    report = await check_agent(ScriptedAgent(), "hi", before_each=broken_setup)
    assert checks_failed(report) == {"kit"}
    assert "setup broke" in report.violations[0].message


# -- the checks only a broken engine could fail: made-up outcomes ------------------------
def outcome(frames: list[dict[str, Any]], saved: tuple[str, str, str, int] | None, **flags: Any) -> _Outcome:
    o = _Outcome(CaseWatch(flags.pop("path", None), CutPoint("none"), "hi", 10.0))
    o.frames = [Delivered(f, 0.0) for f in frames]
    o.log = list(o.frames)
    o.saved = saved
    for k, v in flags.items():
        setattr(o, k, v)
    return o


def kit() -> _Kit:
    return _Kit(
        ScriptedAgent(),
        "hi",
        model=None,
        resources={},
        before_each=None,
        stop_budget_s=1,
        play_budget_s=10,
        deadline_s=10,
        real_guard_s=10,
        save_timeout_s=1,
        ignore_task=None,
    )


START = {"type": "stream_start", "seq": 1, "run_id": "r"}
DELTA = {"type": "stream_delta", "seq": 2, "delta": "ab"}
END = {"type": "stream_end", "seq": 3, "content": "ab"}


def test_the_made_up_good_outcome_passes() -> None:
    o = outcome([START, DELTA, END], ("complete", "ab", "", 0))
    kit().check_run(o)
    assert o.violations == []


@pytest.mark.parametrize(
    ("frames", "saved", "check"),
    [
        ([START, DELTA], ("complete", "ab", "", 0), "terminal"),
        ([START, DELTA, END, {"type": "error", "seq": 4, "message": "x"}], ("complete", "ab", "", 0), "terminal"),
        ([START, {**DELTA, "seq": 1}, END], ("complete", "ab", "", 0), "grammar"),
        ([START, {"type": "tool_started", "seq": 2, "tool": "t"}, END], ("complete", "", "", 0), "grammar"),
        ([START, {"type": "thinking_delta", "seq": 2, "delta": "x"}, END], ("complete", "", "x", 0), "grammar"),
        ([START, {"type": "tool_call", "seq": 2, "tool": "t"}, END], ("complete", "", "", 1), "grammar"),
        ([START, DELTA, END], ("complete", "a", "", 0), "saved"),
        ([START, DELTA, END], ("stopped", "ab", "", 0), "saved"),
        ([START, DELTA, END], None, "saved"),
        ([START, DELTA, END], ("complete", "ab", "", 1), "saved"),
    ],
)
def test_each_engine_side_check_fails_a_made_up_outcome(
    frames: list[dict[str, Any]], saved: tuple[str, str, str, int] | None, check: str
) -> None:
    o = outcome(frames, saved)
    kit().check_run(o)
    assert check in {v.check for v in o.violations}


def test_clients_gone_must_end_as_the_uncut_play_did() -> None:
    k = kit()
    k.baseline = outcome([START, DELTA, END], ("complete", "ab", "", 0))
    k.check_run(k.baseline)
    k.baseline.terminal = "stream_end"
    stopped = {"type": "stream_stopped", "seq": 3, "content": "ab", "reason": "user"}
    o = outcome([START, DELTA, stopped], ("stopped", "ab", "", 0), path="clients_gone", clients_gone=True)
    k.check_run(o)
    assert "runs_on" in {v.check for v in o.violations}


def test_every_check_has_a_failing_case_here() -> None:
    import inspect
    import sys

    source = inspect.getsource(sys.modules[__name__])
    for check in CHECKS:
        assert f'"{check}"' in source, f"no test fails the {check} check"


# -- navi-trio's own agents pass ---------------------------------------------------------
async def test_the_scripted_agent_passes_every_cut_of_a_script_with_every_step(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = await check_agent(ScriptedAgent(), EVERY_STEP)
    report.raise_for_violations()
    assert report.events >= 10 and report.steps >= 5
    assert len(report.cases) == 1 + 6 * (report.events + report.steps)
    assert all(case.reached for case in report.cases)
    by_path = {c.path: c.terminal for c in report.cases if c.cut == CutPoint("event", 3)}
    assert by_path == {
        "stop": "stream_stopped",
        "delete": "stream_stopped",
        "interrupt": "stream_stopped",
        "shutdown": "stream_stopped",
        "store_fault": "error",
        "clients_gone": "stream_end",
    }


async def test_the_scripted_demo_answer_passes(autojump_clock: trio.testing.MockClock) -> None:
    (await check_agent(ScriptedAgent(), "hello there you")).raise_for_violations()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as f:
        yield f


def openai(fake: FakeOpenAI) -> OpenAIAgent:
    return OpenAIAgent(OpenAISettings(fake.base_url, "sk-test", "m", timeout_s=30))


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_agent, "RETRY_BASE_S", 0.01)


async def test_the_openai_agent_passes_with_the_fake_model(
    fake: FakeOpenAI, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fallback = stream(
        reasoning("hmm "), reasoning("ok"), content("Hello "), content("world"), finish("stop"), delay=0.01
    )
    report = await check_agent(openai(fake), "hi", model=fake, max_cuts=5)
    report.raise_for_violations()
    assert report.events >= 4


async def test_the_openai_agent_with_a_tool_and_the_delegate_sub_agent_passes(
    fake: FakeOpenAI, autojump_clock: trio.testing.MockClock
) -> None:
    def reply(req: Recorded) -> Reply:
        roles = [m["role"] for m in req.messages]
        if "delegate" not in req.tool_names:  # the sub-agent's own turn
            return text_reply("forty", "-two", delay=0.01)
        if "tool" not in roles:
            return tool_reply(("c1", "calculator", '{"expression": "6*7"}'), ("d1", "delegate", '{"task": "6*7?"}'))
        return text_reply("It is ", "42.", delay=0.01)

    fake.fallback = reply
    report = await check_agent(openai(fake), "what is 6*7?", model=fake, max_cuts=5)
    report.raise_for_violations()
    assert report.events >= 6  # two tools (one a nested turn's) and the text after them


# -- the public trio API the kit relies on (a trio release that changed it fails here) ----
async def test_instrument_hooks_see_every_step_and_a_cancel_from_after_task_step_lands() -> None:
    steps: list[str] = []
    scope = trio.CancelScope()

    class Cutter(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name == "worker":
                steps.append("before")

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name == "worker":
                steps.append("after")
                if steps.count("after") == 2:
                    scope.cancel()  # synchronous, between two steps

    reached: list[int] = []

    async def worker() -> None:
        with scope:
            for i in range(5):
                reached.append(i)
                await trio.lowlevel.checkpoint()

    cutter = Cutter()
    trio.lowlevel.add_instrument(cutter)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, name="worker")
    finally:
        trio.lowlevel.remove_instrument(cutter)
    assert reached == [0, 1]  # the cancel after step 2 arrived at the next checkpoint
    assert steps[:4] == ["before", "after", "before", "after"]


async def test_the_task_tree_walk_finds_tasks_and_their_ancestry() -> None:
    async with trio.open_nursery() as outer:
        inner_task: list[trio.lowlevel.Task] = []

        async def parent() -> None:
            async with trio.open_nursery() as inner:
                inner.start_soon(child)
                await trio.sleep_forever()

        async def child() -> None:
            inner_task.append(trio.lowlevel.current_task())
            await trio.sleep_forever()

        outer.start_soon(parent, name="parent")
        await trio.testing.wait_all_tasks_blocked()
        tasks = list(all_tasks())
        (parent_task,) = [t for t in tasks if t.name == "parent"]
        assert inner_task[0] in tasks
        assert descends_from(inner_task[0], parent_task)
        assert not descends_from(parent_task, inner_task[0])
        outer.cancel_scope.cancel()


async def test_an_after_task_step_hook_sees_the_effective_deadline_of_the_task_that_yielded() -> None:
    """The kit tells a yield that delivers ``Cancelled`` from one in a shielded section by
    calling ``trio.current_effective_deadline()`` in ``after_task_step``: it must be the
    stepping task's. If trio ever runs hooks outside the task, this fails (and the kit
    would then treat every yield after a cut as delivering the cancel)."""
    seen: dict[str, list[float]] = {"cancelled": [], "shielded": []}

    class Peek(trio.abc.Instrument):
        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name in seen and not seen[task.name]:  # its first yield (not its exit)
                seen[task.name].append(trio.current_effective_deadline())

    async def cancelled() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await trio.sleep_forever()

    async def shielded() -> None:
        with trio.CancelScope() as outer:
            outer.cancel()
            with trio.CancelScope(shield=True):
                await trio.lowlevel.cancel_shielded_checkpoint()

    peek = Peek()
    trio.lowlevel.add_instrument(peek)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancelled, name="cancelled")
            nursery.start_soon(shielded, name="shielded")
    finally:
        trio.lowlevel.remove_instrument(peek)
    assert seen["cancelled"][0] == -math.inf
    assert seen["shielded"][0] == math.inf


def test_the_watcher_is_a_trio_instrument() -> None:
    assert isinstance(Watcher(), trio.abc.Instrument)


async def test_check_agent_works_under_the_real_clock_too() -> None:
    report = await check_agent(ScriptedAgent(), json.dumps({"script": [{"text": "a", "repeat": 3, "delay": 0.01}]}))
    report.raise_for_violations()
    assert len(report.cases) > 6


def test_the_agent_interface_is_public() -> None:
    assert navi_trio.Agent is navi_trio.agents.base.Agent
    assert navi_trio.RunContext is navi_trio.agents.base.RunContext
    assert testing.check_agent is check_agent

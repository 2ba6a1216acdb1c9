"""The bounds of CONTRACT section 4: a script is bounded before it plays, and every run's
log is bounded while it plays, whatever the agent.

A script like ``{"text": "x", "repeat": 10**9}`` from an anonymous caller once grew the
server by a gigabyte in under two seconds; these tests pin that it is now refused at once,
with an error naming the bound, and that no run starts for it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from navi_trio.agents.base import RunContext
from navi_trio.agents.scripted import ScriptBounds, ScriptedAgent
from navi_trio.broker import InProcessBroker
from navi_trio.errors import ScriptTooLarge
from navi_trio.events import TERMINAL_TYPES, check_grammar
from navi_trio.lifecycle import RunRequest
from navi_trio.runs import RunRegistry
from navi_trio.store.memory import MemoryStore

from .helpers import assert_grammar, open_server, run_events, script

SID = "s1"


def steps(*s: dict[str, Any]) -> list[Any]:
    return list(s)


# -- ScriptBounds (sans-IO) ------------------------------------------------------------


def test_a_billion_deltas_is_refused_naming_the_event_bound() -> None:
    with pytest.raises(ScriptTooLarge, match=r"1000000000 events \(max 100000, NAVI_SCRIPT_MAX_EVENTS\)"):
        ScriptBounds().check(steps({"text": "x", "repeat": 10**9}))


def test_every_bound_is_named_and_each_holds_at_its_limit() -> None:
    bounds = ScriptBounds(max_events=10, max_chars=100, max_seconds=60)
    # At each limit: allowed.
    bounds.check(steps({"text": "x" * 10, "repeat": 10}))  # 10 events, 100 chars
    bounds.check(steps({"text": "x", "repeat": 3, "delay": 20}, {"sleep": 10}, {"tool": "t", "delay": 10}))
    bounds.check(steps({"think": "a b c d"}, {"tool": "t"}, {"compress": True}, {"text": "x", "repeat": 2}))
    # One past each: refused, naming it.
    with pytest.raises(ScriptTooLarge, match="NAVI_SCRIPT_MAX_EVENTS"):
        bounds.check(steps({"think": "a b c d"}, {"tool": "t"}, {"compress": True}, {"text": "x", "repeat": 3}))
    with pytest.raises(ScriptTooLarge, match=r"101 characters .*NAVI_SCRIPT_MAX_CHARS"):
        bounds.check(steps({"text": "x" * 10, "repeat": 9}, {"text": "y" * 11}))
    with pytest.raises(ScriptTooLarge, match=r"61 seconds .*NAVI_SCRIPT_MAX_SECONDS"):
        bounds.check(steps({"text": "x", "repeat": 3, "delay": 20}, {"sleep": 21}))
    with pytest.raises(ScriptTooLarge, match="NAVI_SCRIPT_MAX_SECONDS"):
        bounds.check(steps({"sleep": float("inf")}))
    with pytest.raises(ScriptTooLarge, match="NAVI_SCRIPT_MAX_CHARS"):
        bounds.check(steps({"text": "", "repeat": 5, "stamp": True}))  # the stamps are text too


def test_steps_the_agent_refuses_count_for_nothing() -> None:
    # Playing them ends the run with the step's own error; they must not crash the count.
    ScriptBounds(max_events=1).check(
        steps("x", {"text": 3}, {"text": "x", "repeat": -5}, {"text": "x", "repeat": True}, {"sleep": "long"})
    )


async def test_the_agent_refuses_an_unbounded_script_even_played_directly() -> None:
    agent = ScriptedAgent(bounds=ScriptBounds(max_events=2))
    agent.check_message("not a script")  # plain text is the demonstration: always fine
    with pytest.raises(ScriptTooLarge):
        agent.check_message(script({"text": "x", "repeat": 3}))


# -- the registry: no run starts for a refused script ----------------------------------


async def test_registry_refuses_the_script_before_any_run_starts() -> None:
    async with trio.open_nursery() as nursery:
        store = MemoryStore()
        await store.create_session(SID, "t", None)
        reg = RunRegistry(nursery, store, ScriptedAgent(), broker=InProcessBroker())
        content = script({"text": "x", "repeat": 10**9})
        with pytest.raises(ScriptTooLarge, match="NAVI_SCRIPT_MAX_EVENTS"):
            reg.submit(RunRequest(SID, None, content, content))
        assert reg.active(SID) is None
        assert reg.runs == []
        await trio.testing.wait_all_tasks_blocked()
        assert store.messages.get(SID, []) == []  # not even the user's message
        assert not nursery.child_tasks


# -- the run's log: bounded for any agent ----------------------------------------------


class _Flood:
    """An agent that opens thinking, then over and over opens a tool (with sub-agent tools
    nested inside it), yields while they run, closes them and streams some text."""

    def __init__(self, thinking: int, tools: int, *, yield_in_tools: bool) -> None:
        self.thinking = thinking
        self.tools = tools
        self.yield_in_tools = yield_in_tools

    async def play(self, ctx: RunContext) -> None:
        for _ in range(self.thinking):
            ctx.emit_thinking("t")
        while True:
            for i in range(self.tools):
                ctx.emit_tool_started(f"tool{i}", {}, is_subagent=i > 0)
            if self.yield_in_tools:  # else quick tools: started and finished in one step
                await trio.lowlevel.checkpoint()
            for _ in range(self.tools):
                ctx.emit_tool_call("done", success=True)
            for _ in range(5):
                ctx.emit_text("x")
            await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("max_events", [4, 5, 6, 9, 20, 57])
@pytest.mark.parametrize(("thinking", "tools"), [(0, 0), (3, 0), (0, 1), (2, 3)])
@pytest.mark.parametrize("yield_in_tools", [True, False])
async def test_a_run_never_holds_more_than_max_run_events(
    autojump_clock: trio.testing.MockClock, max_events: int, thinking: int, tools: int, yield_in_tools: bool
) -> None:
    async with trio.open_nursery() as nursery:
        store = MemoryStore()
        await store.create_session(SID, "t", None)
        agent = _Flood(thinking, tools, yield_in_tools=yield_in_tools)
        reg = RunRegistry(nursery, store, agent, broker=InProcessBroker(), max_run_events=max_events)
        run = reg.submit(RunRequest(SID, None, "go", "go"))
        assert run is not None
        with trio.fail_after(10):
            await run.done.wait()
        evs = run.log.events
        assert len(evs) <= max_events
        check_grammar([(e.type, e.seq) for e in evs])
        assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
        assert sum(e.type in TERMINAL_TYPES for e in evs) == 1
        last = json.loads(evs[-1].wire)
        assert last["type"] == "error"
        assert last["message"] == (
            f"The answer reached the limit of {max_events} events (NAVI_MAX_RUN_EVENTS) and was ended."
        )
        (answer,) = [m for m in store.messages[SID] if m.id == run.answer_id]
        assert (answer.status, answer.content) == ("error", run.log.content)
        await trio.testing.wait_all_tasks_blocked()
        assert not nursery.child_tasks


# -- on the wire ------------------------------------------------------------------------


async def test_a_script_over_its_bounds_is_an_error_answer_and_no_run() -> None:
    with trio.fail_after(20):
        async with open_server() as server:
            sid = await server.new_session()
            async with server.connect(sid) as c:
                assert await c.recv() == {"type": "session_sync"}
                await c.send_message(script({"text": "x", "repeat": 10**9}))
                err = await c.recv()
                assert err["type"] == "error"
                assert "NAVI_SCRIPT_MAX_EVENTS" in err["message"]
                assert (await server.http.get(f"/sessions/{sid}")).json()["running"] is False
                # The connection is still usable, and the history holds nothing of it.
                await c.send_message(script({"text": "ok"}))
                got = await c.until_terminal()
            assert (await server.http.get(f"/sessions/{sid}/messages")).json()[0]["content"] == script({"text": "ok"})
    assert_grammar(got, merged=False)
    assert [e["type"] for e in run_events(got)] == ["stream_start", "stream_delta", "stream_end"]


async def test_the_bounds_come_from_the_settings() -> None:
    with trio.fail_after(20):
        async with open_server(script_max_events=50, max_run_events=30) as server:
            sid = await server.new_session()
            async with server.connect(sid) as c:
                assert await c.recv() == {"type": "session_sync"}
                await c.send_message(script({"text": "x", "repeat": 51}))
                err = await c.recv()
                assert err == {
                    "type": "error",
                    "message": "Script too large: 51 events (max 50, NAVI_SCRIPT_MAX_EVENTS).",
                }
                # Within the script's bound, past the run's: the run ends with an error.
                await c.send_message(script({"text": "x", "repeat": 50}))
                got = await c.until_terminal()
            (_, answer) = (await server.http.get(f"/sessions/{sid}/messages")).json()
    assert_grammar(got)
    evs = run_events(got)
    assert evs[-1]["type"] == "error"
    assert "limit of 30 events (NAVI_MAX_RUN_EVENTS)" in evs[-1]["message"]
    assert evs[-1]["seq"] <= 30
    assert (answer["status"], answer["content"]) == ("error", "x" * (evs[-1]["seq"] - 2))

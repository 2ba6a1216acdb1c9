"""Layer 1 with trio: RunRegistry and Run, driven directly (no ASGI), in virtual time.

A subscriber's outbox here is a real bounded ``trio.open_memory_channel`` standing in for
a connection (the edge). Every scenario checks the run's log against the contract grammar
and that no task is left in the server nursery (STYLE 4.4).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import pytest
import trio
import trio.testing

from navi_trio.agents.pacing import Pacer
from navi_trio.agents.scripted import ScriptedAgent
from navi_trio.broker import InProcessBroker
from navi_trio.errors import QueueFull, RunAlreadyActive, ShuttingDown
from navi_trio.events import TERMINAL_TYPES, Event, check_grammar
from navi_trio.fanout import Subscriber
from navi_trio.lifecycle import Run, RunRequest
from navi_trio.runs import RunRegistry
from navi_trio.store.base import Answer, MessageRecord
from navi_trio.store.memory import MemoryStore

SID = "s1"
LONG_TEXT = {"text": "w ", "repeat": 100, "delay": 1}
CRASH_MESSAGE_HINT = "Traceback"


def script(*steps: dict[str, Any]) -> str:
    return json.dumps({"script": list(steps)})


def req(session_id: str, content: str) -> RunRequest:
    return RunRequest(session_id, None, content, content)


class ChanOutbox:
    """The Outbox protocol over a real bounded memory channel (a connection stand-in)."""

    def __init__(self, size: int = 1000) -> None:
        self.send_ch, self.recv_ch = trio.open_memory_channel[Event | str](size)
        self.lagging: deque[Subscriber] = deque()
        self.wakes = 0

    def offer(self, item: Event | str) -> bool:
        try:
            self.send_ch.send_nowait(item)
        except trio.WouldBlock:
            return False
        return True

    def wake(self) -> None:
        self.wakes += 1

    def fall_behind(self, sub: Subscriber) -> None:
        self.lagging.append(sub)

    @property
    def behind(self) -> bool:
        return bool(self.lagging)

    def take_raw(self) -> list[Event | str]:
        out: list[Event | str] = []
        while True:
            try:
                out.append(self.recv_ch.receive_nowait())
            except trio.WouldBlock:
                return out

    def take(self) -> list[dict[str, Any]]:
        return [decode(item) for item in self.take_raw()]

    async def receive(self) -> dict[str, Any]:
        return decode(await self.recv_ch.receive())


class HookOutbox(ChanOutbox):
    """Calls ``hook(item)`` synchronously each time the run offers it an item."""

    def __init__(self, hook: Any, size: int = 1000) -> None:
        super().__init__(size)
        self.hook = hook

    def offer(self, item: Event | str) -> bool:
        ok = super().offer(item)
        self.hook(item)
        return ok


class Follower:
    """A connection following a session: subscribes its outbox to every run."""

    def __init__(self, outbox: ChanOutbox) -> None:
        self.outbox = outbox
        self.subs: list[Subscriber] = []
        self.closes: list[tuple[int, str]] = []

    def run_started(self, run: Run) -> None:
        self.subs.append(run.subscribe(self.outbox))

    def request_close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


class SlowSaveStore(MemoryStore):
    """A store whose final save takes ``save_delay`` seconds."""

    def __init__(self, save_delay: float) -> None:
        super().__init__()
        self.save_delay = save_delay
        self.saves: list[Answer] = []

    async def save_answer(self, answer: Answer) -> None:
        await trio.sleep(self.save_delay)
        self.saves.append(answer)
        await super().save_answer(answer)


def decode(item: Event | str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(item.wire if isinstance(item, Event) else item)
    return obj


def make_registry(
    server_nursery: trio.Nursery, store: MemoryStore | None = None, **kw: Any
) -> tuple[RunRegistry, MemoryStore]:
    store = MemoryStore() if store is None else store
    opts: dict[str, Any] = {"save_timeout_s": 2.0, "max_queued_runs": 2, **kw}
    return RunRegistry(server_nursery, store, ScriptedAgent(), broker=InProcessBroker(), **opts), store


def wire(run: Run) -> list[dict[str, Any]]:
    return [json.loads(e.wire) for e in run.log.events]


def deltas(events: list[dict[str, Any]], kind: str = "stream_delta") -> str:
    return "".join(e["delta"] for e in events if e["type"] == kind)


def assert_log_grammar(run: Run) -> None:
    """The run's own log: seq 1..n, stream_start first, exactly one terminal, last."""
    evs = run.log.events
    check_grammar([(e.type, e.seq) for e in evs])
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
    assert sum(e.type in TERMINAL_TYPES for e in evs) == 1
    assert run.log.terminal is evs[-1]


async def assert_no_tasks_left(server_nursery: trio.Nursery) -> None:
    """Inside the server nursery's block (after it, the set is always empty): once every
    task has settled, none of the server's is left running (STYLE 4.4)."""
    await trio.testing.wait_all_tasks_blocked()
    assert not server_nursery.child_tasks, server_nursery.child_tasks


def assert_settled(run: Run, reg: RunRegistry, server_nursery: trio.Nursery) -> None:
    assert run.done.is_set()
    assert run.settled
    assert_log_grammar(run)
    assert reg.active(run.session_id) is not run
    assert run.subscribers == []
    assert not server_nursery.child_tasks, server_nursery.child_tasks


def saved(store: MemoryStore, sid: str) -> list[MessageRecord]:
    return store.messages[sid]


def saved_answer(store: MemoryStore, run: Run) -> MessageRecord:
    (msg,) = [m for m in store.messages[run.session_id] if m.id == run.answer_id]
    return msg


def run_view(items: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The run events (those with a seq) among what a subscriber received."""
    return [(e["type"], e["seq"]) for e in items if "seq" in e]


async def new_session(store: MemoryStore, sid: str = SID) -> None:
    await store.create_session(sid, "t", None)


# -- stop ------------------------------------------------------------------------------


async def test_stop_during_text_step_saves_partial(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        outbox = ChanOutbox()
        follower = Follower(outbox)
        assert reg.follow(SID, follower) is None
        content = script(LONG_TEXT)
        t0 = trio.current_time()
        run = reg.submit(req(SID, content))
        assert run is not None
        assert reg.active(SID) is run
        await trio.sleep(3.5)  # virtual: deltas at t0+0, 1, 2, 3
        assert reg.stop(SID) is run
        await run.done.wait()
        assert trio.current_time() - t0 == 3.5  # the stop lands at once

        assert_settled(run, reg, server_nursery)
        events = wire(run)
        sent = deltas(events)
        assert sent == "w " * 4
        assert events[-1] == {"type": "stream_stopped", "seq": 6, "content": sent, "reason": "user"}
        assert run.log.content == sent
        assert run.stop_reason == "user"
        assert [(m.role, m.status, m.content) for m in saved(store, SID)] == [
            ("user", "complete", content),
            ("assistant", "stopped", sent),
        ]
        assert reg.active(SID) is None
        # The follower saw exactly the log, live, one frame per event.
        assert outbox.take() == events
        assert follower.subs[0].queued == run.log.last_seq
        await assert_no_tasks_left(server_nursery)


async def test_stop_during_async_tool_gives_cancelled_tool_call(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        run = reg.submit(req(SID, script({"text": "a"}, {"tool": "t", "args": {"k": 1}, "delay": 30})))
        assert run is not None
        await trio.sleep(5)
        assert run.log.tool_open
        reg.stop(SID)
        await run.done.wait()
        assert_settled(run, reg, server_nursery)
        events = wire(run)
        assert [e["type"] for e in events] == [
            "stream_start",
            "stream_delta",
            "tool_started",
            "tool_call",
            "stream_stopped",
        ]
        assert events[-2] == {
            "type": "tool_call",
            "seq": 4,
            "tool": "t",
            "args": {"k": 1},
            "result": "cancelled",
            "success": False,
            "is_subagent": False,
        }
        assert events[-1] == {"type": "stream_stopped", "seq": 5, "content": "a", "reason": "user"}
        answer = saved_answer(store, run)
        assert (answer.status, answer.content) == ("stopped", "a")
        assert answer.tool_calls == [{"tool": "t", "args": {"k": 1}, "result": "cancelled", "success": False}]
        await assert_no_tasks_left(server_nursery)


async def test_stop_before_first_checkpoint_still_saves_user_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stop right after submit (no checkpoint between: a double 'interrupt', or a stop
    racing the message) still ends the run properly, and the user's message is in the
    history together with its (empty) stopped answer: a run that emitted stream_start is
    never lost from the history."""
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        content = script(LONG_TEXT)
        run = reg.submit(req(SID, content))
        assert run is not None
        assert reg.stop(SID) is run
        await run.done.wait()
        assert_settled(run, reg, server_nursery)
        assert wire(run)[-1] == {"type": "stream_stopped", "seq": 2, "content": "", "reason": "user"}
        assert [(m.role, m.status, m.content) for m in saved(store, SID)] == [
            ("user", "complete", content),
            ("assistant", "stopped", ""),
        ]


@pytest.mark.parametrize(
    ("reasons", "status"),
    [(["deleted"], "stopped"), (["shutdown"], "interrupted"), (["user", "shutdown"], "stopped")],
    ids=["deleted", "shutdown", "first-reason-wins"],
)
async def test_stop_reasons(autojump_clock: trio.testing.MockClock, reasons: list[str], status: str) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        run = reg.submit(req(SID, script(LONG_TEXT)))
        assert run is not None
        await trio.sleep(1.5)
        for reason in reasons:
            assert reg.stop(SID, reason) is run
        await run.done.wait()
        assert_settled(run, reg, server_nursery)
        assert wire(run)[-1] == {"type": "stream_stopped", "seq": 4, "content": "w w ", "reason": reasons[0]}
        assert saved_answer(store, run).status == status
        await assert_no_tasks_left(server_nursery)


async def test_stop_when_last_delta_is_emitted(autojump_clock: trio.testing.MockClock) -> None:
    """The stop is issued synchronously while the run publishes its last delta."""
    reg: RunRegistry | None = None
    stops: list[Run | None] = []

    def hook(item: Event | str) -> None:
        if isinstance(item, Event) and item.type == "stream_delta" and item.seq == 4:
            assert reg is not None
            stops.append(reg.stop(SID))

    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        reg.follow(SID, Follower(HookOutbox(hook)))
        run = reg.submit(req(SID, script({"text": "a", "repeat": 3, "delay": 1})))
        assert run is not None
        await run.done.wait()
        assert stops == [run]
        assert_settled(run, reg, server_nursery)
        # The stop lands before the step's closing checkpoint: the run is stopped, with
        # every delta it emitted in its answer.
        assert wire(run)[-1] == {"type": "stream_stopped", "seq": 5, "content": "aaa", "reason": "user"}
        assert (saved_answer(store, run).status, saved_answer(store, run).content) == ("stopped", "aaa")
        assert reg.stop(SID) is None  # after the end: nothing to stop
        await assert_no_tasks_left(server_nursery)


async def test_stop_when_stream_end_is_emitted(autojump_clock: trio.testing.MockClock) -> None:
    """A stop that lands while the terminal stream_end is being published changes nothing."""
    reg: RunRegistry | None = None
    stops: list[Run | None] = []

    def hook(item: Event | str) -> None:
        if isinstance(item, Event) and item.type == "stream_end":
            assert reg is not None
            stops.append(reg.stop(SID))

    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        reg.follow(SID, Follower(HookOutbox(hook)))
        run = reg.submit(req(SID, script({"text": "a", "repeat": 3, "delay": 1})))
        assert run is not None
        await run.done.wait()
        assert stops == [run]
        assert_settled(run, reg, server_nursery)
        assert wire(run)[-1] == {"type": "stream_end", "seq": 5, "content": "aaa"}
        assert saved_answer(store, run).status == "complete"
        await assert_no_tasks_left(server_nursery)


async def test_stop_during_final_save(autojump_clock: trio.testing.MockClock) -> None:
    """Terminal written, answer still being saved: the run is still active; a stop then
    neither adds an event nor changes the saved status, and done waits for the save."""
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery, SlowSaveStore(save_delay=1.0))
        await new_session(store)
        outbox = ChanOutbox()
        reg.follow(SID, Follower(outbox))
        run = reg.submit(req(SID, script({"text": "a", "repeat": 2})))
        assert run is not None
        with trio.fail_after(5):
            while (await outbox.receive())["type"] != "stream_end":
                pass
        t_end = trio.current_time()
        assert reg.active(SID) is run
        assert not run.done.is_set()
        assert reg.stop(SID) is run
        await run.done.wait()
        assert trio.current_time() - t_end == 1.0
        assert_settled(run, reg, server_nursery)
        assert wire(run)[-1]["type"] == "stream_end"
        assert saved_answer(store, run).status == "complete"
        assert outbox.take() == []  # nothing after the terminal
        await assert_no_tasks_left(server_nursery)


@pytest.mark.parametrize("offset", [1.5, 2.0, 2.5, 3.0])
async def test_stop_racing_completion_in_time(autojump_clock: trio.testing.MockClock, offset: float) -> None:
    """Stop before, at the same virtual instant as, and after the last delta (t0+2)."""
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        t0 = trio.current_time()
        run = reg.submit(req(SID, script({"text": "a", "repeat": 3, "delay": 1})))
        assert run is not None
        await trio.sleep_until(t0 + offset)
        stopped = reg.stop(SID)
        assert stopped in (run, None)
        if stopped is None:
            assert run.done.is_set()
        await run.done.wait()
        assert_settled(run, reg, server_nursery)
        terminal = wire(run)[-1]
        assert terminal["content"] == run.log.content
        status = saved_answer(store, run).status
        if terminal["type"] == "stream_end":
            assert (status, terminal["content"]) == ("complete", "aaa")
        else:
            assert terminal["type"] == "stream_stopped"
            assert stopped is run
            assert status == "stopped"
        if offset < 2.0:
            assert terminal == {"type": "stream_stopped", "seq": 4, "content": "aa", "reason": "user"}
        if offset > 2.0:
            assert stopped is None
            assert terminal["type"] == "stream_end"
        assert reg.stop(SID) is None
        await assert_no_tasks_left(server_nursery)


# -- errors ----------------------------------------------------------------------------


async def test_agent_error_is_terminal_error(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        run = reg.submit(req(SID, script({"text": "part"}, {"error": "boom"}, {"text": "never"})))
        assert run is not None
        await run.done.wait()
        assert_settled(run, reg, server_nursery)
        assert wire(run) == [
            {"type": "stream_start", "seq": 1, "run_id": run.id},
            {"type": "stream_delta", "seq": 2, "delta": "part"},
            {"type": "error", "seq": 3, "message": "boom"},
        ]
        answer = saved_answer(store, run)
        assert (answer.status, answer.content) == ("error", "part")


async def test_agent_crash_is_terminal_error_and_server_carries_on(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        await new_session(store, "s2")
        run = reg.submit(req(SID, script({"text": "x"}, {"crash": True})))
        assert run is not None
        await run.done.wait()
        assert_settled(run, reg, server_nursery)
        terminal = wire(run)[-1]
        assert terminal["type"] == "error"
        assert terminal["message"]
        assert CRASH_MESSAGE_HINT not in terminal["message"]
        assert "scripted crash" not in terminal["message"]  # internals are logged, not sent
        answer = saved_answer(store, run)
        assert (answer.status, answer.content) == ("error", "x")
        # The server nursery is intact: another session's run works.
        run2 = reg.submit(req("s2", script({"text": "ok"})))
        assert run2 is not None
        await run2.done.wait()
        assert_settled(run2, reg, server_nursery)
        assert wire(run2)[-1] == {"type": "stream_end", "seq": 3, "content": "ok"}
        # ... and so does the crashed session.
        run3 = reg.submit(req(SID, script({"text": "again"})))
        assert run3 is not None
        await run3.done.wait()
        assert wire(run3)[-1]["type"] == "stream_end"
        await assert_no_tasks_left(server_nursery)


async def test_bad_script_step_is_terminal_error(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        run = reg.submit(req(SID, script({"dance": True})))
        assert run is not None
        await run.done.wait()
        assert_settled(run, reg, server_nursery)
        assert wire(run)[-1] == {"type": "error", "seq": 2, "message": "Script step 0 has no known action"}
        assert saved_answer(store, run).status == "error"


# -- shutdown --------------------------------------------------------------------------


async def test_outer_cancellation_stops_with_reason_shutdown(autojump_clock: trio.testing.MockClock) -> None:
    outbox = ChanOutbox()
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        reg.follow(SID, Follower(outbox))
        t0 = trio.current_time()
        run = reg.submit(req(SID, script(LONG_TEXT)))
        assert run is not None
        await trio.sleep(2.5)
        server_nursery.cancel_scope.cancel()  # the server going away
    assert trio.current_time() - t0 == 2.5
    assert run.done.is_set()
    assert run.settled
    assert_log_grammar(run)
    assert wire(run)[-1] == {"type": "stream_stopped", "seq": 5, "content": "w " * 3, "reason": "shutdown"}
    answer = saved_answer(store, run)
    assert (answer.status, answer.content) == ("interrupted", "w " * 3)
    assert reg.active(SID) is None
    assert outbox.take() == wire(run)


async def test_outer_cancellation_during_tool_still_saves(autojump_clock: trio.testing.MockClock) -> None:
    """Shutdown while a tool runs and with a slow store: the tool gets its cancelled
    tool_call and the shielded save still completes."""
    store = SlowSaveStore(save_delay=1.0)
    async with trio.open_nursery() as server_nursery:
        reg, _ = make_registry(server_nursery, store)
        await new_session(store)
        run = reg.submit(req(SID, script({"text": "a"}, {"tool": "t", "delay": 30})))
        assert run is not None
        await trio.sleep(1)
        cancelled_at = trio.current_time()
        server_nursery.cancel_scope.cancel()
    assert_log_grammar(run)
    assert [e["type"] for e in wire(run)][-2:] == ["tool_call", "stream_stopped"]
    assert wire(run)[-1]["reason"] == "shutdown"
    assert [(a.status, a.content) for a in store.saves] == [("interrupted", "a")]
    assert saved_answer(store, run).status == "interrupted"
    assert trio.current_time() - cancelled_at == 1.0  # the shielded save, and no more


async def test_save_that_hangs_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery, SlowSaveStore(save_delay=1000.0), save_timeout_s=2.0)
        await new_session(store)
        run = reg.submit(req(SID, script({"text": "a"})))
        assert run is not None
        t0 = trio.current_time()
        await run.done.wait()
        assert trio.current_time() - t0 == 2.0
        assert_settled(run, reg, server_nursery)
        assert reg.active(SID) is None
        await assert_no_tasks_left(server_nursery)


async def test_drain_gives_grace_then_stops_long_run(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        t0 = trio.current_time()
        run = reg.submit(req(SID, script(LONG_TEXT)))
        assert run is not None
        for text in ("queued one", "queued two"):
            assert reg.submit(req(SID, script({"text": text})), if_running="enqueue") is None
        await trio.sleep(0.5)
        await reg.drain(5.0)
        assert trio.current_time() - t0 == 5.5  # the grace, not more
        assert reg.closing.is_set()
        assert reg.closed.is_set()
        assert run.done.is_set()
        assert_settled(run, reg, server_nursery)
        # deltas at t0+0..5: the run kept going during the grace period
        assert wire(run)[-1] == {"type": "stream_stopped", "seq": 8, "content": "w " * 6, "reason": "shutdown"}
        answer = saved_answer(store, run)
        assert (answer.status, answer.content) == ("interrupted", "w " * 6)
        # The queued requests were not started, and not lost either: each message is
        # saved, in the order sent, with an empty interrupted answer.
        assert reg.active(SID) is None
        assert [(m.role, m.status, m.content) for m in saved(store, SID)] == [
            ("user", "complete", script(LONG_TEXT)),
            ("assistant", "interrupted", "w " * 6),
            ("user", "complete", script({"text": "queued one"})),
            ("assistant", "interrupted", ""),
            ("user", "complete", script({"text": "queued two"})),
            ("assistant", "interrupted", ""),
        ]
        with pytest.raises(ShuttingDown):
            reg.submit(req(SID, script({"text": "late"})))
        await assert_no_tasks_left(server_nursery)


async def test_drain_lets_short_run_complete(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        t0 = trio.current_time()
        run = reg.submit(req(SID, script({"text": "x", "repeat": 3, "delay": 1})))
        assert run is not None
        await reg.drain(10.0)
        assert trio.current_time() - t0 == 2.0  # returns as soon as the run is done
        assert reg.closed.is_set()
        assert_settled(run, reg, server_nursery)
        assert wire(run)[-1] == {"type": "stream_end", "seq": 5, "content": "xxx"}
        assert saved_answer(store, run).status == "complete"
        assert run.stop_reason is None
        await assert_no_tasks_left(server_nursery)


async def test_drain_with_no_runs_returns_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, _ = make_registry(server_nursery)
        t0 = trio.current_time()
        await reg.drain(10.0)
        assert trio.current_time() == t0
        assert reg.closed.is_set()
        await assert_no_tasks_left(server_nursery)


# -- submit ----------------------------------------------------------------------------


async def test_submit_is_atomic_and_rejects_second_run(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        outbox = ChanOutbox()
        follower = Follower(outbox)
        reg.follow(SID, follower)
        with trio.testing.assert_no_checkpoints():
            run = reg.submit(req(SID, script({"text": "a", "repeat": 3, "delay": 1})))
            assert run is not None
            # Registered, announced and subscribed before submit returned.
            assert reg.active(SID) is run
            assert [e.type for e in run.log.events] == ["stream_start"]
            assert [s.run for s in follower.subs] == [run]
            with pytest.raises(RunAlreadyActive) as exc_info:
                reg.submit(req(SID, script({"text": "b"})))
            assert exc_info.value.session_id == SID
        assert reg.active(SID) is run
        assert reg.follow(SID, Follower(ChanOutbox())) is run
        await run.done.wait()
        assert_settled(run, reg, server_nursery)
        assert wire(run)[-1]["content"] == "aaa"  # the rejected request changed nothing
        assert [m.role for m in saved(store, SID)] == ["user", "assistant"]
        await assert_no_tasks_left(server_nursery)


async def test_concurrent_submits_start_exactly_one_run(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        go = trio.Event()
        started: list[Run] = []
        rejected: list[int] = []

        async def client(i: int) -> None:
            await go.wait()
            try:
                run = reg.submit(req(SID, script({"text": f"c{i}"})))
            except RunAlreadyActive:
                rejected.append(i)
            else:
                assert run is not None
                started.append(run)

        async with trio.open_nursery() as clients:
            for i in range(5):
                clients.start_soon(client, i)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
        assert len(started) == 1
        assert len(rejected) == 4
        await started[0].done.wait()
        assert_settled(started[0], reg, server_nursery)
        await assert_no_tasks_left(server_nursery)


async def test_enqueue_starts_right_after_and_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)  # max_queued_runs=2
        await new_session(store)
        outbox = ChanOutbox()
        follower = Follower(outbox)
        reg.follow(SID, follower)
        t0 = trio.current_time()
        first = reg.submit(req(SID, script({"text": "1", "repeat": 3, "delay": 1})))
        assert first is not None
        assert reg.submit(req(SID, script({"text": "2", "repeat": 2, "delay": 1})), if_running="enqueue") is None
        assert reg.submit(req(SID, script({"text": "3"})), if_running="enqueue") is None
        with pytest.raises(QueueFull):
            reg.submit(req(SID, script({"text": "4"})), if_running="enqueue")
        assert reg.active(SID) is first

        await first.done.wait()
        assert trio.current_time() - t0 == 2.0
        second = reg.active(SID)
        assert second is not None
        assert second is not first
        assert next(e.type for e in second.log.events) == "stream_start"
        await second.done.wait()
        third = reg.active(SID)
        assert third is not None
        assert third not in (first, second)
        await third.done.wait()
        assert trio.current_time() - t0 == 3.0
        assert reg.active(SID) is None
        for run in (first, second, third):
            assert_settled(run, reg, server_nursery)
        assert [r.log.content for r in (first, second, third)] == ["111", "22", "3"]

        # The follower saw the three runs one after another, each whole, never interleaved.
        got = outbox.take()
        starts = [i for i, e in enumerate(got) if e["type"] == "stream_start"]
        terminals = [i for i, e in enumerate(got) if e["type"] in TERMINAL_TYPES]
        assert len(starts) == len(terminals) == 3
        assert starts[0] < terminals[0] < starts[1] < terminals[1] < starts[2] < terminals[2]
        assert [got[i]["run_id"] for i in starts] == [first.id, second.id, third.id]
        for k in range(3):
            check_grammar(run_view(got[starts[k] : terminals[k] + 1]))
        msgs = saved(store, SID)
        assert [(m.role, m.status) for m in msgs] == [("user", "complete"), ("assistant", "complete")] * 3
        assert [m.content for m in msgs if m.role == "assistant"] == ["111", "22", "3"]
        # The queue is free again.
        assert reg.submit(req(SID, script({"text": "5"}))) is not None
        await reg.drain(5)
        await assert_no_tasks_left(server_nursery)


async def test_interrupt_stops_active_then_starts_new(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        outbox = ChanOutbox()
        reg.follow(SID, Follower(outbox))
        first = reg.submit(req(SID, script(LONG_TEXT)))
        assert first is not None
        assert reg.submit(req(SID, script({"text": "queued"})), if_running="enqueue") is None
        await trio.sleep(2.5)
        t_int = trio.current_time()
        assert reg.submit(req(SID, script({"text": "new", "repeat": 2, "delay": 1})), if_running="interrupt") is None
        assert first.stop_reason == "user"
        await first.done.wait()
        assert trio.current_time() == t_int
        assert_log_grammar(first)
        assert wire(first)[-1] == {"type": "stream_stopped", "seq": 5, "content": "w " * 3, "reason": "user"}
        assert saved_answer(store, first).status == "stopped"
        second = reg.active(SID)
        assert second is not None
        assert second is not first
        await second.done.wait()
        assert second.log.content == "newnew"  # the interrupting message goes first
        third = reg.active(SID)
        assert third is not None
        await third.done.wait()
        assert third.log.content == "queued"
        for run in (first, second, third):
            assert_settled(run, reg, server_nursery)
        got = outbox.take()
        assert [e["run_id"] for e in got if e["type"] == "stream_start"] == [first.id, second.id, third.id]
        assert [e["type"] for e in got if e["type"] in TERMINAL_TYPES] == [
            "stream_stopped",
            "stream_end",
            "stream_end",
        ]
        assert [(m.role, m.status) for m in saved(store, SID)][1::2] == [
            ("assistant", "stopped"),
            ("assistant", "complete"),
            ("assistant", "complete"),
        ]
        await assert_no_tasks_left(server_nursery)


async def test_submit_after_drain_begins_raises_shutting_down(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        await new_session(store, "s2")
        run = reg.submit(req(SID, script(LONG_TEXT)))
        assert run is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reg.drain, 3.0)
            await trio.testing.wait_all_tasks_blocked()
            assert reg.closing.is_set()
            assert not reg.closed.is_set()
            assert reg.active(SID) is run  # still in its grace period
            for sid, mode in ((SID, "reject"), (SID, "enqueue"), (SID, "interrupt"), ("s2", "reject")):
                with pytest.raises(ShuttingDown):
                    reg.submit(req(sid, script({"text": "no"})), if_running=mode)
            assert run.stop_reason is None  # the refused interrupt did not stop it
        assert reg.closed.is_set()
        assert_settled(run, reg, server_nursery)
        assert wire(run)[-1]["reason"] == "shutdown"
        assert "s2" not in store.messages or store.messages["s2"] == []
        await assert_no_tasks_left(server_nursery)


# -- slow subscribers ------------------------------------------------------------------

MIXED = (
    {"think": "a b c"},
    {"text": "w ", "repeat": 20, "delay": 1},
    {"tool": "t"},
    {"text": "z", "repeat": 5, "delay": 1},
)


async def timed_run(reg: RunRegistry, sid: str) -> tuple[Run, float]:
    t0 = trio.current_time()
    run = reg.submit(req(sid, script(*MIXED)))
    assert run is not None
    await run.done.wait()
    return run, trio.current_time() - t0


async def test_lagging_subscriber_does_not_slow_run_and_catches_up(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        for sid in ("base", SID):
            await new_session(store, sid)
        base_run, base_elapsed = await timed_run(reg, "base")
        assert base_elapsed == 23.0

        slow = ChanOutbox(size=2)  # nobody reads it until we catch up by hand
        fast = ChanOutbox()
        reg.follow(SID, Follower(slow))
        fast_follower = Follower(fast)
        reg.follow(SID, fast_follower)

        received: list[dict[str, Any]] = []
        t0 = trio.current_time()
        run = reg.submit(req(SID, script(*MIXED)))
        assert run is not None
        (sub,) = [s for s in run.subscribers if s.outbox is slow]
        await trio.sleep(8.5)
        assert sub.lagging
        assert list(slow.lagging) == [sub]
        assert slow.recv_ch.statistics().current_buffer_used == 2  # bounded: no more is held for it

        def catch_up() -> None:
            received.extend(slow.take())
            while (frame := sub.next_catch_up_frame()) is not None:
                received.append(json.loads(frame))
            slow.lagging.clear()  # what the connection's writer does once caught up
            assert not sub.lagging

        catch_up()  # mid-run: re-armed, live events flow again until it is full again
        n_mid = len(received)
        await run.done.wait()
        assert trio.current_time() - t0 == base_elapsed  # not slowed
        assert sub.lagging  # fell behind again
        catch_up()
        assert len(received) > n_mid

        assert_settled(run, reg, server_nursery)
        assert_settled(base_run, reg, server_nursery)
        view = run_view(received)
        check_grammar(view)
        seqs = [s for _, s in view]
        assert seqs == sorted(set(seqs))
        assert run.log.terminal is not None
        assert seqs[-1] == run.log.terminal.seq
        assert deltas(received) == run.log.content == "w " * 20 + "z" * 5
        assert deltas(received, "thinking_delta") == run.log.thinking_text
        assert len(received) < len(run.log.events)  # deltas were merged
        # Non-delta events are never merged away.
        for kind in ("stream_start", "thinking_end", "tool_started", "tool_call", "stream_end"):
            assert [e for e in received if e["type"] == kind] == [e for e in wire(run) if e["type"] == kind]
        # The fast subscriber got every event live, unmerged, unaffected by the slow one.
        assert fast.take() == wire(run)
        assert not fast_follower.subs[0].lagging
        await assert_no_tasks_left(server_nursery)


async def test_replay_mid_run_then_live(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        run = reg.submit(
            req(
                SID,
                script(
                    {"think": "a b"},
                    {"text": "x", "repeat": 3},
                    {"tool": "t"},
                    {"text": "y", "repeat": 100, "delay": 1},
                ),
            )
        )
        assert run is not None
        await trio.sleep(3.5)  # y at t0+0..3: seq 10..13
        n = run.log.last_seq
        assert n == 13
        outbox = ChanOutbox()
        with trio.testing.assert_no_checkpoints():
            sub = run.subscribe(outbox, replay=True)
        assert sub.lagging
        assert list(outbox.lagging) == [sub]
        assert outbox.wakes == 1
        await trio.sleep(2)  # two more deltas while it has not caught up yet
        assert outbox.take() == []  # a lagging reader gets nothing pushed
        got: list[dict[str, Any]] = []
        while (frame := sub.next_catch_up_frame()) is not None:
            got.append(json.loads(frame))
        outbox.lagging.clear()
        types = [e["type"] for e in got]
        assert types[:2] == ["stream_start", "replay_start"]
        assert got[0] == {"type": "stream_start", "seq": 1, "run_id": run.id}
        end = types.index("replay_end")
        replayed = got[2:end]
        assert got[1]["count"] == len(replayed) == 6
        assert [e["seq"] for e in replayed] == [3, 4, 7, 8, 9, n]
        assert all(e["seq"] <= n for e in replayed)
        assert [e["seq"] for e in got[end + 1 :]] == [15]  # what came during the replay, merged
        await trio.sleep(1)
        live = outbox.take()
        assert [(e["type"], e["seq"]) for e in live] == [("stream_delta", 16)]
        reg.stop(SID)
        await run.done.wait()
        after_stop = outbox.take()
        assert [e["type"] for e in after_stop] == ["stream_stopped", "session_sync"]
        everything = got + live + after_stop
        check_grammar(run_view(everything))
        assert deltas(everything) == run.log.content
        assert deltas(everything, "thinking_delta") == run.log.thinking_text
        assert everything[-1] == {"type": "session_sync"}
        assert_settled(run, reg, server_nursery)
        await assert_no_tasks_left(server_nursery)


@pytest.mark.parametrize("after", [1, 3, 5, 6])
async def test_resume_after_n_gives_only_later_events(autojump_clock: trio.testing.MockClock, after: int) -> None:
    async with trio.open_nursery() as server_nursery:
        reg, store = make_registry(server_nursery)
        await new_session(store)
        run = reg.submit(req(SID, script(LONG_TEXT)))
        assert run is not None
        await trio.sleep(4.5)  # seq 1..6
        assert run.log.last_seq == 6
        outbox = ChanOutbox()
        sub = run.subscribe(outbox, after=after, replay=True)
        got: list[dict[str, Any]] = []
        while (frame := sub.next_catch_up_frame()) is not None:
            got.append(json.loads(frame))
        outbox.lagging.clear()
        assert got[0] == json.loads(run.log.events[0].wire)  # stream_start, seq 1
        assert got[1]["type"] == "replay_start"
        assert got[-1] == {"type": "replay_end"}
        replayed = got[2:-1]
        assert got[1]["count"] == len(replayed) == (1 if after < 6 else 0)
        assert all(e["seq"] > after for e in replayed)
        assert deltas(replayed) == "".join(e.delta or "" for e in run.log.events[after:])
        await trio.sleep(1)
        reg.stop(SID)
        await run.done.wait()
        rest = outbox.take()
        assert [e["type"] for e in rest] == ["stream_delta", "stream_stopped", "session_sync"]
        seqs = [e["seq"] for e in replayed + rest if "seq" in e]
        assert seqs == sorted(set(seqs))
        assert seqs[0] > after
        assert seqs[-1] == run.log.last_seq
        assert "w " * (after - 1) + deltas(replayed + rest) == run.log.content
        assert_settled(run, reg, server_nursery)
        await assert_no_tasks_left(server_nursery)


# -- threads (real clock: STYLE 4.5) ---------------------------------------------------


async def test_stop_during_thread_tool_returns_promptly() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as server_nursery:
            reg, store = make_registry(server_nursery)
            await new_session(store)
            outbox = ChanOutbox()
            reg.follow(SID, Follower(outbox))
            run = reg.submit(req(SID, script({"tool": "slow", "delay": 30, "thread": True})))
            assert run is not None
            while (await outbox.receive())["type"] != "tool_started":
                pass
            reg.stop(SID)
            with trio.fail_after(1):
                await run.done.wait()
            assert_settled(run, reg, server_nursery)
            assert [e["type"] for e in wire(run)][-2:] == ["tool_call", "stream_stopped"]
            assert wire(run)[-2]["result"] == "cancelled"
            assert wire(run)[-2]["success"] is False
            assert saved_answer(store, run).status == "stopped"
            await assert_no_tasks_left(server_nursery)


async def test_pacer_wakes_at_the_deadlines_and_forgets_cancelled_sleeps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sleepers wake at their deadlines, in order; a sleep cancelled while parked, or
    before it parks, raises ``Cancelled`` at once and is never woken later."""
    pacer = Pacer()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, deadline: float) -> None:
        await pacer.sleep_until(deadline)
        woke.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pacer.serve)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        nursery.start_soon(sleeper, "b", t0 + 2.0)
        nursery.start_soon(sleeper, "a", t0 + 1.0)
        async with trio.open_nursery() as inner:
            inner.start_soon(sleeper, "cancelled", t0 + 1.5)
            await trio.testing.wait_all_tasks_blocked()
            inner.cancel_scope.cancel()
        with trio.CancelScope() as early:
            early.cancel()
            await pacer.sleep_until(t0 + 0.5)
        assert early.cancelled_caught
        await trio.sleep_until(t0 + 3.0)
        assert woke == [("a", t0 + 1.0), ("b", t0 + 2.0)]
        nursery.cancel_scope.cancel()

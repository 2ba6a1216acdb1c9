"""The run lifecycle: the one decision of how a run ends, and its guarded states."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from navi_trio.agents.scripted import ScriptedAgent
from navi_trio.broker import InProcessBroker
from navi_trio.errors import LifecycleError
from navi_trio.fanout import Subscriber
from navi_trio.lifecycle import WIRE_GIVE_UP_S, Ending, How, Run, RunRequest, RunState, ending
from navi_trio.runs import RunRegistry
from navi_trio.store.base import Answer
from navi_trio.store.memory import MemoryStore

from .broker_conformance import RecordingOutbox
from .helpers import Server, script


def new_run() -> Run:
    run = Run(RunRequest("s", None, "hi", "hi"))
    run.start()
    return run


@pytest.mark.parametrize(
    ("how", "stop_reason", "failure", "message", "expected"),
    [
        (How.COMPLETED, None, None, None, Ending("stream_end", "complete")),
        # A stop that came too late to cut the agent short: it completed.
        (How.COMPLETED, "user", None, None, Ending("stream_end", "complete")),
        (How.CANCELLED, "user", None, None, Ending("stream_stopped", "stopped", reason="user")),
        (How.CANCELLED, "deleted", None, None, Ending("stream_stopped", "stopped", reason="deleted")),
        (How.CANCELLED, "shutdown", None, None, Ending("stream_stopped", "interrupted", reason="shutdown")),
        (How.CANCELLED, None, None, None, Ending("stream_stopped", "stopped", reason="user")),
        (How.CANCELLED, None, "Storage error: x", None, Ending("error", "error", message="Storage error: x")),
        (How.FAILED, "user", None, "boom", Ending("error", "error", message="boom")),
        (How.ABANDONED, None, None, None, Ending("stream_stopped", "interrupted", reason="shutdown")),
        (How.ABANDONED, "user", None, None, Ending("stream_stopped", "stopped", reason="user")),
        (How.GONE, None, None, None, Ending("stream_stopped", "stopped", reason="deleted")),
    ],
)
def test_ending_decides_terminal_and_status(
    how: How, stop_reason: str | None, failure: str | None, message: str | None, expected: Ending
) -> None:
    assert ending(how, stop_reason=stop_reason, failure=failure, message=message) == expected


async def test_states_in_order_and_guarded() -> None:
    run = new_run()
    assert run.state is RunState.STARTING
    assert not run.over
    run.play()
    with pytest.raises(LifecycleError):
        run.play()  # once
    with pytest.raises(LifecycleError):
        run.settle()  # not before its end
    run.cancel("deleted")
    run.end(How.CANCELLED)
    assert run.state is RunState.ENDED
    assert run.over
    assert not run.settled
    assert run.status == "stopped"
    assert json.loads(run.log.events[-1].wire)["reason"] == "deleted"
    with pytest.raises(LifecycleError):
        run.end(How.COMPLETED)  # one terminal event
    run.cancel("shutdown")
    assert run.stop_reason == "deleted"
    run.settle()
    assert run.settled
    assert run.done.is_set()


async def test_a_stop_after_the_end_keeps_the_reason_it_ended_with() -> None:
    run = new_run()
    run.end(How.COMPLETED)
    run.cancel("user")
    run.fail("Storage error: x")
    assert run.stop_reason is None
    assert run.failure is None
    assert run.status == "complete"


async def test_no_armed_writer_means_nothing_to_wait_for() -> None:
    run = new_run()
    run.end(How.COMPLETED)
    with trio.fail_after(0.01):  # below WIRE_GIVE_UP_S: it did not time out
        await run.on_the_wire()


# -- the terminal event on the wire, then the save ------------------------------------------


class TimedSaveStore(MemoryStore):
    """Records the time each final save begins."""

    def __init__(self) -> None:
        super().__init__()
        self.save_started: list[float] = []

    async def save_answer(self, answer: Answer) -> None:
        self.save_started.append(trio.current_time())
        await super().save_answer(answer)


class WireFollower:
    """Follows with an outbox whose writer reports sends (as a Connection does), when the
    test says."""

    def __init__(self, outbox: RecordingOutbox) -> None:
        self.outbox = outbox
        self.user_id = None
        self.subs: list[Subscriber] = []

    def run_started(self, run: Run) -> None:
        sub = run.subscribe(self.outbox)
        sub.reports_wire = True
        self.subs.append(sub)

    def request_close(self, code: int, reason: str) -> None:
        pass


async def run_with_writer(
    writer_delay: float | None, outbox_size: int = 100
) -> tuple[Run, TimedSaveStore, WireFollower, float]:
    """One short run followed by a reporting outbox whose writer sends the terminal event
    ``writer_delay`` after it is published (None: never); returns the end time too."""
    store = TimedSaveStore()
    await store.create_session("s", "t", None)
    async with trio.open_nursery() as nursery:
        reg = RunRegistry(nursery, store, ScriptedAgent(), broker=InProcessBroker(), save_timeout_s=2.0)
        follower = WireFollower(RecordingOutbox(outbox_size))
        reg.follow("s", follower)
        text = json.dumps({"script": [{"text": "a", "repeat": 3}]})
        run = reg.submit(RunRequest("s", None, text, text))
        assert run is not None
        while not run.over:  # noqa: ASYNC110 (the run's end is not an event: poll it, in virtual time)
            await trio.sleep(0.001)
        terminal = run.log.terminal
        assert terminal is not None
        t_end = terminal.t
        if writer_delay is not None:
            await trio.sleep_until(t_end + writer_delay)
            (sub,) = follower.subs
            sub.on_wire()
        await run.done.wait()
    return run, store, follower, t_end


async def test_the_save_waits_for_the_writer_to_send_the_terminal_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run, store, _, t_end = await run_with_writer(0.1)
    assert store.save_started == [pytest.approx(t_end + 0.1)]
    assert run.wire.flushed.is_set()
    assert run.wire.pending == 0


async def test_a_writer_that_never_sends_is_given_up_on(autojump_clock: trio.testing.MockClock) -> None:
    run, store, _, t_end = await run_with_writer(None)
    assert store.save_started == [pytest.approx(t_end + WIRE_GIVE_UP_S)]
    assert run.status == "complete"


async def test_a_lagging_reader_is_not_waited_for(autojump_clock: trio.testing.MockClock) -> None:
    _, store, follower, t_end = await run_with_writer(None, outbox_size=2)
    (sub,) = follower.subs
    assert sub.lagging
    assert store.save_started == [pytest.approx(t_end)]


async def test_a_real_connection_reports_the_terminal_event_on_the_wire(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    """On a real server the save follows the client's writer, not the give-up bound."""
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            await c.send_message(script({"text": "w", "repeat": 3}, {"sleep": 0.01}))
            assert (await c.recv())["type"] == "stream_start"
            run = server.registry.active(sid)
            assert run is not None
            await c.until_terminal()
            await run.done.wait()
            assert run.wire.flushed.is_set()
            terminal = run.log.terminal
            assert terminal is not None
            assert trio.current_time() - terminal.t < WIRE_GIVE_UP_S

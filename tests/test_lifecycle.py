"""The run lifecycle: the one decision of how a run ends, and its guarded states."""

from __future__ import annotations

import json

import pytest
import trio

from navi_trio.errors import LifecycleError
from navi_trio.lifecycle import Ending, How, Run, RunRequest, RunState, ending


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
    run._enter(RunState.PLAYING)
    with pytest.raises(LifecycleError):
        run._enter(RunState.STARTING)
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

"""Admission (sans-IO): what a message does when its session has a run."""

from __future__ import annotations

import pytest

from navi_trio.admission import START, Admit, Queued, admit, interrupts_successor
from navi_trio.errors import QueueFull, RunAlreadyActive, ShuttingDown
from navi_trio.lifecycle import RunRequest


def q(content: str, interrupted: bool = False) -> Queued:
    return Queued(RunRequest("s", None, content, content), interrupted=interrupted)


def decide(if_running: str, queue: list[Queued] | None = None, **state: bool) -> Admit:
    opts = {"closing": False, "active": True, "active_over": False, **state}
    return admit("s", if_running, queue=queue or [], max_queued=2, **opts)


@pytest.mark.parametrize("if_running", ["reject", "interrupt", "enqueue"])
def test_no_active_run_starts_now(if_running: str) -> None:
    assert decide(if_running, active=False) == START


@pytest.mark.parametrize("if_running", ["reject", "interrupt", "enqueue"])
def test_shutdown_refuses_everything(if_running: str) -> None:
    with pytest.raises(ShuttingDown):
        decide(if_running, active=False, closing=True)


def test_reject_while_running() -> None:
    with pytest.raises(RunAlreadyActive) as info:
        decide("reject")
    assert info.value.session_id == "s"


@pytest.mark.parametrize("if_running", ["reject", "interrupt", "enqueue"])
def test_a_run_that_is_over_only_saves_so_the_message_waits_for_it(if_running: str) -> None:
    assert decide(if_running, active_over=True) == Admit(at=0)


def test_a_run_that_is_over_with_a_queue_behind_it_is_still_running_to_admission() -> None:
    with pytest.raises(RunAlreadyActive):
        decide("reject", [q("1")], active_over=True)
    assert decide("enqueue", [q("1")], active_over=True) == Admit(at=1)


def test_enqueue_goes_to_the_back() -> None:
    assert decide("enqueue") == Admit(at=0)
    assert decide("enqueue", [q("1")]) == Admit(at=1)


def test_interrupt_goes_next_behind_earlier_interrupts_and_stops_the_run() -> None:
    assert decide("interrupt") == Admit(at=0, interrupted=True)
    assert decide("interrupt", [q("1")]) == Admit(at=0, interrupted=True)
    assert decide("interrupt", [q("i", interrupted=True)]) == Admit(at=1, interrupted=True)


@pytest.mark.parametrize("if_running", ["interrupt", "enqueue"])
def test_the_queue_is_bounded(if_running: str) -> None:
    with pytest.raises(QueueFull, match=r"max 2"):
        decide(if_running, [q("1"), q("2")])


def test_successor_interrupted_by_the_one_behind_it() -> None:
    assert not interrupts_successor([])
    assert not interrupts_successor([q("1")])
    assert interrupts_successor([q("i", interrupted=True), q("1")])

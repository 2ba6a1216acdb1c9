"""Admission: what becomes of a message sent while its session has a run (sans-IO).

A session has at most one active run and a bounded queue of messages waiting for it.
``if_running`` says what a message does when a run is active (CONTRACT section 3):

- ``reject``: refused with "already running";
- ``enqueue``: waits at the back of the queue;
- ``interrupt``: stops the active run and goes next, behind interrupts already waiting
  (each of those will start and be stopped in turn, so every message keeps its place).

A run whose terminal event is out is over to the client: a message then waits only for
its save, whatever ``if_running`` says. The queue is bounded; shutdown refuses everything.
Plain synchronous code, so the decision and the registration that follows it happen with
no checkpoint in between: two messages can never both start a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import attrs

from .errors import QueueFull, RunAlreadyActive, ShuttingDown

if TYPE_CHECKING:
    from .lifecycle import RunRequest

IF_RUNNING: Final = ("reject", "interrupt", "enqueue")
SHUTTING_DOWN: Final = "The server is shutting down; try again shortly."


@attrs.frozen
class Queued:
    """A request waiting for the session's active run to end."""

    request: RunRequest
    #: Sent with ``if_running: "interrupt"``: it stops whatever runs before it.
    interrupted: bool = False


@attrs.frozen
class Admit:
    """Admission's answer: start now, or queue at ``at`` (and stop the active run)."""

    start: bool = False
    at: int = 0
    #: Queued with ``interrupt``: the active run is to be stopped.
    interrupted: bool = False


START: Final = Admit(start=True)


def admit(
    session_id: str,
    if_running: str,
    *,
    closing: bool,
    active: bool,
    active_over: bool,
    queue: Sequence[Queued],
    max_queued: int,
) -> Admit:
    """Decide a message's fate from the session's state.

    ``active``: the session has a run; ``active_over``: its terminal event is already out
    (it only saves its answer); ``queue``: what waits behind it, oldest first.

    Raises:
        ShuttingDown: the server is draining.
        RunAlreadyActive: ``reject`` and a run is active.
        QueueFull: the queue is at ``max_queued``.
    """
    if closing:
        raise ShuttingDown(SHUTTING_DOWN)
    if not active:
        return START
    if active_over and not queue:
        # To the client it is over: this message starts as soon as the save is done.
        return Admit(at=0)
    if if_running == "reject":
        raise RunAlreadyActive(session_id)
    if len(queue) >= max_queued:
        raise QueueFull(f"Too many queued messages for this session (max {max_queued}).")
    if if_running == "enqueue":
        return Admit(at=len(queue))
    at = 0
    while at < len(queue) and queue[at].interrupted:
        at += 1
    return Admit(at=at, interrupted=True)


def interrupts_successor(rest: Sequence[Queued]) -> bool:
    """After the next queued request has started: the one behind it already interrupted
    it (it was sent with ``interrupt`` while the earlier run still ran)."""
    return bool(rest) and rest[0].interrupted

"""One timer for every paced run: :class:`Pacer`.

Why: ``trio.sleep_until`` wakes a task by expiring a cancel scope's deadline, which
raises and catches ``Cancelled`` inside trio. That is fine once, but 200 sessions pacing
deltas 20 ms apart do it 10,000 times a second, and it showed as the largest cost in the
profile of that benchmark (scenario 6). The pacer keeps the deadlines of all paced runs
in one heap; its own task sleeps until the earliest, then reschedules every run whose
deadline has passed in one pass (``trio.lowlevel.reschedule``: no exception). Under load
many deadlines fall due between two passes, so one timer wake-up serves them all; the
deadlines stay exact (virtual time in tests is unchanged).

Cancellation: a run cancelled while it waits is removed at once (its abort callback).
If no pacer task is serving (an agent used on its own, in a test), ``sleep_until``
falls back to ``trio.sleep_until``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Awaitable
from typing import Any, NoReturn

import trio


class _Entry(list[Any]):
    """A heap entry, ``[deadline, order, task]``: a list, so the heap compares in C.
    The task is None once its sleep was cancelled (the entry is dropped lazily)."""

    __slots__ = ()

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        self[2] = None
        return trio.lowlevel.Abort.SUCCEEDED


class Pacer:
    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._order = itertools.count()
        self._rearm = trio.Event()
        self._serving = False

    def sleep_until(self, deadline: float) -> Awaitable[None]:
        """Like ``trio.sleep_until`` (await what it returns). Cancellation: as for any trio sleep.

        Why not ``async def``: every idle connection's heartbeat is parked here, and
        awaiting the trap directly saves a coroutine frame and a closure per sleeper
        (~400 bytes). A sleep cancelled before it parks aborts at once (its entry is dropped).
        """
        if not self._serving:
            return trio.sleep_until(deadline)  # noqa: ASYNC105, RUF100 (awaited by the caller)
        if deadline <= trio.current_time():
            return trio.lowlevel.checkpoint()  # noqa: ASYNC105 (awaited by the caller)
        entry = _Entry((deadline, next(self._order), trio.lowlevel.current_task()))
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._rearm.set()  # earlier than what the pacer sleeps for
        return trio.lowlevel.wait_task_rescheduled(entry.abort)  # noqa: ASYNC105 (awaited by the caller)

    async def serve(self) -> NoReturn:
        """Run the shared timer (in the server nursery) until cancelled."""
        self._serving = True
        heap = self._heap
        try:
            while True:
                now = trio.current_time()
                while heap and (heap[0][2] is None or heap[0][0] <= now):
                    task = heapq.heappop(heap)[2]
                    if task is not None:
                        trio.lowlevel.reschedule(task)
                self._rearm = trio.Event()
                with trio.move_on_at(heap[0][0] if heap else math.inf):
                    await self._rearm.wait()
        finally:
            self._serving = False
            for entry in heap:  # nothing may stay parked with no one to wake it
                if entry[2] is not None:
                    trio.lowlevel.reschedule(entry[2])
            heap.clear()

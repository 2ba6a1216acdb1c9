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
from typing import Any, NoReturn

import trio


class Pacer:
    def __init__(self) -> None:
        self._heap: list[list[Any]] = []  # [deadline, order, task or None]
        self._order = itertools.count()
        self._rearm = trio.Event()
        self._serving = False

    async def sleep_until(self, deadline: float) -> None:
        """Like ``trio.sleep_until``. Cancellation: as for any trio sleep."""
        if not self._serving:
            await trio.sleep_until(deadline)
            return
        if deadline <= trio.current_time():
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        entry: list[Any] = [deadline, next(self._order), trio.lowlevel.current_task()]
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._rearm.set()  # earlier than what the pacer sleeps for

        def abort(_: Any) -> trio.lowlevel.Abort:
            entry[2] = None  # dropped from the heap lazily
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

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

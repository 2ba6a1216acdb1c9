"""Everything a run writes to the store: its start, checkpoints, its final answer, the
retries of answers the store refused, and at shutdown the messages still queued.

Every write here is bounded by ``save_timeout_s``, and the ones a run must not lose (its
user message, its final answer, a queued message at shutdown) are shielded too, so a stop
or a shutdown cannot cut them short.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import attrs
import structlog
import trio

from .errors import StoreError
from .store.base import Answer, NewRun

if TYPE_CHECKING:
    from .lifecycle import Run, RunRequest
    from .metrics import Metrics
    from .store.base import Store

log = structlog.get_logger("navi_trio.runs")


@attrs.define(eq=False, slots=True)
class _Begin:
    """One run start waiting for the group commit: its row, and what became of it."""

    new_run: NewRun
    written: trio.Event = attrs.Factory(trio.Event)
    error: StoreError | None = None

    def resolve(self, error: StoreError | None) -> None:
        self.error = error
        self.written.set()


class Persistence:
    """The store, as the runs use it."""

    def __init__(self, nursery: trio.Nursery, store: Store, save_timeout_s: float, metrics: Metrics) -> None:
        self._nursery = nursery
        self.store = store
        self._metrics = metrics
        self.save_timeout_s = save_timeout_s
        #: Final answers the store refused (locked, read-only, full): retried every
        #: checkpoint tick until they are in, so no failed answer stays hidden as running.
        self._unsaved: dict[str, Answer] = {}
        #: Runs waiting for their user message to be saved; written together (below).
        self._begins: list[_Begin] = []
        self._flushing = False
        #: Set when there is something for the checkpoint task to do (a run started, an
        #: answer waits for a retry); it sleeps on this, not on a timer, when idle.
        self._work = trio.Event()

    @property
    def unsaved_count(self) -> int:
        """Final answers waiting for a retry."""
        return len(self._unsaved)

    def run_started(self) -> None:
        """A run started: checkpoints have something to look at."""
        self._work.set()

    # -- run starts, group-committed -----------------------------------------------------
    async def begin(self, new_run: NewRun) -> None:
        """Save a run's user message (and its running answer), group-committed: all runs
        starting at the same moment share one transaction, written by a flusher task in the
        server nursery that lives only while there is something to write.

        Cancellation: shielded and bounded by ``save_timeout_s`` (the message is saved
        even if a stop lands at once); the flusher's write is shielded and bounded too.
        Raises :class:`StoreError`, also when the save timed out.
        """
        begin = _Begin(new_run)
        self._begins.append(begin)
        if not self._flushing:
            self._flushing = True
            self._nursery.start_soon(self._flush_begins, name="begin-runs")
        with trio.move_on_after(self.save_timeout_s, shield=True) as scope:
            await begin.written.wait()
        if scope.cancelled_caught:
            raise StoreError("timed out saving the user's message")
        if begin.error is not None:
            raise begin.error

    async def _flush_begins(self) -> None:
        try:
            while self._begins:
                batch, self._begins = self._begins, []
                errors: list[StoreError | None] = [None] * len(batch)
                with trio.move_on_after(self.save_timeout_s, shield=True) as scope:
                    try:
                        with self._metrics.store_op("begin"):
                            await self.store.begin_runs([b.new_run for b in batch])
                    except StoreError as exc:
                        if len(batch) == 1:
                            errors[0] = exc
                        else:  # one bad row (a session just deleted) must not fail the others
                            for i, b in enumerate(batch):
                                try:
                                    await self.store.begin_runs([b.new_run])
                                except StoreError as one:
                                    errors[i] = one
                if scope.cancelled_caught:
                    errors = [e or StoreError("timed out saving the user's message") for e in errors]
                for b, error in zip(batch, errors, strict=True):
                    b.resolve(error)
        finally:
            self._flushing = False
            for b in self._begins:  # cancelled with work left: fail it, don't hang
                b.resolve(StoreError("the server stopped before the message was saved"))
            self._begins = []

    # -- final saves and their retries ---------------------------------------------------
    async def save_final(self, run: Run) -> None:
        """Save the answer with the status its end decided. Until the store has it, the
        answer is kept for a retry at every checkpoint tick: after a store fault, and
        also when the save is cut off by the cleanup's time bound (a database host gone
        silent: the statement would wait longer than the bound).

        Cancellation: called only inside the run's shielded, time-bounded cleanup; a
        cancel there leaves the answer kept for the retry.
        """
        answer = run.answer()
        self._unsaved[answer.id] = answer
        stored = False
        try:
            with self._metrics.store_op("save"):
                await self.store.save_answer(answer)
            stored = True
        except StoreError as exc:
            log.error("run.save_failed", error=str(exc), retry_every_s="checkpoint interval")
        finally:
            if stored:
                self._unsaved.pop(answer.id, None)
            else:
                self._work.set()  # wake the checkpoint task to retry
        log.info("run.ended", status=answer.status, last_seq=run.log.last_seq, reason=run.stop_reason)

    async def _retry_unsaved(self) -> None:
        for answer_id, answer in list(self._unsaved.items()):
            try:
                with trio.move_on_after(self.save_timeout_s), self._metrics.store_op("save"):
                    await self.store.save_answer(answer)
                    self._unsaved.pop(answer_id, None)  # save_final may have stored it meanwhile
                    log.info("run.save_retried", answer_id=answer_id, status=answer.status)
            except StoreError:
                return  # still failing: try again at the next tick

    # -- checkpoints ---------------------------------------------------------------------
    async def serve_checkpoints(self, interval_s: float, runs: Callable[[], Iterable[Run]]) -> None:
        """Save the text of every running answer every ``interval_s``, for all ``runs()``
        in one store transaction, so a hard kill loses at most about that much
        (CONTRACT 7).

        Runs with nothing new to save are skipped (a run waiting on a tool writes nothing
        until the tool's result or new text arrives); with no run and no retry waiting
        this task sleeps on an event, not a timer. A store fault ends the affected runs
        with a terminal ``error`` naming it (``Run.fail``); the server goes on.

        Cancellation: runs until the server nursery is cancelled; a checkpoint cut short
        is harmless, since every run's final save follows anyway.
        """
        while True:
            if not self._unsaved and not any(True for _ in runs()):
                self._work = trio.Event()
                await self._work.wait()
            await trio.sleep(interval_s)
            await self._retry_unsaved()
            dirty = [r for r in runs() if not r.over and r.checkpointed < r.log.answer_changes]
            if not dirty:
                continue
            changes = [r.log.answer_changes for r in dirty]
            try:
                with trio.move_on_after(self.save_timeout_s) as scope, self._metrics.store_op("checkpoint"):
                    await self.store.checkpoint([r.answer("running") for r in dirty])
                if scope.cancelled_caught:
                    raise StoreError("timed out saving answers in progress")
            except StoreError as exc:
                log.error("checkpoint.failed", error=str(exc), runs=len(dirty))
                for r in dirty:
                    r.fail(f"Storage error: {exc}")
                continue
            for r, n in zip(dirty, changes, strict=True):
                r.checkpointed = n

    # -- shutdown ------------------------------------------------------------------------
    async def keep_unstarted(self, requests: list[RunRequest]) -> None:
        """Save the messages still queued when shutdown begins, each with an empty
        ``interrupted`` answer: their runs never start, but no message the user sent is
        lost. The history shows it after the restart, and the user can send it again.

        Cancellation: shielded and bounded by ``save_timeout_s``, like a run's final save.
        """
        with trio.move_on_after(self.save_timeout_s, shield=True) as scope:
            for req in requests:
                new_run = req.saved_as(uuid.uuid4().hex)
                answer = Answer(new_run.answer_id, req.session_id, "interrupted", "", "", [])
                try:
                    await self.store.begin_runs([new_run])
                    await self.store.save_answer(answer)
                except StoreError as exc:  # the session was just deleted, or storage fails
                    log.error("run.queued_not_saved", session_id=req.session_id, error=str(exc))
                else:
                    log.warning("run.queued_saved_unstarted", session_id=req.session_id)
        if scope.cancelled_caught:
            log.error("run.queued_save_timed_out", timeout_s=self.save_timeout_s)

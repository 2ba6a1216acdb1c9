"""Prometheus metrics (CONTRACT section 12), one set per app instance.

Three ways a value gets here, cheapest first:

- **Plain ints** (:class:`Tally`) bumped where the thing happens: frames written by a
  connection's writer, heartbeats, merged frames, open WebSockets. The per-event path
  costs one attribute increment, never a ``Counter.inc`` (a lock and a float add).
- **State read at scrape time** (:meth:`Metrics.sync`): active runs, queued messages,
  lagging subscribers, answers waiting for a retry, dropped log lines. Nothing is kept
  up to date between scrapes.
- **Observed once per run, model call, tool call or store write**: the histograms and
  the counters with labels. A run's time to first delta and its tool durations are read
  from its event log when it ends (each event carries the time it was appended), so a
  run's events cost nothing extra.

Labels are bounded: a status, an agent, an error kind, a store operation, a refusal
reason, and tool names (the first :data:`MAX_TOOL_LABELS` seen, then ``other``); never
a session, user or run id.

Several worker processes (``hypercorn --workers N``): with ``PROMETHEUS_MULTIPROC_DIR``
set (before start), prometheus-client keeps every process's values in files there, each
worker copies its ints and state into them every :data:`SYNC_S`, and ``/metrics`` on any
worker answers the sum over all of them (gauges: over the live ones).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Final, Protocol

import prometheus_client
import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from . import logs

if TYPE_CHECKING:
    from .lifecycle import Run
    from .tracing import Tracing

log = structlog.get_logger("navi_trio.metrics")

#: ``*_created`` series double the count of every counter and are read by no PromQL query.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

#: How often a worker copies its values into the shared files (multiprocess mode only).
SYNC_S: Final = 1.0
#: Distinct tool names that get a label of their own; later ones are counted as ``other``.
MAX_TOOL_LABELS: Final = 32
_TOOL_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

RUN_STATUSES: Final = ("complete", "stopped", "interrupted", "error")
STORE_OPS: Final = ("begin", "checkpoint", "save")
#: Why a model call failed: an HTTP status the operator acts on, or what went wrong.
MODEL_ERROR_KINDS: Final = frozenset(
    {"401", "403", "404", "429", "4xx", "5xx", "connect", "timeout", "broken", "malformed", "incomplete", "other"}
)
REFUSAL_REASONS: Final = frozenset({"auth", "forbidden", "not_found", "limit", "origin"})

_FAST: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_STOP: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FIRST_DELTA: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_MODEL: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOOL: Final = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR``, read by prometheus-client when it is first imported."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Tally:
    """Plain ints bumped on the hot path, read by :meth:`Metrics.sync`.

    One owner per field: a connection's writer adds to ``frames_sent`` and
    ``frames_merged``, its heartbeat to ``heartbeats_sent``, its ``serve`` keeps
    ``websockets`` (all on the one trio thread, so a plain ``+=`` is exact).
    """

    __slots__ = ("frames_merged", "frames_sent", "heartbeats_sent", "websockets")

    def __init__(self) -> None:
        self.frames_sent = 0
        self.frames_merged = 0
        self.heartbeats_sent = 0
        self.websockets = 0


class Observed(Protocol):
    """What the scrape reads from the run registry."""

    @property
    def runs(self) -> list[Run]: ...

    @property
    def queued_count(self) -> int: ...

    @property
    def unsaved_count(self) -> int: ...


class Metrics:
    """The metrics of one app instance, in their own :class:`CollectorRegistry` (never the
    process-wide default one), so that every test can build an isolated server."""

    def __init__(self, agent: str = "", tracing: Tracing | None = None) -> None:
        self.agent = agent
        #: OpenTelemetry spans for runs, model calls and tool calls, when enabled.
        self.tracing = tracing
        self.tally = Tally()
        self.registry = r = CollectorRegistry(auto_describe=True)
        # -- the contract's six (CONTRACT section 12) --
        self._runs_active = Gauge(
            "navi_runs_active", "Runs started whose answer is not saved yet", registry=r, multiprocess_mode="livesum"
        )
        self._runs_total = Counter(
            "navi_runs", "Runs ended, by the status of their saved answer", ["status"], registry=r
        )
        #: The same count by agent too: the contract names ``navi_runs_total{status}``
        #: with exactly that label, so the agent gets a counter of its own.
        self._agent_runs = Counter(
            "navi_agent_runs",
            "Runs ended, by agent and the status of their saved answer",
            ["agent", "status"],
            registry=r,
        )
        self._websockets = Gauge(
            "navi_websocket_connections", "Open WebSocket connections", registry=r, multiprocess_mode="livesum"
        )
        self._events_sent = Counter(
            "navi_events_sent",
            "Run events written to clients over WebSocket and SSE (a merged one counts once)",
            registry=r,
        )
        self._stop = Histogram(
            "navi_stop_seconds", "From a client's stop to the run's answer saved", registry=r, buckets=_STOP
        )
        self._first_delta = Histogram(
            "navi_time_to_first_delta_seconds",
            "From a user message received to its run's first text or thinking delta sent",
            registry=r,
            buckets=_FIRST_DELTA,
        )
        # -- is it losing anything, is it slow --
        self._queued = Gauge(
            "navi_messages_queued",
            "Messages waiting for their session's run to end (enqueue, interrupt)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._lagging = Gauge(
            "navi_subscribers_lagging",
            "Subscribers of active runs served from the run's log because their outbox was full",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._merged = Counter(
            "navi_frames_merged", "Frames that carried several deltas merged for a reader behind", registry=r
        )
        self._heartbeats = Counter("navi_heartbeats_sent", "Heartbeats queued on idle connections", registry=r)
        self._unsaved = Gauge(
            "navi_answers_unsaved",
            "Final answers the store refused, waiting for the next retry",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._log_dropped = Counter("navi_log_lines_dropped", "Log lines that could not be written", registry=r)
        self._refused = Counter(
            "navi_connections_refused", "WebSocket handshakes and requests refused, by reason", ["reason"], registry=r
        )
        self._model_seconds = Histogram(
            "navi_model_call_seconds",
            "Model calls (a streamed turn or a summary, retries included), by outcome",
            ["outcome"],
            registry=r,
            buckets=_MODEL,
        )
        self._model_errors = Counter(
            "navi_model_errors",
            "Failed model requests by kind (HTTP status or what broke), retried ones included",
            ["kind"],
            registry=r,
        )
        self._tool_seconds = Histogram(
            "navi_tool_seconds", "Tool calls, from tool_started to tool_call", ["tool"], registry=r, buckets=_TOOL
        )
        self._tool_failures = Counter(
            "navi_tool_failures", "Tool calls that ended with success: false", ["tool"], registry=r
        )
        self._store_seconds = Histogram(
            "navi_store_seconds",
            "Store writes: begin (user message), checkpoint (running answers), save (final answer)",
            ["op"],
            registry=r,
            buckets=_FAST,
        )
        self._store_failures = Counter(
            "navi_store_failures", "Store writes that failed or timed out", ["op"], registry=r
        )
        # Pre-made children: every label value exists from the start (a rate() over a
        # series that appears only on the first failure misses that failure).
        for status in RUN_STATUSES:
            self._runs_total.labels(status)
            self._agent_runs.labels(agent, status)
        for kind in sorted(MODEL_ERROR_KINDS):
            self._model_errors.labels(kind)
        for reason in sorted(REFUSAL_REASONS):
            self._refused.labels(reason)
        for outcome in ("ok", "error", "cancelled"):
            self._model_seconds.labels(outcome)
        self._store = {op: (self._store_seconds.labels(op), self._store_failures.labels(op)) for op in STORE_OPS}
        self._tools: set[str] = set()
        #: What :meth:`sync` last copied into each counter fed from a plain int.
        self._synced: dict[str, float] = {}
        #: Open spans of runs that are playing (tracing only).
        self._spans: dict[str, Any] = {}

    @classmethod
    def detached(cls) -> Metrics:
        """The metrics of a registry or agent built without an app (unit tests, the testing
        kit's thousands of cut runs): one instance that no ``/metrics`` serves, made once,
        since making one costs about a millisecond. Every app makes its own."""
        global _DETACHED
        if _DETACHED is None:
            _DETACHED = cls("detached")
        return _DETACHED

    # -- scrape ------------------------------------------------------------------------
    def sync(self, source: Observed) -> None:
        """Copy the plain ints and the registry's state into the metrics (at scrape time,
        and every :data:`SYNC_S` in multiprocess mode). A few hundred runs: microseconds."""
        runs = source.runs
        self._runs_active.set(len(runs))
        self._queued.set(source.queued_count)
        self._unsaved.set(source.unsaved_count)
        self._lagging.set(sum(1 for run in runs for sub in run.subscribers if sub.lagging))
        tally = self.tally
        self._websockets.set(tally.websockets)
        self._advance("events", self._events_sent, tally.frames_sent)
        self._advance("merged", self._merged, tally.frames_merged)
        self._advance("heartbeats", self._heartbeats, tally.heartbeats_sent)
        self._advance("log_dropped", self._log_dropped, logs.dropped_lines())

    def _advance(self, key: str, counter: Counter, total: float) -> None:
        delta = total - self._synced.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._synced[key] = total

    def render(self, source: Observed, accept: str = "") -> tuple[bytes, str]:
        """The exposition for ``GET /metrics``: the body and its content type (the text
        format, or OpenMetrics when the scraper asks for it)."""
        self.sync(source)
        encoder, content_type = choose_encoder(accept)
        if multiprocess_dir() is not None:
            from prometheus_client import multiprocess

            every_worker = CollectorRegistry()
            multiprocess.MultiProcessCollector(every_worker)  # type: ignore[no-untyped-call]
            return encoder(every_worker), content_type
        return encoder(self.registry), content_type

    async def serve_sync(self, source: Observed) -> None:
        """In multiprocess mode, copy this worker's values into the shared files every
        :data:`SYNC_S`, so that a scrape answered by another worker sees them (at most that
        much behind). Returns at once otherwise: a scrape reads the state itself.

        Cancellation: runs until the server nursery is cancelled; nothing to clean up.
        """
        if multiprocess_dir() is None:
            return
        while True:
            self.sync(source)
            await trio.sleep(SYNC_S)

    def close(self) -> None:
        """At shutdown: in multiprocess mode, drop this worker's gauges from the shared
        files (its counters stay: totals never go down)."""
        path = multiprocess_dir()
        if path is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]

    # -- runs --------------------------------------------------------------------------
    def run_began(self, run: Run) -> None:
        """A run's task has started: open its ``invoke_agent`` span (tracing only) and make
        it the current span of the run's task, so model calls are its children."""
        if self.tracing is not None:
            try:
                self._spans[run.id] = self.tracing.run_began(run, self.agent)
            except Exception:  # tracing is a side channel: it never ends a run
                log.exception("tracing.failed")

    def run_ended(self, run: Run, status: str) -> None:
        """A run is over and saved (or its save gave up): count it, and read its time to
        first delta and its tool calls from its log."""
        status = status if status in RUN_STATUSES else "error"
        self._runs_total.labels(status).inc()
        self._agent_runs.labels(self.agent, status).inc()
        events = run.log.events
        received = run.request.received_at  # NaN for a request made outside a trio run
        if not math.isnan(received):
            first_delta = next((ev for ev in events if ev.delta is not None), None)
            if first_delta is not None:
                self._first_delta.observe(max(0.0, first_delta.t - received))
        tools = list(tool_calls(run))
        for name, started, ended, success in tools:
            label = self._tool_label(name)
            self._tool_seconds.labels(label).observe(max(0.0, ended - started))
            if not success:
                self._tool_failures.labels(label).inc()
        span = self._spans.pop(run.id, None)
        if span is not None and self.tracing is not None:
            try:
                self.tracing.run_ended(span, run, status, tools)
            except Exception:  # called in the run's final, synchronous step: never raise there
                log.exception("tracing.failed")

    def _tool_label(self, name: str) -> str:
        if name in self._tools:
            return name
        if len(self._tools) < MAX_TOOL_LABELS and _TOOL_NAME.match(name):
            self._tools.add(name)
            return name
        return "other"

    def stop_answered(self, asked_at: float) -> None:
        """A client's stop has its answer: the run ended and its answer is saved."""
        self._stop.observe(trio.current_time() - asked_at)

    # -- the edges ---------------------------------------------------------------------
    @contextmanager
    def store_op(self, op: str) -> Iterator[None]:
        """Time one store write; count it failed if it raises or is cut short (a timeout
        is a cancel from the caller's ``move_on_after``)."""
        seconds, failures = self._store[op]
        started = trio.current_time()
        try:
            yield
        except BaseException:
            failures.inc()
            raise
        finally:
            seconds.observe(trio.current_time() - started)

    @contextmanager
    def model_call(self, model: str, base_url: str = "") -> Iterator[None]:
        """Time one model call and, with tracing, wrap it in a ``chat`` span. An exception
        with a ``kind`` attribute (one of :data:`MODEL_ERROR_KINDS`) is counted under it;
        a cancel (a stop) is an outcome of its own, not an error."""
        started = trio.current_time()
        outcome = "ok"
        tracing = self.tracing
        with tracing.chat(model, base_url) if tracing is not None else nullcontext() as span:
            try:
                yield
            except trio.Cancelled:
                outcome = "cancelled"
                raise
            except BaseException as exc:
                outcome = "error"
                kind = self.model_error(getattr(exc, "kind", "other"))
                if tracing is not None and span is not None:
                    tracing.failed(span, kind, str(exc))
                raise
            finally:
                self._model_seconds.labels(outcome).observe(trio.current_time() - started)

    def model_error(self, kind: str) -> str:
        """Count one failed model request (also each one that is retried)."""
        kind = kind if kind in MODEL_ERROR_KINDS else "other"
        self._model_errors.labels(kind).inc()
        return kind

    def refused(self, reason: str) -> None:
        """A WebSocket handshake or request refused (bad token, no access, a limit, an origin)."""
        self._refused.labels(reason if reason in REFUSAL_REASONS else "other").inc()


_DETACHED: Metrics | None = None


def tool_calls(run: Run) -> Iterator[tuple[str, float, float, bool]]:
    """``(tool, started, ended, success)`` of each finished tool call in the run's log,
    from the times its ``tool_started`` and ``tool_call`` events were appended (a stack:
    a sub-agent's tools run inside the tool that delegated to it)."""
    started: list[float] = []
    finished = iter(run.log.tool_calls)  # in the order their tool_call events were appended
    for ev in run.log.events:
        if ev.type == "tool_started":
            started.append(ev.t)
        elif ev.type == "tool_call" and started:
            call = next(finished, None)
            if call is not None:
                yield call.tool, started.pop(), ev.t, call.success

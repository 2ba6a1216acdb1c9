"""Optional OpenTelemetry traces: a span per run, a child span per model call and tool call.

Install the ``otel`` extra (``pip install 'navi-trio[otel]'``) and opt in to the GenAI
semantic conventions, which are still marked *development*, the way they ask:
``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental``. Without that flag nothing
here is imported and a run costs nothing extra.

- ``invoke_agent {agent}`` (internal): the run, from its task's start to its answer saved.
- ``chat {model}`` (client): one model call (a streamed turn, or a summary), retries
  included; ``error.type`` is the kind the metrics count (``429``, ``timeout``, ...).
- ``execute_tool {tool}`` (internal): one tool call, from ``tool_started`` to
  ``tool_call``, read from the run's event log when the run ends (any agent's tools, at no
  cost while the run plays).

Spans go to the tracer provider already set up in the process (``opentelemetry-instrument``
sets one), or else to one made here that exports over OTLP/HTTP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (the
exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import structlog
import trio

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from .lifecycle import Run

log = structlog.get_logger("navi_trio.tracing")

OPT_IN_VARIABLE: Final = "OTEL_SEMCONV_STABILITY_OPT_IN"
OPT_IN_FLAG: Final = "gen_ai_latest_experimental"
PROVIDER: Final = "openai"


def opted_in(env: Mapping[str, str]) -> bool:
    flags = {flag.strip() for flag in env.get(OPT_IN_VARIABLE, "").split(",")}
    return OPT_IN_FLAG in flags and env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"


def from_env(env: Mapping[str, str] | None = None) -> Tracing | None:
    """Tracing as the environment asks for it, or None (not opted in, or the ``otel``
    extra is not installed: then a warning says so, once, at start)."""
    env = os.environ if env is None else env
    if not opted_in(env):
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        log.warning("tracing.unavailable", reason="opentelemetry is not installed", fix="pip install 'navi-trio[otel]'")
        return None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) and (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        trace.set_tracer_provider(_otlp_provider())
        log.info("tracing.exporting", protocol="otlp/http")
    from . import __version__

    return Tracing(trace.get_tracer("navi_trio", __version__))


def _otlp_provider() -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "navi-trio"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Tracing:
    """Spans for runs, model calls and tool calls on one OpenTelemetry tracer."""

    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry import context, trace

        self._tracer = tracer
        self._trace = trace
        self._context = context
        #: Span times are taken on trio's clock (the one the run log's times are on), as
        #: wall-clock nanoseconds: every span of a run is on one timeline.
        self._offset_ns = time.time_ns() - int(trio.current_time() * 1e9)

    def _ns(self, t: float) -> int:
        return self._offset_ns + int(t * 1e9)

    def run_began(self, run: Run, agent: str) -> Span:
        """Open the run's ``invoke_agent`` span as a root span and make it current in the
        run's task (its own context: trio copies the spawner's, so the span goes no
        further than the run and the tasks it starts)."""
        span = self._tracer.start_span(
            f"invoke_agent {agent}",
            context=self._context.Context(),  # a root span: not the spawner's current span
            kind=self._trace.SpanKind.INTERNAL,
            start_time=self._ns(trio.current_time()),
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": agent,
                "gen_ai.conversation.id": run.session_id,
                "navi.run.id": run.id,
            },
        )
        self._context.attach(self._trace.set_span_in_context(span))
        return span

    def run_ended(self, span: Span, run: Run, status: str, tools: list[tuple[str, float, float, bool]]) -> None:
        """Add the run's tool calls as ``execute_tool`` children (times from its log),
        then end its span with the answer's status."""
        parent = self._trace.set_span_in_context(span)
        for name, started, ended, success in tools:
            child = self._tracer.start_span(
                f"execute_tool {name}",
                context=parent,
                kind=self._trace.SpanKind.INTERNAL,
                start_time=self._ns(started),
                attributes={
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": name,
                    "gen_ai.tool.type": "function",
                },
            )
            if not success:
                self.failed(child, "tool_error", "")
            child.end(end_time=self._ns(ended))
        span.set_attribute("navi.answer.status", status)
        terminal = run.log.terminal
        if status == "error":
            message = ""
            if terminal is not None and terminal.type == "error":
                import orjson

                message = str(orjson.loads(terminal.wire).get("message", ""))
            self.failed(span, "error", message)
        span.end(end_time=self._ns(trio.current_time()))

    @contextmanager
    def chat(self, model: str, base_url: str = "") -> Iterator[Span]:
        """A ``chat`` span around one model call, current while it lasts (so nothing
        started inside it escapes it). Failures are marked by the caller (:meth:`failed`)."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model,
        }
        url = urlsplit(base_url)
        if url.hostname:
            attributes["server.address"] = url.hostname
            attributes["server.port"] = url.port or (443 if url.scheme == "https" else 80)
        span = self._tracer.start_span(
            f"chat {model}",
            kind=self._trace.SpanKind.CLIENT,
            attributes=attributes,
            start_time=self._ns(trio.current_time()),
        )
        try:
            with self._trace.use_span(span, record_exception=False, set_status_on_exception=False):
                yield span
        finally:
            span.end(end_time=self._ns(trio.current_time()))

    def failed(self, span: Span, kind: str, message: str) -> None:
        span.set_attribute("error.type", kind)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, message or None))

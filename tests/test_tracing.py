"""OpenTelemetry traces (the ``otel`` extra): a span per run, child spans for each model
call and tool call, with the GenAI semantic conventions, only when opted in.

The spans of a real server's runs are collected with the SDK's in-memory exporter, set as
the process's tracer provider once for this module (OpenTelemetry allows one per
process); each test reads only the spans of its own runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from navi_trio import tracing
from navi_trio.agents import openai as openai_agent

from .fake_openai import Reply, error_reply, open_fake_openai, text_reply, tool_reply
from .helpers import Server, open_server, script

MODEL = "test-model"
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> list[ReadableSpan]:
    """Opt in (as an operator would, in the environment) and collect this test's spans."""
    monkeypatch.setenv(tracing.OPT_IN_VARIABLE, f"http,{tracing.OPT_IN_FLAG}")
    monkeypatch.setattr(openai_agent, "RETRY_BASE_S", 0.01)
    EXPORTER.clear()
    collected: list[ReadableSpan] = []
    return collected


def finished(collected: list[ReadableSpan]) -> list[ReadableSpan]:
    collected[:] = list(EXPORTER.get_finished_spans())
    return collected


def one(spans: list[ReadableSpan], operation: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.attributes is not None and s.attributes["gen_ai.operation.name"] == operation]
    return span


def of(spans: list[ReadableSpan], operation: str) -> list[ReadableSpan]:
    return [s for s in spans if s.attributes is not None and s.attributes["gen_ai.operation.name"] == operation]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def run_once(server: Server, content: str) -> str:
    """One message on a new session; its session id once the answer is saved."""
    sid = await server.new_session()
    async with server.connect(sid) as c:
        assert (await c.recv())["type"] == "session_sync"
        await c.send_message(content)
        await c.until_terminal()
    await server.no_run_left()
    return sid


async def model_run(content: str, *replies: Reply) -> None:
    """One message to a server whose agent is the OpenAI one, answered by ``replies``."""
    async with open_fake_openai() as fake:
        fake.script(*replies)
        async with open_server(
            agent="openai", openai_base_url=fake.base_url, openai_api_key="k", openai_model=MODEL
        ) as server:
            await run_once(server, content)


async def test_a_run_is_an_invoke_agent_span_with_its_tools_as_children(
    spans: list[ReadableSpan], autojump_clock: trio.testing.MockClock
) -> None:
    async with open_server() as server:
        sid = await run_once(
            server,
            script(
                {"tool": "lookup", "args": {}, "result": "42", "delay": 0.5},
                {"tool": "fetch", "result": "no", "success": False},
                {"text": "done"},
            ),
        )
    got = finished(spans)
    run = one(got, "invoke_agent")
    assert run.name == "invoke_agent scripted"
    assert run.kind == SpanKind.INTERNAL
    assert run.parent is None  # a root span, not the connection's context
    assert attrs(run)["gen_ai.agent.name"] == "scripted"
    assert attrs(run)["gen_ai.conversation.id"] == sid
    assert attrs(run)["navi.answer.status"] == "complete"
    assert run.status.status_code != StatusCode.ERROR
    tools = of(got, "execute_tool")
    assert [t.name for t in tools] == ["execute_tool lookup", "execute_tool fetch"]
    assert all(parent_of(t) == run.context.span_id for t in tools)
    assert all(t.context.trace_id == run.context.trace_id for t in tools)
    lookup, fetch = tools
    assert attrs(lookup)["gen_ai.tool.name"] == "lookup"
    assert lookup.end_time is not None and lookup.start_time is not None
    assert (lookup.end_time - lookup.start_time) / 1e9 == pytest.approx(0.5, abs=0.01)  # virtual time
    assert lookup.status.status_code != StatusCode.ERROR
    assert fetch.status.status_code == StatusCode.ERROR
    assert attrs(fetch)["error.type"] == "tool_error"
    assert run.start_time is not None and run.end_time is not None
    assert run.start_time <= lookup.start_time and lookup.end_time <= run.end_time


async def test_each_run_is_its_own_trace(spans: list[ReadableSpan], autojump_clock: trio.testing.MockClock) -> None:
    async with open_server() as server:
        sid = await server.new_session()
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            await c.send_message(script({"text": "a", "repeat": 5, "delay": 0.1}))
            await c.until("stream_delta")
            await c.send_message(script({"text": "b"}), if_running="enqueue")  # started by the first's end
            await c.until_terminal()
            await c.until_terminal()
        await server.no_run_left()
    first, second = of(finished(spans), "invoke_agent")
    assert first.context.trace_id != second.context.trace_id
    assert second.parent is None


async def test_model_calls_are_chat_spans_under_the_run(spans: list[ReadableSpan]) -> None:
    await model_run(
        "what is 6*7?", tool_reply(("c1", "calculator", '{"expression": "6*7"}')), text_reply("forty", "-two")
    )
    got = finished(spans)
    run = one(got, "invoke_agent")
    assert run.name == "invoke_agent openai"
    chats = of(got, "chat")
    assert len(chats) == 2
    for chat in chats:
        assert chat.name == f"chat {MODEL}"
        assert chat.kind == SpanKind.CLIENT
        assert parent_of(chat) == run.context.span_id
        a = attrs(chat)
        assert a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.request.model"] == MODEL
        assert a["server.address"] == "127.0.0.1"
        assert isinstance(a["server.port"], int)
        assert chat.status.status_code != StatusCode.ERROR
    tool = one(got, "execute_tool")
    assert tool.name == "execute_tool calculator"
    assert parent_of(tool) == run.context.span_id
    first, second = sorted(chats, key=lambda s: s.start_time or 0)
    assert first.end_time is not None and tool.start_time is not None and tool.end_time is not None
    assert first.end_time <= tool.start_time + 1_000_000  # the tool runs after the first turn
    assert second.start_time is not None and tool.end_time <= second.start_time + 1_000_000


async def test_a_failed_model_call_marks_its_span_and_the_run(spans: list[ReadableSpan]) -> None:
    await model_run("hello", *[error_reply(429, "slow down")] * openai_agent.RETRY_ATTEMPTS)
    got = finished(spans)
    chat = one(got, "chat")
    assert chat.status.status_code == StatusCode.ERROR
    assert attrs(chat)["error.type"] == "429"
    run = one(got, "invoke_agent")
    assert run.status.status_code == StatusCode.ERROR
    assert attrs(run)["navi.answer.status"] == "error"
    assert "rate-limiting" in (run.status.description or "")


async def test_no_spans_unless_opted_in(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv(tracing.OPT_IN_VARIABLE, "http")
    EXPORTER.clear()
    async with open_server() as server:
        assert server.registry.metrics.tracing is None
        await run_once(server, script({"tool": "lookup"}, {"text": "x"}))
    assert EXPORTER.get_finished_spans() == ()


def test_opt_in_reads_the_flag_and_the_sdk_switch() -> None:
    flag = tracing.OPT_IN_FLAG
    assert tracing.opted_in({tracing.OPT_IN_VARIABLE: flag})
    assert tracing.opted_in({tracing.OPT_IN_VARIABLE: f"database, {flag}"})
    assert not tracing.opted_in({})
    assert not tracing.opted_in({tracing.OPT_IN_VARIABLE: "gen_ai"})
    assert not tracing.opted_in({tracing.OPT_IN_VARIABLE: flag, "OTEL_SDK_DISABLED": "true"})
    assert tracing.from_env({}) is None


async def test_spans_are_exported_over_otlp_when_configured(tmp_path: Path) -> None:
    """A real ``navi-trio serve`` process, configured only by the environment, posts its
    spans to an OTLP/HTTP endpoint (the fake HTTP server stands in for a collector)."""
    from .test_cli import NAVI, STARTUP_S, clean_env, http_client, spawn, ws_connect

    async with open_fake_openai() as collector:
        collector.fallback = Reply(status=200, body=b"", headers=(("content-type", "application/x-protobuf"),))
        env = clean_env(
            OTEL_SEMCONV_STABILITY_OPT_IN=tracing.OPT_IN_FLAG,
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
            OTEL_SERVICE_NAME="navi-under-test",
            OTEL_BSP_SCHEDULE_DELAY="50",
        )
        cmd = [NAVI, "serve", "--port", "0", "--data-dir", str(tmp_path / "data")]
        with trio.fail_after(STARTUP_S + 30):
            async with spawn(cmd, env, tmp_path) as srv:
                url = await srv.wait_listening()
                async with http_client(url) as http:
                    sid = (await http.post("/sessions", json={})).json()["id"]
                host, port = srv.host_port
                async with ws_connect(host, port, f"/ws/sessions/{sid}") as c:
                    assert (await c.recv())["type"] == "session_sync"
                    await c.send_message(script({"tool": "lookup", "result": "42"}, {"text": "done"}))
                    await c.until_terminal()
                await collector.wait_for(lambda: any(b"invoke_agent" in r.body for r in collector.requests))
    exported = [r for r in collector.requests if b"invoke_agent" in r.body]
    assert exported[0].method == "POST"
    assert exported[0].path == "/v1/traces"
    assert exported[0].headers["content-type"] == "application/x-protobuf"
    body = b"".join(r.body for r in collector.requests)
    for text in (b"invoke_agent scripted", b"execute_tool lookup", b"navi-under-test", sid.encode()):
        assert text in body, text


@pytest.mark.parametrize("step", ["run_began", "run_ended"])
async def test_a_failing_tracer_never_ends_a_run(
    step: str, spans: list[ReadableSpan], monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("the exporter's bug")

    monkeypatch.setattr(tracing.Tracing, step, broken)
    async with open_server() as server:
        sid = await run_once(server, script({"text": "still here"}))
        r = await server.http.get(f"/sessions/{sid}/messages")
        assert [(m["status"], m["content"]) for m in r.json()][1] == ("complete", "still here")

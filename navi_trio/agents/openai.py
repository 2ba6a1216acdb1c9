"""The ``openai`` agent: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM,
Ollama, llama.cpp server), streamed with httpx under trio (CONTRACT section 5).

- Text deltas become ``stream_delta``; reasoning (``reasoning_content`` / ``reasoning``
  fields, or inline ``<think>...</think>``) becomes ``thinking_delta`` + ``thinking_end``.
- Tool calls are assembled from fragments (several per turn), run, and fed back; a
  failing tool gives ``success: false`` and its error to the model, which goes on; at most
  ``max_tool_rounds`` rounds. ``delegate`` runs a nested turn whose tool events carry
  ``is_subagent: true`` and which is cancelled with its parent (same task, same scope).
- When the history exceeds ``context_tokens`` (estimated), older turns are summarised by
  the model, the run emits ``context_compressed``, and the summary is saved for next time.
- Failures are mapped at the edge into :class:`AgentError` messages a user understands,
  never containing the API key. 429 and 5xx before the first token are retried with
  backoff and jitter inside the run's cancel scope.

Cancellation: a stop cancels the run's scope; leaving ``client.stream(...)`` closes the
HTTP response (and its connection) at once, and a tool thread is abandoned.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import httpx2 as httpx
import orjson
import structlog
import trio

from ..errors import AgentError
from ..metrics import Metrics
from .stream_parse import DONE, SSEDecoder, StreamFormatError, ThinkSplitter, ToolCallAssembler, parse_chunk
from .tools import BUILTIN_TOOLS, DELEGATE_SCHEMA, SCHEMAS, ToolContext, ToolError

if TYPE_CHECKING:
    from ..settings import Settings
    from .base import RunContext

log = structlog.get_logger("navi_trio.agents.openai")

SYSTEM_PROMPT: Final = (
    "You are Navi, a helpful assistant. Use the tools when they help; the user's uploaded files "
    "can be listed and read with list_files and read_file."
)
SUMMARY_PROMPT: Final = (
    "Summarise the conversation so far for your own later use: keep facts, decisions, open "
    "questions and anything the user asked you to remember. Be concise."
)
RETRY_ATTEMPTS: Final = 3
RETRY_BASE_S: Final = 0.5
KEEP_RECENT_MESSAGES: Final = 4
#: How long the rest of a malformed stream is read (and dropped) before giving up on it.
DRAIN_S: Final = 2.0


@attrs.frozen
class OpenAISettings:
    base_url: str
    api_key: str
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    timeout_s: float = 60.0
    context_tokens: int = 16_000
    max_tool_rounds: int = 8

    @classmethod
    def from_settings(cls, s: Settings) -> OpenAISettings:
        if not s.openai_base_url:
            raise ValueError("--agent openai needs NAVI_OPENAI_BASE_URL")
        return cls(
            s.openai_base_url.rstrip("/"),
            s.openai_api_key,
            s.openai_model,
            s.openai_temperature,
            s.openai_max_tokens,
            s.openai_timeout_s,
            s.context_tokens,
            s.max_tool_rounds,
        )


class ModelHTTPError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body

    @property
    def kind(self) -> str:
        """What the metrics count it as (:data:`~navi_trio.metrics.MODEL_ERROR_KINDS`)."""
        status = self.status
        if status == 0:
            return "connect"
        if status in (401, 403, 404, 429):
            return str(status)
        return "5xx" if status >= 500 else "4xx"


class ModelCallError(AgentError):
    """A model call that failed, with the ``kind`` the metrics and traces record."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@attrs.define
class Turn:
    text: str = ""
    tool_calls: list[dict[str, Any]] = attrs.Factory(list)


class OpenAIAgent:
    wants_history = True

    def __init__(self, settings: OpenAISettings, metrics: Metrics | None = None) -> None:
        self.s = settings
        self._metrics = metrics if metrics is not None else Metrics.detached()

    # -- the agent ---------------------------------------------------------------------
    async def play(self, ctx: RunContext) -> None:
        try:
            async with self._client() as client:
                messages = await self._initial_messages(client, ctx)
                tool_ctx = ToolContext(ctx.user_id, ctx.session_id, ctx.upload_dir)
                await self._loop(client, ctx, tool_ctx, messages, is_subagent=False)
        except AgentError as exc:
            # Messages may quote the endpoint's own text: never let it carry the key.
            raise AgentError(self._scrub(str(exc))) from None

    async def _loop(
        self,
        client: httpx.AsyncClient,
        ctx: RunContext,
        tool_ctx: ToolContext,
        messages: list[dict[str, Any]],
        *,
        is_subagent: bool,
    ) -> str:
        """Turns until the model answers without tool calls; returns the last turn's text."""
        tools = [*SCHEMAS] if is_subagent else [*SCHEMAS, DELEGATE_SCHEMA]
        for _round in range(self.s.max_tool_rounds + 1):
            with self._metrics.model_call(self.s.model, self.s.base_url):
                turn = await self._turn(client, ctx, messages, tools, emit=not is_subagent)
            if not turn.tool_calls:
                return turn.text
            if _round == self.s.max_tool_rounds:
                raise AgentError(f"The model asked for tools more than {self.s.max_tool_rounds} rounds in a row.")
            messages.append({"role": "assistant", "content": turn.text or None, "tool_calls": turn.tool_calls})
            for call in turn.tool_calls:
                result = await self._run_tool(client, ctx, tool_ctx, call, is_subagent=is_subagent)
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        raise AssertionError("unreachable")

    async def _run_tool(
        self,
        client: httpx.AsyncClient,
        ctx: RunContext,
        tool_ctx: ToolContext,
        call: dict[str, Any],
        *,
        is_subagent: bool,
    ) -> str:
        name = call["function"]["name"]
        raw_args = call["function"]["arguments"] or "{}"
        try:
            args = orjson.loads(raw_args)
        except orjson.JSONDecodeError:
            args = None
        ctx.emit_tool_started(name, args if isinstance(args, dict) else raw_args, is_subagent=is_subagent)
        success = True
        try:
            if not isinstance(args, dict):
                raise ToolError("the arguments are not a JSON object")
            if name == "delegate" and not is_subagent:
                result = await self._delegate(client, ctx, tool_ctx, args)
            elif name in BUILTIN_TOOLS:
                result = await BUILTIN_TOOLS[name](tool_ctx, args)
            else:
                raise ToolError(f"there is no tool named {name!r}")
        except ToolError as exc:
            result, success = f"Error: {exc}", False
        ctx.emit_tool_call(result, success=success)
        return result

    async def _delegate(
        self, client: httpx.AsyncClient, ctx: RunContext, tool_ctx: ToolContext, args: dict[str, Any]
    ) -> str:
        task = args.get("task")
        if not isinstance(task, str) or not task.strip():
            raise ToolError('delegate needs {"task": "<what to do>"}')
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT + " You are a helper agent: do the task and report back."},
            {"role": "user", "content": task},
        ]
        return await self._loop(client, ctx, tool_ctx, messages, is_subagent=True)

    # -- context -----------------------------------------------------------------------
    async def _initial_messages(self, client: httpx.AsyncClient, ctx: RunContext) -> list[dict[str, Any]]:
        summary = ctx.summary
        history = list(ctx.history)
        if (
            history
            and _estimate_tokens(summary, history) > self.s.context_tokens
            and len(history) > KEEP_RECENT_MESSAGES
        ):
            older, history = history[:-KEEP_RECENT_MESSAGES], history[-KEEP_RECENT_MESSAGES:]
            with self._metrics.model_call(self.s.model, self.s.base_url):
                summary = await self._summarise(client, summary, older)
            await ctx.save_summary(summary, older[-1]["id"])
            ctx.emit_context_compressed()
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
        if summary:
            messages.append({"role": "system", "content": f"Summary of the earlier conversation:\n{summary}"})
        messages.extend({"role": m["role"], "content": m["content"]} for m in history if m["content"])
        user: Any = ctx.content
        if ctx.images:
            user = [{"type": "text", "text": ctx.content}] + [
                {"type": "image_url", "image_url": {"url": _image_url(img)}} for img in ctx.images
            ]
        messages.append({"role": "user", "content": user})
        return messages

    async def _summarise(self, client: httpx.AsyncClient, summary: str | None, older: list[dict[str, Any]]) -> str:
        transcript = "\n".join(f"{m['role']}: {m['content']}" for m in older if m["content"])
        if summary:
            transcript = f"(earlier summary) {summary}\n{transcript}"
        messages = [
            {"role": "system", "content": SUMMARY_PROMPT},
            {"role": "user", "content": transcript},
        ]
        async with self._request(client, {"messages": messages, "stream": False}) as response:
            body = await response.aread()
        try:
            return str(orjson.loads(body)["choices"][0]["message"]["content"] or "").strip()
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise ModelCallError("The model endpoint sent a malformed reply while summarising.", "malformed") from None

    # -- one streamed turn -------------------------------------------------------------
    async def _turn(
        self,
        client: httpx.AsyncClient,
        ctx: RunContext,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        emit: bool,
    ) -> Turn:
        payload: dict[str, Any] = {"messages": messages, "stream": True, "tools": tools}
        turn = Turn()
        text: list[str] = []
        splitter = ThinkSplitter()
        assembler = ToolCallAssembler()
        field_thinking = False
        finished = False

        def on_text(piece: str) -> None:
            text.append(piece)
            if emit:
                ctx.emit_text(piece)

        def on_think(piece: str) -> None:
            if emit:
                ctx.emit_thinking(piece)

        malformed: StreamFormatError | None = None
        async with self._request(client, payload) as response:
            decoder = SSEDecoder()
            # After [DONE] or a malformed chunk the body is read to its end (bounded in
            # time once malformed) instead of breaking out: leaving httpx's line iterator
            # early abandons its nested async generators unclosed.
            with trio.CancelScope() as drain:
                try:
                    async for line in response.aiter_lines():
                        data = decoder.feed_line(line)
                        if data is None or malformed is not None:
                            continue
                        if data.strip() == DONE:
                            finished = True
                            continue
                        try:
                            chunk = parse_chunk(data)
                            for choice in chunk.get("choices") or []:
                                delta = choice.get("delta") or {}
                                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                                if isinstance(reasoning, str) and reasoning:
                                    field_thinking = True
                                    on_think(reasoning)
                                content = delta.get("content")
                                if isinstance(content, str) and content:
                                    if field_thinking:
                                        field_thinking = False
                                        if emit:
                                            ctx.emit_thinking_end()
                                    for kind, piece in splitter.feed(content):
                                        _route(kind, piece, on_text, on_think, ctx, emit)
                                if delta.get("tool_calls") is not None:
                                    assembler.feed(delta["tool_calls"])
                                if choice.get("finish_reason"):
                                    finished = True
                        except StreamFormatError as exc:
                            malformed = exc
                            drain.deadline = trio.current_time() + DRAIN_S
                except httpx.TimeoutException:
                    if malformed is None:
                        stalled = f"The model endpoint stopped sending for {self.s.timeout_s:g} s"
                        raise ModelCallError(f"{stalled} in the middle of the answer.", "timeout") from None
                except (httpx.TransportError, httpx.StreamError):
                    if malformed is None:
                        raise ModelCallError(
                            "The connection to the model endpoint broke in the middle of the answer.", "broken"
                        ) from None
        if malformed is not None:
            raise ModelCallError(f"The model endpoint sent a malformed stream ({malformed}).", "malformed")
        for kind, piece in splitter.flush():
            _route(kind, piece, on_text, on_think, ctx, emit)
        if emit and (field_thinking or splitter.inside):
            ctx.emit_thinking_end()
        if not finished:
            raise ModelCallError("The model's answer stream ended before it was complete.", "incomplete")
        turn.text = "".join(text)
        for i, call in enumerate(assembler.calls()):
            if not call.name:
                raise ModelCallError("The model endpoint sent a tool call without a name.", "malformed")
            turn.tool_calls.append(
                {
                    "id": call.id or f"call_{i}",
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            )
        return turn

    # -- HTTP --------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.s.api_key}"} if self.s.api_key else {}
        timeout = httpx.Timeout(self.s.timeout_s, connect=min(10.0, self.s.timeout_s))
        return httpx.AsyncClient(base_url=self.s.base_url, headers=headers, timeout=timeout, trust_env=False)

    @asynccontextmanager
    async def _request(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        """POST /chat/completions and yield a response with a 2xx status.

        Retries 429 and 5xx (and refused connections) with exponential backoff and jitter,
        at most ``RETRY_ATTEMPTS`` times; the waits are plain ``trio.sleep`` inside the
        run's cancel scope, so a stop ends them at once. Raises :class:`AgentError`.
        """
        body = {"model": self.s.model, **payload}
        if self.s.temperature is not None:
            body["temperature"] = self.s.temperature
        if self.s.max_tokens is not None:
            body["max_tokens"] = self.s.max_tokens
        for attempt in range(RETRY_ATTEMPTS):
            retry_after: float | None = None
            try:
                async with client.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code < 300:
                        yield response
                        return
                    text = (await response.aread()).decode("utf-8", "replace")[:500]
                    error = ModelHTTPError(response.status_code, text)
                    retry_after = _retry_after(response)
            except httpx.ConnectError:
                error = ModelHTTPError(0, "connection refused")
            except httpx.TimeoutException:
                late = f"The model endpoint did not answer within {self.s.timeout_s:g} s."
                raise ModelCallError(late, "timeout") from None
            except httpx.TransportError:
                raise ModelCallError("The connection to the model endpoint failed.", "broken") from None
            retryable = error.status in (0, 429) or error.status >= 500
            if not retryable or attempt == RETRY_ATTEMPTS - 1:
                raise self._explain(error)
            self._metrics.model_error(error.kind)  # this attempt failed; the call goes on
            delay = retry_after if retry_after is not None else RETRY_BASE_S * 2**attempt
            log.warning("model.retry", status=error.status, attempt=attempt + 1, delay_s=round(delay, 2))
            await trio.sleep(min(delay, 10.0) * random.uniform(0.8, 1.2))
        raise AssertionError("unreachable")

    def _explain(self, error: ModelHTTPError) -> ModelCallError:
        status = error.status
        where = self.s.base_url
        if status == 0:
            message = f"Could not connect to the model endpoint at {where}."
        elif status == 401 or status == 403:
            message = f"The model endpoint refused the API key (HTTP {status}). Check NAVI_OPENAI_API_KEY."
        elif status == 404:
            message = (
                f"The model endpoint does not know the model {self.s.model!r} (HTTP 404). Check NAVI_OPENAI_MODEL."
            )
        elif status == 429:
            message = "The model endpoint is rate-limiting requests (HTTP 429); try again in a moment."
        elif status >= 500:
            message = f"The model endpoint failed (HTTP {status}); try again in a moment."
        else:
            message = f"The model endpoint rejected the request (HTTP {status})."
        return ModelCallError(self._scrub(message), error.kind)

    def _scrub(self, text: str) -> str:
        return text.replace(self.s.api_key, "[redacted]") if self.s.api_key else text


def _route(kind: str, piece: str, on_text: Any, on_think: Any, ctx: RunContext, emit: bool) -> None:
    if kind == "text":
        on_text(piece)
    elif kind == "think":
        on_think(piece)
    elif kind == "think_end" and emit:
        ctx.emit_thinking_end()


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _image_url(img: str) -> str:
    return img if img.startswith("data:") else f"data:image/png;base64,{img}"


def _estimate_tokens(summary: str | None, history: list[dict[str, Any]]) -> int:
    chars = len(summary or "") + sum(len(m["content"] or "") for m in history)
    return chars // 4

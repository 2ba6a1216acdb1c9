"""The ``scripted`` agent of CONTRACT section 4: plays ``{"script": [step, ...]}``.

It needs no model and paces like one: a text step with a delay runs on a fixed schedule
from the step's start (``sleep_until``), so 200 concurrent sessions do not drift the way
relative sleeps would. A text step with no delay is a burst, like a model's tokens
arriving in one network read: it yields to the scheduler every ``BURST`` deltas, which is
also how often a stop can land.
"""

from __future__ import annotations

import re
import time
from typing import Any, Final

import attrs
import orjson
import trio

from ..errors import AgentError, ScriptTooLarge
from .base import RunContext
from .pacing import Pacer

BURST: Final = 8
#: What ``"stamp": true`` puts before each delta: ``[t=<unix time, 6 decimals>]``.
STAMP_CHARS: Final = len("[t=1700000000.000000]")
#: The demonstration answer streams its words at a model's pace.
DEMO_WORD_DELAY_S: Final = 0.02
_WORD = re.compile(r"\S+\s*")


class ScriptError(AgentError):
    """A script step the scripted agent does not understand."""


@attrs.frozen
class ScriptBounds:
    """How much one script may ask for (CONTRACT section 4): the scripted agent is the
    default and anyone who can send a message can send a script, so
    ``{"text": "x", "repeat": 10**9}`` must be refused before it plays, not after it
    has taken the server's memory."""

    max_events: int = 100_000
    max_chars: int = 10_000_000
    max_seconds: float = 3600.0

    def check(self, steps: list[Any]) -> None:
        """Raise :class:`ScriptTooLarge` naming the first bound ``steps`` would pass.

        Steps the agent would refuse while playing (a wrong type, a negative repeat) count
        for nothing here: playing them ends the run with the step's own error.
        """
        events = 0
        chars = 0
        seconds = 0.0
        for step in steps:
            if not isinstance(step, dict):
                continue
            if isinstance(think := step.get("think"), str):
                events += len(_WORD.findall(think)) + 1
                chars += len(think)
            elif isinstance(text := step.get("text"), str):
                repeat = _lenient_int(step.get("repeat", 1))
                events += repeat
                chars += repeat * (len(text) + (STAMP_CHARS if step.get("stamp") is True else 0))
                seconds += max(repeat - 1, 0) * _lenient_number(step.get("delay", 0))
            elif "tool" in step:
                events += 2
                result = step.get("result", "")
                chars += len(result) if isinstance(result, str) else 0
                seconds += _lenient_number(step.get("delay", 0))
            elif "sleep" in step:
                seconds += _lenient_number(step.get("sleep"))
            elif step.get("compress") is True:
                events += 1
        if events > self.max_events:
            raise ScriptTooLarge(f"Script too large: {events} events (max {self.max_events}, NAVI_SCRIPT_MAX_EVENTS).")
        if chars > self.max_chars:
            raise ScriptTooLarge(
                f"Script too large: {chars} characters of text (max {self.max_chars}, NAVI_SCRIPT_MAX_CHARS)."
            )
        if seconds > self.max_seconds:
            raise ScriptTooLarge(
                f"Script too long: {seconds:g} seconds of delays and sleeps "
                f"(max {self.max_seconds:g}, NAVI_SCRIPT_MAX_SECONDS)."
            )


class ScriptedAgent:
    def __init__(self, pacer: Pacer | None = None, *, bounds: ScriptBounds | None = None) -> None:
        #: Paces text steps; the server runs ``pacer.serve`` in its nursery.
        self.pacer = pacer if pacer is not None else Pacer()
        self.bounds = bounds if bounds is not None else ScriptBounds()
        # Tool threads are abandoned on stop; bound how many can pile up.
        self._tool_threads = trio.CapacityLimiter(64)

    def check_message(self, user_message: str) -> None:
        """Refuse a script over :attr:`bounds` before any run starts for it (the run
        registry asks every agent that has this method). Raises :class:`ScriptTooLarge`."""
        steps = parse_script(user_message)
        if steps is not None:
            self.bounds.check(steps)

    async def play(self, ctx: RunContext) -> None:
        steps = parse_script(ctx.user_message)  # the notes on images/files are not part of it
        if steps is None:
            await self._demo(ctx)
            return
        try:
            self.bounds.check(steps)  # also when played without the registry's check
        except ScriptTooLarge as exc:
            raise ScriptError(str(exc)) from None
        for i, step in enumerate(steps):
            await self._step(ctx, i, step)

    async def _demo(self, ctx: RunContext) -> None:
        """A short demonstration: a thinking step, one tool call, the text echoed back."""
        ctx.emit_thinking("Echoing the message back, word by word.")
        ctx.emit_thinking_end()
        await trio.lowlevel.checkpoint()
        words = _WORD.findall(ctx.content) or [ctx.content]
        ctx.emit_tool_started("echo", {"words": len(words)})
        await trio.lowlevel.checkpoint()
        ctx.emit_tool_call(f"{len(words)} words", success=True)
        start = trio.current_time()
        for i, word in enumerate(words):
            if i:
                await self.pacer.sleep_until(start + i * DEMO_WORD_DELAY_S)
            ctx.emit_text(word)

    async def _step(self, ctx: RunContext, index: int, step: Any) -> None:
        if not isinstance(step, dict):
            raise ScriptError(f"Script step {index} is not an object")
        if "think" in step:
            text = _str(step, "think", index)
            for word in _WORD.findall(text) or [text]:
                ctx.emit_thinking(word)
            ctx.emit_thinking_end()
            await trio.lowlevel.checkpoint()
        elif "text" in step:
            await self._text(ctx, index, step)
        elif "tool" in step:
            await self._tool(ctx, index, step)
        elif "sleep" in step:
            await trio.sleep(_number(step, "sleep", index))
        elif step.get("compress") is True:
            ctx.emit_context_compressed()
            await trio.lowlevel.checkpoint()
        elif "error" in step:
            raise AgentError(_str(step, "error", index))
        elif step.get("crash") is True:
            raise RuntimeError(f"scripted crash at step {index}")
        else:
            raise ScriptError(f"Script step {index} has no known action")

    async def _text(self, ctx: RunContext, index: int, step: dict[str, Any]) -> None:
        chunk = _str(step, "text", index)
        repeat = step.get("repeat", 1)
        if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 0:
            raise ScriptError(f"Script step {index}: repeat must be a non-negative integer")
        delay = _number(step, "delay", index, default=0.0)
        stamp = step.get("stamp") is True
        start = trio.current_time()
        for i in range(repeat):
            if delay:
                if i:
                    await self.pacer.sleep_until(start + i * delay)
            elif i % BURST == BURST - 1:
                await trio.lowlevel.checkpoint()
            ctx.emit_text(f"[t={time.time():.6f}]{chunk}" if stamp else chunk)
        await trio.lowlevel.checkpoint()

    async def _tool(self, ctx: RunContext, index: int, step: dict[str, Any]) -> None:
        tool = _str(step, "tool", index)
        args = step.get("args", {})
        result = step.get("result", "")
        if not isinstance(result, str):
            result = orjson.dumps(result).decode()
        success = step.get("success", True) is not False
        delay = _number(step, "delay", index, default=0.0)
        ctx.emit_tool_started(tool, args)
        if step.get("thread") is True:
            # A stop abandons the thread: the run ends now, the sleep finishes unobserved.
            await trio.to_thread.run_sync(time.sleep, delay, abandon_on_cancel=True, limiter=self._tool_threads)
        elif delay:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()
        ctx.emit_tool_call(result, success=success)


def parse_script(content: str) -> list[Any] | None:
    """The steps of ``{"script": [...]}`` content, or None for any other content."""
    if not content.lstrip().startswith("{"):
        return None
    try:
        spec = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    if isinstance(spec, dict):
        steps = spec.get("script")
        if isinstance(steps, list):
            return steps
    return None


def _lenient_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _lenient_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return 0.0
    return float(value)


def _str(step: dict[str, Any], key: str, index: int) -> str:
    value = step.get(key)
    if not isinstance(value, str):
        raise ScriptError(f"Script step {index}: {key} must be a string")
    return value


def _number(step: dict[str, Any], key: str, index: int, default: float | None = None) -> float:
    value = step.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise ScriptError(f"Script step {index}: {key} must be a non-negative number")
    return float(value)

"""Built-in tools for model agents: clock, calculator, list_files, read_file.

Each tool gets the user and session explicitly (through :class:`ToolContext`) and the
file tools read only inside that session's own upload folder. Blocking work runs in a
worker thread a stop abandons. A tool failure is a :class:`ToolError`: its text goes
back to the model (``success: false``) and the run goes on.
"""

from __future__ import annotations

import ast
import datetime as dt
import math
import operator
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from .. import uploads

MAX_READ_BYTES: Final = 100_000
_MAX_POWER: Final = 10_000
_MAX_MAGNITUDE: Final = 1e300


class ToolError(Exception):
    """A tool could not do what was asked; the message is for the model."""


@attrs.frozen
class ToolContext:
    user_id: str | None
    session_id: str
    #: The session's upload folder (None: uploads not available).
    upload_dir: Path | None


Tool = Callable[[ToolContext, dict[str, Any]], Awaitable[str]]

_threads = trio.CapacityLimiter(16)


async def _in_thread(fn: Callable[[], str]) -> str:
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True, limiter=_threads)


async def clock(ctx: ToolContext, args: dict[str, Any]) -> str:
    await trio.lowlevel.checkpoint()
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


_BINOPS: Final[dict[type, Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: Final[dict[type, Callable[[Any], Any]]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(expression: str) -> int | float:
    """Arithmetic only (numbers, + - * / // % **, parentheses), by walking the AST: no
    ``eval``, no names, no calls, bounded exponents. Raises :class:`ToolError`."""
    if len(expression) > 1000:
        raise ToolError("expression too long")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def walk(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _check(_UNARY[type(node.op)](walk(node.operand)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > _MAX_POWER or abs(left) > _MAX_MAGNITUDE):
                raise ToolError("exponent too large")
            try:
                return _check(_BINOPS[type(node.op)](left, right))
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
            except OverflowError:
                raise ToolError("result too large") from None
        raise ToolError(f"not allowed in a calculation: {ast.dump(node)[:60]}")

    return walk(tree)


def _check(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        raise ToolError("result too large")
    if isinstance(value, int) and value.bit_length() > 4096:
        raise ToolError("result too large")
    return value  # type: ignore[no-any-return]


async def calculator(ctx: ToolContext, args: dict[str, Any]) -> str:
    expression = args.get("expression")
    if not isinstance(expression, str):
        raise ToolError('calculator needs {"expression": "<arithmetic>"}')
    return await _in_thread(lambda: str(evaluate(expression)))


async def list_files(ctx: ToolContext, args: dict[str, Any]) -> str:
    folder = ctx.upload_dir
    if folder is None:
        return "No uploaded files."

    def work() -> str:
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            names = []
        names = [n for n in names if not n.startswith(".")]
        return "\n".join(names) if names else "No uploaded files."

    return await _in_thread(work)


async def read_file(ctx: ToolContext, args: dict[str, Any]) -> str:
    name = args.get("name")
    folder = ctx.upload_dir
    if not isinstance(name, str) or folder is None:
        raise ToolError('read_file needs {"name": "<an uploaded file>"}')

    def work() -> str:
        try:
            path = uploads.resolve_in(folder, name)
        except uploads.BadUpload as exc:
            raise ToolError(str(exc)) from None
        with open(path, "rb") as f:
            data = f.read(MAX_READ_BYTES + 1)
        text = data[:MAX_READ_BYTES].decode("utf-8", errors="replace")
        return text + ("\n[truncated]" if len(data) > MAX_READ_BYTES else "")

    return await _in_thread(work)


BUILTIN_TOOLS: Final[dict[str, Tool]] = {
    "clock": clock,
    "calculator": calculator,
    "list_files": list_files,
    "read_file": read_file,
}

SCHEMAS: Final[list[dict[str, Any]]] = [
    {
        "type": "function",
        "function": {
            "name": "clock",
            "description": "The current date and time (UTC, ISO 8601).",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "list_files",
            "description": "List the files the user uploaded to this conversation.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file the user uploaded to this conversation (text, up to 100 kB).",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        },
    },
]

DELEGATE_SCHEMA: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": "delegate",
        "description": "Hand a self-contained sub-task to a helper agent with the same tools; returns its answer.",
        "parameters": {"type": "object", "properties": {"task": {"type": "string"}}, "required": ["task"]},
    },
}

"""structlog setup: a console renderer in a terminal, JSON lines otherwise.

Context (session_id, run_id, conn_id, user_id) is bound with contextvars in each
long-lived task (STYLE P15). Never bind or log a token.

A log line that cannot be written (stderr a pipe whose reader went away, a full disk) is
dropped and counted (:func:`dropped_lines`): logging is a side channel and must never end,
stall or corrupt a run, a request or the server (CONTRACT section 1). The same holds for
hypercorn's own error and access logs (:func:`guard_stdlib_logger`).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import structlog

#: What a failed write raises: ``OSError`` (EPIPE, ENOSPC, EIO, ...) or ``ValueError``
#: (the stream was closed).
_WRITE_ERRORS = (OSError, ValueError)


class _DropCounter:
    """The one count of log lines dropped since start (any thread may drop one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        return self._count


_dropped = _DropCounter()


def dropped_lines() -> int:
    """How many log lines could not be written since the process started."""
    return _dropped.count


class SafePrintLogger(structlog.PrintLogger):
    """structlog's ``PrintLogger``, dropping (and counting) a line it cannot write."""

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except _WRITE_ERRORS:
            _dropped.add()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class SafePrintLoggerFactory:
    """Produce :class:`SafePrintLogger` s writing to ``file`` (structlog's ``logger_factory``)."""

    def __init__(self, file: Any = None) -> None:
        self._file = file

    def __call__(self, *args: Any) -> SafePrintLogger:
        return SafePrintLogger(self._file)


def _handle_error(original: Any, record: logging.LogRecord) -> None:
    """``Handler.handleError`` that drops a line the stream could not take, counted.

    The standard one writes a traceback to stderr for each such line, which is the
    stream that is broken more often than not; other errors (a bad format) keep it."""
    if isinstance(sys.exc_info()[1], _WRITE_ERRORS):
        _dropped.add()
    else:
        original(record)


def guard_stdlib_logger(logger: logging.Logger) -> None:
    """Make every handler of ``logger`` drop and count the lines it cannot write."""
    for handler in logger.handlers:
        if not getattr(handler, "_navi_guarded", False):
            original = handler.handleError

            def handle_error(record: logging.LogRecord, original: Any = original) -> None:
                _handle_error(original, record)

            handler.handleError = handle_error  # type: ignore[method-assign]
            handler._navi_guarded = True  # type: ignore[attr-defined]


def guard_hypercorn_loggers() -> None:
    """:func:`guard_stdlib_logger` for hypercorn's error and access loggers as they are."""
    for name in ("hypercorn.error", "hypercorn.access"):
        guard_stdlib_logger(logging.getLogger(name))


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once at start (hypercorn keeps its own error log)."""
    try:
        json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    except _WRITE_ERRORS:  # stderr already closed
        json_lines = True
    level_no = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if json_lines:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=SafePrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

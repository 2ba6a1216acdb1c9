"""Hypercorn's access log, with tokens redacted (CONTRACT section 6: no token in any log).

A browser passes its token as ``?token=`` on the WebSocket URL, and API clients send an
``Authorization`` header; both are access-log atoms in hypercorn. This logger class
replaces them, and drops the environment atoms (which may hold API keys).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from hypercorn.logging import Logger

from .logs import guard_hypercorn_loggers

if TYPE_CHECKING:
    from hypercorn.config import Config
    from hypercorn.typing import ResponseSummary, WWWScope

_PAIR = re.compile(r"(^|[?&])([^=&?\s]*)=([^&\s]*)")
_SECRET_KEYS = frozenset({"token", "access_token"})
REDACTED = "[redacted]"


def redact_query(text: str) -> str:
    """Replace the value of every ``token``/``access_token`` pair, judging each key as the
    server decodes it (``tok%65n`` is ``token``)."""

    def sub(m: re.Match[str]) -> str:
        if unquote_plus(m.group(2)).lower() in _SECRET_KEYS:
            return f"{m.group(1)}{m.group(2)}={REDACTED}"
        return m.group(0)

    return _PAIR.sub(sub, text)


class RedactingLogger(Logger):
    """hypercorn's logger with tokens redacted, ``-`` meaning stderr for the access log
    too (hypercorn's own default for it is stdout, where ``navi-trio serve`` prints its
    URL), and lines that cannot be written dropped and counted (:mod:`navi_trio.logs`)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if config.accesslog == "-" and self.access_logger is not None:
            for handler in self.access_logger.handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                    handler.setStream(sys.stderr)
        guard_hypercorn_loggers()

    def atoms(self, request: WWWScope, response: ResponseSummary | None, request_time: float) -> Mapping[str, str]:
        atoms: dict[str, Any] = dict(super().atoms(request, response, request_time))
        for key in list(atoms):
            if key.endswith("}e"):
                del atoms[key]
            elif key == "{authorization}i":
                atoms[key] = REDACTED
        for key in ("q", "R", "Uq"):
            if key in atoms and isinstance(atoms[key], str):
                atoms[key] = redact_query(atoms[key])
        return _Atoms(atoms)


class _Atoms(dict[str, Any]):
    """Like hypercorn's atoms: a missing key logs as ``-``."""

    def __missing__(self, key: str) -> str:
        if key.startswith("{") and key != key.lower():
            value: str = self.get(key.lower(), "-")
            return value
        return "-"

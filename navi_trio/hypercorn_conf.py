"""Hypercorn settings for the documented deployment, read from ``NAVI_*``:

    hypercorn --worker-class trio --config python:navi_trio.hypercorn_conf navi_trio.asgi:app

Without it hypercorn keeps its 16 MiB WebSocket message limit (the contract's 50 MB of
images could not arrive) and a 3 s graceful timeout (shorter than the runs' grace); the
app then logs a warning saying so (``navi_trio.asgi``), seeing no mark from this module.
"""

from __future__ import annotations

import os

from . import server
from .access_log import RedactingLogger
from .settings import Settings

_settings = Settings.from_env()
os.environ[server.HYPERCORN_CONF_MARK] = "1"  # the mark the app checks (hypercorn's workers inherit it)

worker_class = "trio"
bind = [f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host else f"{_settings.host}:{_settings.port}"]
graceful_timeout = server.graceful_timeout(_settings)
websocket_max_message_size = server.WEBSOCKET_MAX_MESSAGE
accesslog = _settings.access_log or None
logger_class = RedactingLogger

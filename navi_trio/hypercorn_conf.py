"""Hypercorn settings for the documented deployment, read from ``NAVI_*``:

    hypercorn --worker-class trio --config python:navi_trio.hypercorn_conf navi_trio.asgi:app

Without it hypercorn keeps its 16 MiB WebSocket message limit (the contract's 50 MB of
images could not arrive) and a 3 s graceful timeout (shorter than the runs' grace).
"""

from __future__ import annotations

from .access_log import RedactingLogger
from .server import WEBSOCKET_MAX_MESSAGE
from .settings import Settings

_settings = Settings.from_env()

worker_class = "trio"
bind = [f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host else f"{_settings.host}:{_settings.port}"]
graceful_timeout = _settings.grace_s + _settings.save_timeout_s + 2.0
websocket_max_message_size = WEBSOCKET_MAX_MESSAGE
accesslog = _settings.access_log or None
logger_class = RedactingLogger

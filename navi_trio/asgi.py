"""``hypercorn --worker-class trio navi_trio.asgi:app``: the app, configured from ``NAVI_*``.

Hypercorn's own shutdown trigger gives the app no notice before connections are torn
down, so the app listens for SIGINT/SIGTERM itself: a Ctrl-C in a terminal or a stop by
systemd (which signals the whole group) reaches the worker, which drains as
``navi-trio serve`` does. A signal sent to hypercorn's parent process alone still ends
every run with a terminal event and an ``interrupted`` answer, but only after hypercorn
has closed the connections (1012).
"""

from __future__ import annotations

import os

import structlog

from .app import create_app
from .logs import configure_logging
from .server import HYPERCORN_CONF_MARK, WEBSOCKET_MAX_MESSAGE, graceful_timeout, tune_gc
from .settings import Settings

#: hypercorn's own defaults (hypercorn.config.Config), which the config module replaces.
HYPERCORN_DEFAULT_WEBSOCKET_MAX_MESSAGE = 16 * 1024 * 1024
HYPERCORN_DEFAULT_GRACEFUL_TIMEOUT_S = 3.0


def warn_without_config(settings: Settings) -> None:
    """Log one warning if hypercorn was started without ``navi_trio.hypercorn_conf``:
    its defaults take away part of the contract, and an operator should hear which."""
    if os.environ.get(HYPERCORN_CONF_MARK) == "1":
        return
    structlog.get_logger("navi_trio.asgi").warning(
        "hypercorn.started_without_config",
        fix="hypercorn --config python:navi_trio.hypercorn_conf navi_trio.asgi:app",
        websocket_max_message_mib=HYPERCORN_DEFAULT_WEBSOCKET_MAX_MESSAGE // 2**20,
        needed_mib=WEBSOCKET_MAX_MESSAGE // 2**20,
        graceful_timeout_s=HYPERCORN_DEFAULT_GRACEFUL_TIMEOUT_S,
        needed_s=graceful_timeout(settings),
        message=(
            "hypercorn's defaults are in force: WebSocket messages over 16 MiB are refused (1009), "
            "so a message within the 50 MB image budget may not arrive; and connections get 3 s "
            f"to close on shutdown, less than the runs' grace (NAVI_GRACE_S={settings.grace_s:g}), "
            "so clients may miss their terminal event"
        ),
    )


_settings = Settings.from_env()
configure_logging(_settings.log_format, _settings.log_level)
warn_without_config(_settings)
app = create_app(_settings, watch_signals=True)
tune_gc()

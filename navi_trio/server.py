"""Serving: ``hypercorn.trio.serve`` inside our own ``trio.run`` (STYLE P1, P13).

Our shutdown trigger hears SIGINT/SIGTERM first, tells the app to drain (runs get
``grace_s``, then stop with reason ``shutdown``, then every WebSocket closes with 1012),
and returns, so hypercorn stops accepting at once. A second Ctrl-C exits immediately:
once the signal receiver is closed, trio's own KeyboardInterrupt handling is back.
"""

from __future__ import annotations

import signal
import sys
from functools import partial
from typing import TextIO

import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from .app import NaviApp
from .settings import Settings

log = structlog.get_logger("navi_trio.server")

#: hypercorn's per-message WebSocket limit: room for the 50 MB image budget, base64'd.
WEBSOCKET_MAX_MESSAGE = 72 * 1024 * 1024


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    # Connections must outlive the drain: grace for the runs, then their save, then 1012.
    config.graceful_timeout = settings.grace_s + settings.save_timeout_s + 2.0
    config.websocket_max_message_size = WEBSOCKET_MAX_MESSAGE
    config.accesslog = None
    return config


async def wait_for_signal(app: NaviApp) -> None:
    """The shutdown trigger: return on the first SIGINT/SIGTERM, telling the app first."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("server.signal", signal=signal.Signals(signum).name)
            break
    app.begin_shutdown()


async def serve(
    settings: Settings,
    *,
    out: TextIO = sys.stdout,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM; print the URL (with the real port) once listening."""
    app = NaviApp(settings)
    config = hypercorn_config(settings)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn_serve, app, config, shutdown_trigger=partial(wait_for_signal, app)),  # type: ignore[arg-type]
        )
        for url in binds:
            print(f"navi-trio listening on {url}", file=out, flush=True)
        task_status.started(binds)

"""Serving: ``hypercorn.trio.serve`` inside our own ``trio.run`` (STYLE P1, P13).

Our shutdown trigger hears SIGINT/SIGTERM first, tells the app to drain (runs get
``grace_s``, then stop with reason ``shutdown``, then every WebSocket closes with 1012),
and returns, so hypercorn stops accepting at once. A second Ctrl-C exits immediately:
once the signal receiver is closed, trio's own KeyboardInterrupt handling is back.
"""

from __future__ import annotations

import signal
import socket
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


def listening_socket(host: str, port: int, send_timeout_s: float) -> int:
    """Bind the listening socket ourselves and hand its fd to hypercorn (``fd://``).

    Why: hypercorn writes to a client inside a shielded ``send_all`` with no deadline, so
    a client that stops reading (a frozen tab, a suspended phone) could hold a graceful
    shutdown forever. ``TCP_USER_TIMEOUT``, inherited by every accepted socket, makes
    the kernel fail such a write after ``send_timeout_s`` instead (Linux; elsewhere the
    option is skipped).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout_s * 1000))
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock.detach()


def hypercorn_config(settings: Settings) -> Config:
    """The hypercorn configuration for ``settings``; binds the listening socket."""
    config = Config()
    config.bind = [f"fd://{listening_socket(settings.host, settings.port, settings.send_timeout_s)}"]
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
    try:
        config = hypercorn_config(settings)
    except OSError as exc:
        raise SystemExit(f"navi-trio: cannot listen on {settings.host}:{settings.port}: {exc}") from None
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn_serve, app, config, shutdown_trigger=partial(wait_for_signal, app)),  # type: ignore[arg-type]
        )
        for url in binds:
            print(f"navi-trio listening on {url}", file=out, flush=True)
        task_status.started(binds)

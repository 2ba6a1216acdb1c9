"""Serving: ``hypercorn.trio.serve`` inside our own ``trio.run`` (STYLE P1, P13).

Our shutdown trigger hears SIGINT/SIGTERM first, tells the app to drain (runs get
``grace_s``, then stop with reason ``shutdown``, then every WebSocket closes with 1012),
and returns, so hypercorn stops accepting at once. A second signal exits immediately.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from typing import TextIO

import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from .access_log import RedactingLogger
from .app import NaviApp
from .settings import Settings

log = structlog.get_logger("navi_trio.server")

#: hypercorn's per-message WebSocket limit: room for the 50 MB image budget, base64'd.
WEBSOCKET_MAX_MESSAGE = 72 * 1024 * 1024


#: Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect cyclic garbage less often, and never rescan what exists at start.

    Why: a streaming server allocates a few small objects per event and keeps many alive
    (run logs, connection state); with CPython's defaults the cycle collector ran so often
    that it doubled the p99 event latency of 200 paced sessions (bench scenario 6: 163-186
    ms -> 77-83 ms). Reference counting still frees almost everything at once; only
    cycles wait a little longer. ``gc.freeze`` moves the objects alive after start-up (the
    modules, the app) out of every later collection.
    """
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)
    gc.freeze()


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
    config.accesslog = settings.access_log or None
    config.logger_class = RedactingLogger
    return config


async def serve(
    settings: Settings,
    *,
    out: TextIO = sys.stdout,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM; print the URL (with the real port) once listening.

    The signal receiver is open before the socket listens and stays open to the end, so
    no signal can land in an arbitrary task as ``KeyboardInterrupt`` (STYLE P13). The
    first signal starts the graceful drain; a second one exits the process at once
    (status 130): the operator asked for it, and SQLite's WAL keeps the file sound.
    """
    app = NaviApp(settings)
    try:
        config = hypercorn_config(settings)
    except OSError as exc:
        raise SystemExit(f"navi-trio: cannot listen on {settings.host}:{settings.port}: {exc}") from None
    first_signal = trio.Event()
    tune_gc()

    async def shutdown_trigger() -> None:
        await first_signal.wait()
        app.begin_shutdown()  # tell the app first; returning stops hypercorn accepting

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            # hypercorn_serve calls task_status.started(binds) itself.
            async def serve_then_stop(*, task_status: trio.TaskStatus[list[str]]) -> None:  # noqa: ASYNC114, ASYNC128
                await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)  # type: ignore[arg-type]
                nursery.cancel_scope.cancel(reason="server stopped")

            binds: list[str] = await nursery.start(serve_then_stop)
            for url in binds:
                print(f"navi-trio listening on {url}", file=out, flush=True)
            task_status.started(binds)
            async for signum in signals:
                name = signal.Signals(signum).name
                if not first_signal.is_set():
                    log.info("server.signal", signal=name)
                    first_signal.set()
                else:
                    log.warning("server.exit_now", signal=name)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(130)

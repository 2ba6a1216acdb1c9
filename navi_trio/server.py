"""Serving: ``hypercorn.trio.serve`` inside our own ``trio.run`` (STYLE P1, P13).

Our shutdown trigger hears SIGINT/SIGTERM first, tells the app to drain (runs get
``grace_s``, then stop with reason ``shutdown``, then every WebSocket closes with 1012),
and returns, so hypercorn stops accepting at once. A second signal exits immediately.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
from contextlib import suppress
from typing import TextIO

import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.utils import LifespanFailureError

from .access_log import RedactingLogger
from .app import NaviApp
from .settings import Settings

log = structlog.get_logger("navi_trio.server")

#: hypercorn's per-message WebSocket limit: room for the 50 MB image budget, base64'd.
WEBSOCKET_MAX_MESSAGE = 72 * 1024 * 1024

#: The environment variable ``navi_trio.hypercorn_conf`` sets in hypercorn's process (its
#: workers inherit it): the app served by hypercorn's CLI checks it to warn when started
#: without that config.
HYPERCORN_CONF_MARK = "NAVI_HYPERCORN_CONF_LOADED"


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


def graceful_timeout(settings: Settings) -> float:
    """Connections must outlive the drain: grace for the runs, then their save, then 1012."""
    return settings.grace_s + settings.save_timeout_s + 2.0


def hypercorn_config(settings: Settings) -> Config:
    """The hypercorn configuration for ``settings``; binds the listening socket."""
    config = Config()
    config.bind = [f"fd://{listening_socket(settings.host, settings.port, settings.send_timeout_s)}"]
    config.graceful_timeout = graceful_timeout(settings)
    config.websocket_max_message_size = WEBSOCKET_MAX_MESSAGE
    config.accesslog = settings.access_log or None
    config.logger_class = RedactingLogger
    return config


def _not_running_on(record: logging.LogRecord) -> bool:
    """Drop hypercorn's own "Running on ..." line: ``navi-trio serve`` prints its URL once."""
    return not str(record.msg).startswith("Running on ")


async def serve(
    settings: Settings,
    *,
    app: NaviApp | None = None,
    out: TextIO = sys.stdout,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM; print the URL (with the real port) once listening.

    The signal receiver is open before the socket listens and stays open to the end, so
    no signal can land in an arbitrary task as ``KeyboardInterrupt`` (STYLE P13). The
    first signal starts the graceful drain; a second one exits the process at once
    (status 130): the operator asked for it, and SQLite's WAL keeps the file sound.

    Raises ``SystemExit`` with one line naming the cause if the server cannot start (the
    port is taken, the store cannot be opened: no URL is printed then), or if its run
    supervisor fails while serving (after a graceful stop: the process must not go on
    half-dead).
    """
    app = NaviApp(settings) if app is None else app
    _say(out, f"navi-trio: {_store_line(settings)}")
    try:
        config = hypercorn_config(settings)
    except OSError as exc:
        raise SystemExit(f"navi-trio: cannot listen on {settings.host}:{settings.port}: {exc}") from None
    if config.log.error_logger is not None:
        config.log.error_logger.addFilter(_not_running_on)
    first_signal = trio.Event()
    tune_gc()

    async def shutdown_trigger() -> None:
        async with trio.open_nursery() as nursery:
            for event in (first_signal, app.failed):
                nursery.start_soon(_wait_then_cancel, event, nursery.cancel_scope)
        app.begin_shutdown()  # tell the app first; returning stops hypercorn accepting

    cannot_start = False
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                # hypercorn_serve calls task_status.started(binds) itself.
                async def serve_then_stop(*, task_status: trio.TaskStatus[list[str]]) -> None:  # noqa: ASYNC114, ASYNC128
                    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)  # type: ignore[arg-type]
                    nursery.cancel_scope.cancel(reason="server stopped")

                binds: list[str] = await nursery.start(serve_then_stop)
                if app.services is None:  # the startup failed; hypercorn is about to raise it
                    await trio.sleep_forever()
                for url in binds:
                    _say(out, f"navi-trio listening on {url}")
                task_status.started(binds)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not first_signal.is_set():
                        log.info("server.signal", signal=name)
                        again = "Ctrl-C" if signum == signal.SIGINT else name
                        grace = f"active runs get up to {settings.grace_s:g} s"
                        _say(out, f"navi-trio: {name}: shutting down ({grace}); {again} again exits at once")
                        first_signal.set()
                    else:
                        log.warning("server.exit_now", signal=name)
                        with suppress(OSError, ValueError):
                            sys.stdout.flush()
                            sys.stderr.flush()
                        os._exit(130)
    except* LifespanFailureError:
        cannot_start = app.startup_error is not None
        if not cannot_start:
            raise
    if cannot_start:
        raise SystemExit(f"navi-trio: cannot start: {app.startup_error}")
    if app.failure is not None:
        raise SystemExit(f"navi-trio: {app.failure}; exiting")


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _store_line(settings: Settings) -> str:
    if settings.store == "memory":
        return "memory store: nothing is kept after exit"
    return f"data dir {settings.data_dir.resolve()}"


def _say(out: TextIO, line: str) -> None:
    """Print a line for the operator; a closed stdout must not stop the server either."""
    with suppress(OSError, ValueError):
        print(line, file=out, flush=True)

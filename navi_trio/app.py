"""The ASGI application: lifespan, HTTP and WebSocket dispatch.

State enters through ``scope["state"]`` (set at lifespan startup, copied by hypercorn
into every connection's scope), never through module globals, so every test can build
its own isolated server (STYLE P2, anti-pattern 15).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from . import uploads
from .agents import make_agent
from .agents.pacing import Pacer
from .broker import InProcessBroker
from .cluster.broker import open_redis_broker
from .connection import CLOSE_RESTART
from .errors import NaviError
from .handshake import handshake
from .http import HttpApi
from .logs import guard_hypercorn_loggers
from .metrics import Metrics
from .origins import OriginPolicy, serve_http
from .protocol_routes import ProtocolRoutes
from .runs import RunRegistry
from .settings import Settings
from .store import open_store
from .tracing import from_env as tracing_from_env
from .web.page import page_asset, serve_page

if TYPE_CHECKING:
    from .asgi_types import Receive, Scope, Send
    from .broker import Broker
    from .store.base import Store

log = structlog.get_logger("navi_trio.app")

STATE_KEY: Final = "navi"
#: How soon a revoked user's open connections are closed (``navi-trio users revoke``
#: runs in another process, so the server looks at the store).
REVOCATION_POLL_S: Final = 1.0
#: How often a cluster's process removes its copies of uploads of sessions deleted elsewhere.
UPLOAD_SWEEP_S: Final = 60.0
#: WebSocket close code once the server cannot go on (RFC 6455 "internal error").
CLOSE_INTERNAL_ERROR: Final = 1011


@contextlib.asynccontextmanager
async def open_broker(settings: Settings) -> AsyncIterator[Broker]:
    """What the processes of this server share: Redis with ``NAVI_REDIS_URL``, else this
    process alone.

    Raises:
        RedisUnavailable: Redis does not answer at startup (a startup failure).
    """
    if not settings.redis_url:
        yield InProcessBroker()
        return
    async with open_redis_broker(settings) as broker:
        yield broker


class Services:
    """What the lifespan task opens and every connection uses."""

    def __init__(
        self, settings: Settings, registry: RunRegistry, pacer: Pacer, *, health: Callable[[], str | None]
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.http = HttpApi(
            registry, registry.store, settings, health=health, protocols=ProtocolRoutes(registry, settings, pacer)
        )
        self.pacer = pacer
        self.origins = OriginPolicy.parse(settings.allowed_origins)
        #: Counts a request or WebSocket refused for its Origin.
        self.origin_refused = partial(registry.metrics.refused, "origin")


class NaviApp:
    """The ASGI callable. ``begin_shutdown()`` is how a shutdown trigger tells it first."""

    def __init__(self, settings: Settings, *, watch_signals: bool = False) -> None:
        self.settings = settings
        self.services: Services | None = None
        #: Under hypercorn's own CLI nothing tells the app that shutdown began before its
        #: connections are cancelled, so the app listens for SIGINT/SIGTERM itself.
        self._watch_signals = watch_signals
        self._shutdown_requested = trio.Event()
        #: Why the server could not start (the line ``navi-trio serve`` prints), if it could not.
        self.startup_error: str | None = None
        #: Why the server stopped being able to serve, once it did (``/healthz`` says it).
        self.failure: str | None = None
        #: Set when the server nursery failed after startup: the host must stop serving.
        self.failed = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            services = self._services(scope)
            asset = page_asset(scope["path"])
            refused = services.origin_refused
            if asset is None:
                await serve_http(services.origins, services.http, scope, receive, send, refused)
            else:

                async def page(scope: Scope, receive: Receive, send: Send) -> None:
                    await serve_page(asset, scope, send)

                await serve_http(services.origins, page, scope, receive, send, refused)
        elif kind == "websocket":
            await self.websocket(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(scope, receive, send)

    def _services(self, scope: Scope) -> Services:
        services: Services = scope["state"][STATE_KEY]
        return services

    # -- lifespan ----------------------------------------------------------------------
    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Own the server-lifetime nursery from startup to shutdown (STYLE P2).

        A failure while starting (the store cannot be opened, a bad setting) is
        answered with ``lifespan.startup.failed`` naming the cause, whether it came
        straight or wrapped in the nursery's ``ExceptionGroup``. A failure of the nursery
        once serving (its run supervisor gone) makes ``/healthz`` answer 503 and asks the
        host to stop (:attr:`failed`): the process must exit, not serve half-dead.

        Cancellation: when hypercorn cancels the lifespan task, the nursery's runs are
        cancelled from outside and each still writes its terminal event and saves.
        """
        message = await receive()
        assert message["type"] == "lifespan.startup"
        started = stopping = False
        error: Exception | None = None
        try:
            async with (
                open_store(self.settings) as store,
                open_broker(self.settings) as broker,
                trio.open_nursery() as server_nursery,
            ):
                registry = await self._start(scope, store, server_nursery, broker)
                started = True
                await send({"type": "lifespan.startup.complete"})
                message = await receive()  # lifespan.shutdown: every connection has ended
                stopping = True
                await registry.drain(0.0 if registry.closing.is_set() else self.settings.grace_s)
                server_nursery.cancel_scope.cancel(reason="lifespan shutdown")
        except* Exception as group:
            error = _first_error(group)
        if error is None:
            if self.services is not None:
                self.services.registry.metrics.close()
            log.info("server.stopped")
            await send({"type": "lifespan.shutdown.complete"})
        elif not started:
            self.startup_error = _describe(error)
            if self._watch_signals:  # under hypercorn's CLI; `navi-trio serve` prints it itself
                log.error("server.startup_failed", error=self.startup_error)
            await send({"type": "lifespan.startup.failed", "message": self.startup_error})
        else:
            await self._supervisor_failed(error, receive, send, stopping=stopping)

    async def _start(self, scope: Scope, store: Store, server_nursery: trio.Nursery, broker: Broker) -> RunRegistry:
        """Start the server's own tasks in ``server_nursery``; publish the services."""
        settings = self.settings
        guard_hypercorn_loggers()
        # One shared timer for paced runs and every connection's heartbeat.
        pacer = Pacer()
        server_nursery.start_soon(pacer.serve)
        metrics = Metrics(settings.agent, tracing_from_env())
        agent = make_agent(settings, pacer=pacer, metrics=metrics)
        registry = RunRegistry(
            server_nursery,
            store,
            agent,
            broker=broker,
            save_timeout_s=settings.save_timeout_s,
            max_queued_runs=settings.max_queued_runs,
            max_run_events=settings.max_run_events,
            metrics=metrics,
        )
        if not settings.redis_url:
            # In a cluster another process's running answers are not interrupted: a dead
            # owner's runs are ended by the broker's sweep once its lease expires.
            recovered = await store.recover_interrupted()
            if recovered:
                log.warning("store.recovered_interrupted_answers", count=recovered)
        else:
            # A session deleted on another process leaves this one's copies of its uploads.
            server_nursery.start_soon(uploads.sweep_forever, store, UPLOAD_SWEEP_S)
        await server_nursery.start(registry.serve_broker)
        server_nursery.start_soon(registry.serve_checkpoints, settings.checkpoint_s)
        server_nursery.start_soon(registry.serve_revocations, REVOCATION_POLL_S)
        server_nursery.start_soon(metrics.serve_sync, registry)
        services = Services(settings, registry, pacer, health=self.health)
        scope["state"][STATE_KEY] = services
        self.services = services
        server_nursery.start_soon(self._drain_on_request, registry)
        if self._watch_signals:
            server_nursery.start_soon(self._begin_shutdown_on_signal)
        log.info("server.started", store=settings.store, agent=settings.agent, auth=settings.auth)
        return registry

    async def _supervisor_failed(self, error: Exception, receive: Receive, send: Send, *, stopping: bool) -> None:
        """The server nursery is gone (its store closed with it): no run can start or end
        properly any more. Say so on ``/healthz``, close the WebSockets (1011), and have
        the process exit non-zero: ``navi-trio serve`` watches :attr:`failed`; under
        hypercorn's own CLI, failing the lifespan is the only way to end the worker."""
        self.failure = f"The run supervisor failed: {_describe(error)}"
        log.error("server.supervisor_failed", error=_describe(error), exc_info=error)
        if self.services is not None:
            self.services.registry.close_all_followers(CLOSE_INTERNAL_ERROR, "Server error")
        self.failed.set()
        if self._watch_signals:
            await send({"type": "lifespan.shutdown.failed", "message": self.failure})
            return
        if not stopping:
            await receive()  # lifespan.shutdown, once the host has stopped serving
        await send({"type": "lifespan.shutdown.complete"})

    def health(self) -> str | None:
        """Why the server cannot serve (``/healthz`` answers 503 with it), or None."""
        if self.failure is None and self.services is not None and not self.services.registry.broker.healthy:
            return "Redis is unreachable"
        return self.failure

    def begin_shutdown(self) -> None:
        """Start draining (called by the shutdown trigger before hypercorn stops accepting)."""
        self._shutdown_requested.set()

    async def _begin_shutdown_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("server.signal", signal=signal.Signals(signum).name)
                self.begin_shutdown()

    async def _drain_on_request(self, registry: RunRegistry) -> None:
        await self._shutdown_requested.wait()
        log.info("server.draining", grace_s=self.settings.grace_s, runs=len(registry.runs))
        await registry.drain(self.settings.grace_s)
        registry.close_all_followers(CLOSE_RESTART, "Server restarting")

    # -- websocket ---------------------------------------------------------------------
    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, find the session, check access, then serve the connection.

        The handshake is accepted first so that refusals reach the client as close codes
        (4003 authentication / access, 4004 no such session), as the contract says.

        Why two steps: this frame lives as long as the connection, so the handshake's
        locals (query, session, user, the close helper) die with ``handshake`` instead.
        """
        services = self._services(scope)
        opened = await handshake(
            scope,
            receive,
            send,
            services.registry,
            services.settings,
            services.pacer,
            services.origins,
            services.origin_refused,
        )
        if opened is not None:
            conn, resume_run_id, resume_after = opened
            await conn.serve(resume_run_id=resume_run_id, resume_after=resume_after)


def _first_error(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first exception in ``group``, out of any nested groups (a ``StoreError`` in the
    server nursery arrives wrapped; its message is what the operator needs)."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, Exception)
    return error


def _describe(error: Exception) -> str:
    """The operator's one line for ``error``: our own errors say it all; others get a type."""
    text = str(error)
    if isinstance(error, (NaviError, ValueError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def create_app(settings: Settings | None = None, *, watch_signals: bool = False, **overrides: Any) -> NaviApp:
    """Build the app from ``settings`` (default: the ``NAVI_*`` environment)."""
    return NaviApp(settings if settings is not None else Settings.from_env(**overrides), watch_signals=watch_signals)

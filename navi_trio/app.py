"""The ASGI application: lifespan, HTTP and WebSocket dispatch.

State enters through ``scope["state"]`` (set at lifespan startup, copied by hypercorn
into every connection's scope), never through module globals, so every test can build
its own isolated server (STYLE P2, anti-pattern 15).
"""

from __future__ import annotations

import re
import signal
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import structlog
import trio

from .agents import make_agent
from .agents.pacing import Pacer
from .auth import AccessDenied, AuthError, authenticate, bearer_token, check_access
from .connection import CLOSE_DENIED, CLOSE_NOT_FOUND, CLOSE_POLICY, CLOSE_RESTART, Connection
from .errors import StoreError
from .http import HttpApi
from .runs import RunRegistry
from .settings import Settings
from .store import find_session, open_store

if TYPE_CHECKING:
    from .asgi_types import Receive, Scope, Send

log = structlog.get_logger("navi_trio.app")

_WS_PATH: Final = re.compile(r"^/ws/sessions/(?P<sid>[A-Za-z0-9_-]{1,64})$")
STATE_KEY: Final = "navi"
#: How soon a revoked user's open connections are closed (``navi-trio users revoke``
#: runs in another process, so the server looks at the store).
REVOCATION_POLL_S: Final = 1.0


class Services:
    """What the lifespan task opens and every connection uses."""

    def __init__(self, settings: Settings, registry: RunRegistry, pacer: Pacer) -> None:
        self.settings = settings
        self.registry = registry
        self.http = HttpApi(registry, registry.store, settings)
        self.pacer = pacer


class NaviApp:
    """The ASGI callable. ``begin_shutdown()`` is how a shutdown trigger tells it first."""

    def __init__(self, settings: Settings, *, watch_signals: bool = False) -> None:
        self.settings = settings
        self.services: Services | None = None
        #: Under hypercorn's own CLI nothing tells the app that shutdown began before its
        #: connections are cancelled, so the app listens for SIGINT/SIGTERM itself.
        self._watch_signals = watch_signals
        self._shutdown_requested = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._services(scope).http(scope, receive, send)
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

        Cancellation: when hypercorn cancels the lifespan task, the nursery's runs are
        cancelled from outside and each still writes its terminal event and saves.
        """
        message = await receive()
        assert message["type"] == "lifespan.startup"
        settings = self.settings
        try:
            async with open_store(settings) as store, trio.open_nursery() as server_nursery:
                # One shared timer for paced runs and every connection's heartbeat.
                pacer = Pacer()
                server_nursery.start_soon(pacer.serve)
                agent = make_agent(settings, pacer=pacer)
                registry = RunRegistry(
                    server_nursery,
                    store,
                    agent,
                    save_timeout_s=settings.save_timeout_s,
                    max_queued_runs=settings.max_queued_runs,
                    max_run_events=settings.max_run_events,
                )
                recovered = await store.recover_interrupted()
                if recovered:
                    log.warning("store.recovered_interrupted_answers", count=recovered)
                server_nursery.start_soon(registry.serve_checkpoints, settings.checkpoint_s)
                server_nursery.start_soon(registry.serve_revocations, REVOCATION_POLL_S)
                services = Services(settings, registry, pacer)
                scope["state"][STATE_KEY] = services
                self.services = services
                server_nursery.start_soon(self._drain_on_request, registry)
                if self._watch_signals:
                    server_nursery.start_soon(self._begin_shutdown_on_signal)
                log.info("server.started", store=settings.store, agent=settings.agent, auth=settings.auth)
                await send({"type": "lifespan.startup.complete"})
                message = await receive()  # lifespan.shutdown: every connection has ended
                await registry.drain(0.0 if registry.closing.is_set() else settings.grace_s)
                server_nursery.cancel_scope.cancel(reason="lifespan shutdown")
        except (StoreError, ValueError) as exc:
            log.error("server.startup_failed", error=str(exc))
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        log.info("server.stopped")
        await send({"type": "lifespan.shutdown.complete"})

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
        locals (query, session, user, the close helper) die with ``_handshake`` instead.
        """
        opened = await self._handshake(scope, receive, send)
        if opened is not None:
            conn, resume_run_id, resume_after = opened
            await conn.serve(resume_run_id=resume_run_id, resume_after=resume_after)

    async def _handshake(
        self, scope: Scope, receive: Receive, send: Send
    ) -> tuple[Connection, str | None, int | None] | None:
        """Accept the WebSocket, then refuse it with a close code or return its
        :class:`Connection` and resume point (``run_id``, ``after``)."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return None
        services = self._services(scope)
        registry = services.registry
        settings = services.settings
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        await send({"type": "websocket.accept"})

        async def close(code: int, reason: str) -> None:
            await send({"type": "websocket.close", "code": code, "reason": reason})

        try:
            user = await authenticate(
                registry.store, settings.auth, bearer_token(scope["headers"], _first(query, "token"))
            )
        except AuthError as exc:
            await close(CLOSE_DENIED, str(exc))
            return None
        m = _WS_PATH.match(scope["path"])
        session = await find_session(registry.store, m["sid"]) if m else None
        if session is None:
            await close(CLOSE_NOT_FOUND, "Session not found")
            return None
        try:
            check_access(session, user)
        except (AuthError, AccessDenied) as exc:
            await close(CLOSE_DENIED, str(exc))
            return None
        user_id = user.id if user else None
        if user_id is not None and registry.connections_of(user_id) >= settings.max_connections_per_user:
            await close(CLOSE_POLICY, f"Too many connections (max {settings.max_connections_per_user} per user)")
            return None
        conn = Connection(
            registry,
            session.id,
            user_id,
            send,
            receive,
            heartbeat_s=settings.heartbeat_s,
            outbox_size=settings.outbox_size,
            uploads_root=settings.data_dir,
            session_owner=session.user_id,
            max_message_chars=settings.max_message_chars,
            pacer=services.pacer,
        )
        return conn, _first(query, "run_id"), _int_or_none(_first(query, "after"))


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return max(0, int(value))
    except ValueError:
        return None


def create_app(settings: Settings | None = None, *, watch_signals: bool = False, **overrides: Any) -> NaviApp:
    """Build the app from ``settings`` (default: the ``NAVI_*`` environment)."""
    return NaviApp(settings if settings is not None else Settings.from_env(**overrides), watch_signals=watch_signals)

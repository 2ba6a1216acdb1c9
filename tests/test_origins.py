"""Browsers (CONTRACT section 1, issue 10 defect 7): the ``Origin`` check and CORS.

A request with an ``Origin`` is served only for the server's own origin (its host[:port]
equals the request's ``Host``) or one listed in ``NAVI_ALLOWED_ORIGINS`` (``*``: any):
a refused WebSocket is closed 4003 ``Origin not allowed``, a refused HTTP request gets
403. Allowed origins get CORS headers and preflight answers on every route; requests
without ``Origin`` are not affected. All against a real server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from navi_trio.settings import Settings

from .helpers import Server, open_server

EVIL = "http://evil.example"
APP = "https://app.example"


def own(server: Server) -> str:
    return f"http://{server.host}:{server.port}"


@asynccontextmanager
async def ws_with_origin(server: Server, sid: str, origin: str | None, host: str) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket on ``/ws/sessions/{sid}`` with this ``Origin`` and ``Host``."""
    headers = [] if origin is None else [(b"origin", origin.encode())]
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, host, f"/ws/sessions/{sid}", extra_headers=headers)
        try:
            yield ws
        finally:
            with trio.move_on_after(2, shield=True):
                await ws.aclose()


async def ws_first(server: Server, sid: str, origin: str | None, host: str | None = None) -> Any:
    """What the server does first on such a WebSocket: a message, or its close."""
    async with ws_with_origin(server, sid, origin, host or f"{server.host}:{server.port}") as ws:
        try:
            return await ws.get_message()
        except ConnectionClosed as exc:
            return (exc.reason.code, exc.reason.reason)


# -- HTTP ------------------------------------------------------------------------------------


async def test_another_sites_page_gets_403_and_the_connection_stays_usable() -> None:
    with trio.fail_after(10):
        async with open_server() as server:
            for method, path in [("GET", "/sessions"), ("POST", "/sessions"), ("GET", "/healthz")]:
                r = await server.http.request(method, path, json={}, headers={"origin": EVIL})
                assert r.status_code == 403, r.text
                assert r.json() == {"detail": "Origin not allowed"}
                assert "access-control-allow-origin" not in r.headers
            r = await server.http.get("/sessions")  # the pooled connection: no Origin, served
            assert r.status_code == 200 and r.json() == []  # and the refused POST created nothing


async def test_the_servers_own_origin_is_served_with_cors_headers() -> None:
    with trio.fail_after(10):
        async with open_server() as server:
            r = await server.http.post("/sessions", json={}, headers={"origin": own(server)})
            assert r.status_code == 201, r.text
            assert r.headers["access-control-allow-origin"] == own(server)
            assert "origin" in r.headers["vary"].lower()
            # Behind a TLS proxy: the browser's origin is the proxy's, and so is the Host.
            proxied = {"origin": "https://chat.example.com", "host": "chat.example.com"}
            assert (await server.http.get("/sessions", headers=proxied)).status_code == 200
            proxied = {"origin": "https://chat.example.com:8443", "host": "chat.example.com:8443"}
            assert (await server.http.get("/sessions", headers=proxied)).status_code == 200
            # Same host, another port: another origin.
            other_port = {"origin": f"http://{server.host}:{server.port + 1}"}
            assert (await server.http.get("/sessions", headers=other_port)).status_code == 403


async def test_listed_origins_are_served_and_others_are_not() -> None:
    with trio.fail_after(10):
        async with open_server(allowed_origins=f"{APP}, http://localhost:3000/") as server:
            for origin in (APP, "http://localhost:3000", "HTTPS://APP.EXAMPLE"):
                r = await server.http.get("/sessions", headers={"origin": origin})
                assert r.status_code == 200, (origin, r.text)
                assert r.headers["access-control-allow-origin"] == origin
            for origin in (EVIL, "https://app.example:444", "http://app.example", "null"):
                r = await server.http.get("/sessions", headers={"origin": origin})
                assert r.status_code == 403, origin


async def test_a_star_allows_any_origin() -> None:
    with trio.fail_after(10):
        async with open_server(allowed_origins="*") as server:
            for origin in (EVIL, "null"):
                r = await server.http.get("/sessions", headers={"origin": origin})
                assert r.status_code == 200
                assert r.headers["access-control-allow-origin"] == origin


async def test_preflight_is_answered_on_every_route() -> None:
    with trio.fail_after(10):
        async with open_server(allowed_origins=APP) as server:
            sid = await server.new_session()
            routes = ["/healthz", "/sessions", f"/sessions/{sid}", f"/sessions/{sid}/messages"]
            routes += [f"/sessions/{sid}/stop", f"/sessions/{sid}/files?name=a.txt", "/no/such/route"]
            asked = {
                "origin": APP,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            }
            for path in routes:
                r = await server.http.options(path, headers=asked)
                assert r.status_code == 204, (path, r.status_code, r.text)
                assert r.headers["access-control-allow-origin"] == APP
                assert "POST" in r.headers["access-control-allow-methods"]
                assert "DELETE" in r.headers["access-control-allow-methods"]
                assert r.headers["access-control-allow-headers"] == "authorization, content-type"
                assert int(r.headers["access-control-max-age"]) > 0
            r = await server.http.options("/sessions", headers={**asked, "origin": EVIL})
            assert r.status_code == 403
            # The actual request after the preflight, from the page.
            r = await server.http.delete(f"/sessions/{sid}", headers={"origin": APP})
            assert r.status_code == 204
            assert r.headers["access-control-allow-origin"] == APP


async def test_requests_without_origin_are_not_affected() -> None:
    with trio.fail_after(10):
        async with open_server(allowed_origins=APP) as server:
            r = await server.http.get("/sessions")
            assert r.status_code == 200
            assert not any(h.startswith("access-control-") for h in r.headers)
            assert (await server.http.options("/sessions")).status_code == 405  # as before


# -- the WebSocket ---------------------------------------------------------------------------


async def test_a_websocket_from_another_site_is_closed_4003() -> None:
    with trio.fail_after(10):
        async with open_server(allowed_origins=APP) as server:
            sid = await server.new_session()
            assert await ws_first(server, sid, EVIL) == (4003, "Origin not allowed")
            # Checked before anything else: no session found, no token needed to be refused.
            assert await ws_first(server, "nosuchsession", EVIL) == (4003, "Origin not allowed")
            other_port = f"http://{server.host}:{server.port + 1}"
            assert await ws_first(server, sid, other_port) == (4003, "Origin not allowed")
            assert server.registry.follower_count == 0


async def test_a_websocket_from_an_allowed_origin_or_none_is_served() -> None:
    with trio.fail_after(10):
        async with open_server(allowed_origins=APP) as server:
            sid = await server.new_session()
            sync = '{"type":"session_sync"}'
            assert await ws_first(server, sid, own(server)) == sync
            assert await ws_first(server, sid, "https://chat.example.com", host="chat.example.com") == sync
            assert await ws_first(server, sid, APP) == sync
            assert await ws_first(server, sid, None) == sync


@pytest.mark.parametrize("raw", ["example.com", "https://example.com/path", "ftp:", "https://a.example?x=1"])
def test_a_bad_allowed_origins_entry_is_refused_at_startup(raw: str) -> None:
    with pytest.raises(ValueError, match="NAVI_ALLOWED_ORIGINS"):
        Settings.from_env({"NAVI_ALLOWED_ORIGINS": f"https://ok.example,{raw}"})


def test_allowed_origins_come_from_the_environment() -> None:
    assert Settings.from_env({"NAVI_ALLOWED_ORIGINS": "*"}).allowed_origins == "*"

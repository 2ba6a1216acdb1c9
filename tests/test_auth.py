"""Users, tokens and the one access rule (CONTRACT sections 2, 3 and 6).

The matrix: every HTTP route and the WebSocket, under ``--auth required`` and
``optional``, for every kind of caller: no token, a wrong / malformed / revoked token
(refused in both modes, never anonymous), the owner, another user, an admin, anonymous.
Then revocation of a connected user, the per-user connection limit, the ``navi-trio
users`` commands against a real server process, and no token in any log line.

Users are created in-process on the server's own store (the CLI is tested separately,
in subprocesses). Real clock everywhere: revocation is a poll of the store.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import attrs
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from navi_trio.auth import hash_token, new_token
from navi_trio.store.base import User, utc_now

from .helpers import Client, Server, assert_grammar, open_server, script
from .pg import server_settings
from .test_cli import (
    HYPERCORN,
    HYPERCORN_URL,
    NAVI,
    STARTUP_S,
    clean_env,
    free_port,
    http_client,
    navi_serve,
    spawn,
)

MODES = ["required", "optional"]
Headers = Sequence[tuple[bytes, bytes]]

#: Every route that names a session, with the status the owner gets. DELETE goes last.
SESSION_ROUTES: list[tuple[str, str, int]] = [
    ("GET", "/sessions/{sid}", 200),
    ("GET", "/sessions/{sid}/messages", 200),
    ("POST", "/sessions/{sid}/stop", 200),
    ("POST", "/sessions/{sid}/files?name=probe.txt", 201),
    ("DELETE", "/sessions/{sid}", 204),
]
COLLECTION_ROUTES: list[tuple[str, str, int]] = [
    ("GET", "/sessions", 200),
    ("POST", "/sessions", 201),
]


# -- helpers -------------------------------------------------------------------------------


async def add_user(store: Any, name: str, role: str = "user") -> tuple[User, str]:
    user = User(uuid4().hex, name, role, utc_now())
    token = new_token()
    await store.add_user(user, hash_token(token))
    return user, token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ws_headers(authorization: str | None) -> list[tuple[bytes, bytes]]:
    return [] if authorization is None else [(b"authorization", authorization.encode())]


@asynccontextmanager
async def ws_open(host: str, port: int, path: str, headers: Headers = ()) -> AsyncIterator[Client]:
    """A trio-websocket client (on a TCP stream the test owns) with extra handshake headers."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, host, path, extra_headers=list(headers))
        try:
            yield Client(ws)
        finally:
            with trio.move_on_after(2, shield=True):
                await ws.aclose()


async def first_outcome(c: Client) -> int | str:
    """The close code if the server closes before sending anything, else the first event's type."""
    try:
        event = await c.recv()
    except ConnectionClosed as exc:
        code: int = exc.reason.code
        return code
    kind: str = event["type"]
    return kind


async def ws_outcome(host: str, port: int, path: str, headers: Headers = ()) -> int | str:
    async with ws_open(host, port, path, headers) as c:
        return await first_outcome(c)


async def call(http: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    content = b"probe bytes" if "/files" in path else b"{}"
    if method == "POST":
        return await http.request(method, path, headers=headers, content=content)
    return await http.request(method, path, headers=headers)


def assert_error(r: httpx.Response, status: int | set[int]) -> None:
    allowed = status if isinstance(status, set) else {status}
    assert r.status_code in allowed, (r.request.method, r.request.url, r.status_code, r.text)
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"detail"}, body
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in r.text


def uploaded_files(data_dir: Path) -> list[Path]:
    root = data_dir / "uploads"
    return sorted(p for p in root.rglob("*") if not p.is_dir()) if root.exists() else []


@attrs.define(eq=False)
class World:
    """A server with users admin, alice, bob, carol (revoked) and three sessions."""

    server: Server
    data_dir: Path
    users: dict[str, User]
    tokens: dict[str, str]
    sids: dict[str, str]  # "alice", "bob", "anon" (owner-less)

    @property
    def store(self) -> Any:
        return self.server.registry.store

    def ws(self, sid: str, query: str = "", headers: Headers = ()) -> Any:
        path = f"/ws/sessions/{sid}" + (f"?{query}" if query else "")
        return ws_open(self.server.host, self.server.port, path, headers)

    async def ws_outcome(self, sid: str, query: str = "", headers: Headers = ()) -> int | str:
        path = f"/ws/sessions/{sid}" + (f"?{query}" if query else "")
        return await ws_outcome(self.server.host, self.server.port, path, headers)

    async def session_count(self) -> int:
        return len(await self.store.list_sessions(None, everyone=True))


@asynccontextmanager
async def open_world(mode: str, data_dir: Path, store: str = "memory", **overrides: Any) -> AsyncIterator[World]:
    async with open_server(auth=mode, data_dir=data_dir, store=store, **overrides) as server:
        st = server.registry.store
        users: dict[str, User] = {}
        tokens: dict[str, str] = {}
        for name, role in [("admin", "admin"), ("alice", "user"), ("bob", "user"), ("carol", "user")]:
            users[name], tokens[name] = await add_user(st, name, role)
        await st.revoke_user("carol", utc_now())
        sids = {}
        for owner in ("alice", "bob", "carol"):
            sids[owner] = (await st.create_session(uuid4().hex, f"{owner}'s", users[owner].id)).id
        sids["anon"] = (await st.create_session(uuid4().hex, "nobody's", None)).id
        yield World(server, data_dir, users, tokens, sids)


# -- /healthz ------------------------------------------------------------------------------


async def test_healthz_needs_no_token(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_world("required", tmp_path) as w:
            r = await w.server.http.get("/healthz")
            assert r.status_code == 200
            assert r.json() == {"status": "ok"}
            # ...while the rest of the API does
            assert_error(await w.server.http.get("/sessions"), 401)


# -- refused credentials: 401 / 4003 in both modes, never anonymous ------------------------


def _authorization(kind: str, w: World) -> str | None:
    return {
        "none": None,
        "wrong": f"Bearer {new_token()}",  # well-formed, unknown
        "garbage": "Bearer not-a-token",
        "basic": "Basic x",
        "basic-with-valid-token": f"Basic {w.tokens['alice']}",
        "bearer-alone": "Bearer",
        "revoked": f"Bearer {w.tokens['carol']}",
    }[kind]


REFUSED = [
    ("required", "none"),
    *[
        (mode, kind)
        for mode in MODES
        for kind in ("wrong", "garbage", "basic", "basic-with-valid-token", "bearer-alone", "revoked")
    ],
]


@pytest.mark.parametrize(("mode", "kind"), REFUSED, ids=[f"{m}-{k}" for m, k in REFUSED])
async def test_refused_credentials_on_every_route_and_the_websocket(tmp_path: Path, mode: str, kind: str) -> None:
    with trio.fail_after(20):
        async with open_world(mode, tmp_path) as w:
            http = w.server.http
            auth = _authorization(kind, w)
            headers = {} if auth is None else {"Authorization": auth}
            before = await w.session_count()
            for method, path, _ in COLLECTION_ROUTES:
                assert_error(await call(http, method, path, headers), 401)
            # the owner-less session too: a bad token is never taken as anonymous
            for target in ("alice", "anon", "carol"):
                sid = w.sids[target]
                for method, path, _ in SESSION_ROUTES:
                    assert_error(await call(http, method, path.format(sid=sid), headers), 401)
            # a session that does not exist: still 401, not 404 (no existence oracle)
            assert_error(await call(http, "GET", "/sessions/nosuchsession", headers), 401)
            # nothing happened
            assert await w.session_count() == before
            for sid in w.sids.values():
                assert await w.store.get_session(sid) is not None
            assert uploaded_files(w.data_dir) == []

            for target in ("alice", "anon", "nosuchsession"):
                sid = w.sids.get(target, target)
                assert await w.ws_outcome(sid, headers=ws_headers(auth)) == 4003, (target, auth)
            # the same credential as ?token= (browsers)
            query_token = {"wrong": new_token(), "garbage": "not-a-token", "revoked": w.tokens["carol"]}.get(kind)
            if query_token is not None:
                for target in ("alice", "anon"):
                    assert await w.ws_outcome(w.sids[target], query=f"token={query_token}") == 4003
            if kind.startswith("basic") or kind == "bearer-alone":
                # a malformed Authorization header is refused even next to a valid ?token=
                outcome = await w.ws_outcome(
                    w.sids["alice"], query=f"token={w.tokens['alice']}", headers=ws_headers(auth)
                )
                assert outcome == 4003


# -- the owner, another user, an admin ------------------------------------------------------


async def _reaches_every_route(w: World, token: str, sid: str) -> None:
    """``token`` reaches session ``sid`` on every route and the WebSocket (header and
    ?token=), and can run a message there; the session is deleted at the end."""
    http, headers = w.server.http, bearer(token)
    async with w.ws(sid, headers=ws_headers(f"Bearer {token}")) as c:
        assert await first_outcome(c) == "session_sync"
        await c.send_message(script({"text": "mine"}))
        got = await c.until_terminal()
        assert_grammar(got, merged=False)
        assert got[-1]["content"] == "mine"
    assert await w.ws_outcome(sid, query=f"token={token}") == "session_sync"
    for method, path, status in SESSION_ROUTES:
        r = await call(http, method, path.format(sid=sid), headers)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        if method == "GET" and path == "/sessions/{sid}":
            assert r.json()["id"] == sid and r.json()["running"] is False
        elif path.endswith("/messages"):
            assert [m["role"] for m in r.json()] == ["user", "assistant"]
        elif path.endswith("/stop"):
            assert r.json() == {"ok": False, "reason": "no active run"}
        elif "/files" in path:
            assert r.json()["name"] == "probe.txt"
    assert (await http.get(f"/sessions/{sid}", headers=headers)).status_code == 404  # really deleted


@pytest.mark.parametrize("mode", MODES)
async def test_owner_reaches_own_session(tmp_path: Path, mode: str) -> None:
    with trio.fail_after(20):
        async with open_world(mode, tmp_path) as w:
            session = (
                await w.server.http.get(f"/sessions/{w.sids['alice']}", headers=bearer(w.tokens["alice"]))
            ).json()
            assert session["user_id"] == w.users["alice"].id
            await _reaches_every_route(w, w.tokens["alice"], w.sids["alice"])


@pytest.mark.parametrize("mode", MODES)
async def test_admin_reaches_every_session(tmp_path: Path, mode: str) -> None:
    with trio.fail_after(20):
        async with open_world(mode, tmp_path) as w:
            for target in ("alice", "bob", "anon"):
                await _reaches_every_route(w, w.tokens["admin"], w.sids[target])


@pytest.mark.parametrize("mode", MODES)
async def test_another_users_session_is_refused_403_and_4003(tmp_path: Path, mode: str) -> None:
    with trio.fail_after(20):
        async with open_world(mode, tmp_path) as w:
            http, sid = w.server.http, w.sids["alice"]
            async with w.ws(sid, query=f"token={w.tokens['alice']}") as owner:
                assert await first_outcome(owner) == "session_sync"
                await owner.send_message(script({"text": "long "}, {"sleep": 30}))
                await owner.until("stream_delta")  # alice's run is active
                for name, target in [("bob", "alice"), ("alice", "bob"), ("bob", "anon")]:
                    headers = bearer(w.tokens[name])
                    for method, path, _ in SESSION_ROUTES:
                        assert_error(await call(http, method, path.format(sid=w.sids[target]), headers), 403)
                    auth = f"Bearer {w.tokens[name]}"
                    assert await w.ws_outcome(w.sids[target], headers=ws_headers(auth)) == 4003
                    assert await w.ws_outcome(w.sids[target], query=f"token={w.tokens[name]}") == 4003
                # bob's stop and DELETE did nothing: alice's run goes on, her session exists
                assert w.server.registry.active(sid) is not None
                assert await w.store.get_session(sid) is not None
                assert uploaded_files(w.data_dir) == []
                r = await http.post(f"/sessions/{sid}/stop", headers=bearer(w.tokens["alice"]))
                assert r.status_code == 200 and r.json()["ok"] is True
                got = await owner.until_terminal()
                assert got[-1]["type"] == "stream_stopped"


# -- listing and creating -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_listing_and_creating_sessions_by_caller(tmp_path: Path, mode: str) -> None:
    with trio.fail_after(20):
        async with open_world(mode, tmp_path) as w:
            http = w.server.http

            async def listed(headers: dict[str, str]) -> set[str]:
                r = await http.get("/sessions", headers=headers)
                assert r.status_code == 200, r.text
                return {s["id"] for s in r.json()}

            created: dict[str, dict[str, Any]] = {}
            for name in ("alice", "admin"):
                r = await http.post("/sessions", json={"title": f"by {name}"}, headers=bearer(w.tokens[name]))
                assert r.status_code == 201, r.text
                created[name] = r.json()
                assert created[name]["user_id"] == w.users[name].id
                assert created[name]["title"] == f"by {name}"
            everything = {*w.sids.values(), created["alice"]["id"], created["admin"]["id"]}
            assert await listed(bearer(w.tokens["alice"])) == {w.sids["alice"], created["alice"]["id"]}
            assert await listed(bearer(w.tokens["bob"])) == {w.sids["bob"]}
            assert await listed(bearer(w.tokens["admin"])) == everything
            if mode == "optional":
                r = await http.post("/sessions", json={})
                assert r.status_code == 201
                assert r.json()["user_id"] is None
                assert await listed({}) == {w.sids["anon"], r.json()["id"]}
            else:
                assert_error(await http.get("/sessions"), 401)
                assert_error(await http.post("/sessions", json={}), 401)


async def test_anonymous_in_optional_mode(tmp_path: Path) -> None:
    """Anonymous callers reach only owner-less sessions (and create them)."""
    with trio.fail_after(20):
        async with open_world("optional", tmp_path) as w:
            http = w.server.http
            for target in ("alice", "admin_owned"):
                if target == "admin_owned":
                    sid = (await w.store.create_session(uuid4().hex, "t", w.users["admin"].id)).id
                else:
                    sid = w.sids[target]
                for method, path, _ in SESSION_ROUTES:
                    assert_error(await call(http, method, path.format(sid=sid), {}), {401, 403})
                assert await w.ws_outcome(sid) == 4003
                assert await w.store.get_session(sid) is not None
            assert uploaded_files(w.data_dir) == []
            # the owner-less session: everything works for anyone
            sid = w.sids["anon"]
            async with w.ws(sid) as c:
                assert await first_outcome(c) == "session_sync"
                await c.send_message(script({"text": "anon"}))
                assert (await c.until_terminal())[-1]["content"] == "anon"
            for method, path, status in SESSION_ROUTES:
                r = await call(http, method, path.format(sid=sid), {})
                assert r.status_code == status, (method, path, r.text)


# -- revocation -----------------------------------------------------------------------------


async def _closed_within(c: Client, started: float, out: dict[str, Any], key: str) -> None:
    code = await c.until_closed()
    out[key] = (code, trio.current_time() - started)


async def test_revocation_closes_open_websockets_4003_and_token_then_fails(tmp_path: Path, store_kind: str) -> None:
    settings = server_settings(store_kind, tmp_path)
    with trio.fail_after(15):
        async with open_world("required", **settings) as w:
            alice, bob = w.tokens["alice"], w.tokens["bob"]
            async with (
                w.ws(w.sids["alice"], headers=ws_headers(f"Bearer {alice}")) as by_header,
                w.ws(w.sids["alice"], query=f"token={alice}") as by_query,
                w.ws(w.sids["bob"], query=f"token={bob}") as bystander,
            ):
                for c in (by_header, by_query, bystander):
                    assert await first_outcome(c) == "session_sync"
                t0 = trio.current_time()
                assert await w.store.revoke_user("alice", utc_now()) is not None
                out: dict[str, Any] = {}
                with trio.fail_after(5):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_closed_within, by_header, t0, out, "header")
                        nursery.start_soon(_closed_within, by_query, t0, out, "query")
                for key in ("header", "query"):
                    code, elapsed = out[key]
                    assert code == 4003, out
                    assert elapsed < 2.5, out  # the server polls revocations once a second
                # bob is untouched and his connection still works
                await bystander.send_message(script({"text": "still bob"}))
                assert (await bystander.until_terminal())[-1]["content"] == "still bob"
            assert_error(await w.server.http.get("/sessions", headers=bearer(alice)), 401)
            assert await w.ws_outcome(w.sids["alice"], query=f"token={alice}") == 4003
            assert await w.ws_outcome(w.sids["alice"], headers=ws_headers(f"Bearer {alice}")) == 4003
            assert (await w.server.http.get("/sessions", headers=bearer(bob))).status_code == 200


# -- connections per user -------------------------------------------------------------------


async def test_connection_limit_per_user(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_world("required", tmp_path, max_connections_per_user=2) as w:
            alice = w.tokens["alice"]
            other = (await w.store.create_session(uuid4().hex, "second", w.users["alice"].id)).id
            async with w.ws(w.sids["alice"], query=f"token={alice}") as c1, w.ws(other, query=f"token={alice}") as c2:
                assert await first_outcome(c1) == "session_sync"
                assert await first_outcome(c2) == "session_sync"
                # a third, on either session, is refused with 1008
                assert await w.ws_outcome(w.sids["alice"], query=f"token={alice}") == 1008
                assert await w.ws_outcome(other, headers=ws_headers(f"Bearer {alice}")) == 1008
                # other users are not affected
                async with w.ws(w.sids["bob"], query=f"token={w.tokens['bob']}") as b:
                    assert await first_outcome(b) == "session_sync"
                # the two open ones keep working
                for c, text in ((c1, "one"), (c2, "two")):
                    await c.send_message(script({"text": text}))
                    got = await c.until_terminal()
                    assert got[-1] == {"type": "stream_end", "seq": 3, "content": text}
            # once they are gone, alice may connect again (the count is of open connections)
            uid = w.users["alice"].id
            while w.server.registry.local.connections_of(uid):  # noqa: ASYNC110 (no event to wait on: poll the condition)
                await trio.sleep(0.01)
            async with w.ws(w.sids["alice"], query=f"token={alice}") as c3:
                assert await first_outcome(c3) == "session_sync"


async def test_connection_limit_holds_for_simultaneous_connects(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_world("required", tmp_path, max_connections_per_user=2) as w:
            outcomes: list[int | str] = []
            opened = trio.Event()
            release = trio.Event()

            async def one() -> None:
                async with w.ws(w.sids["alice"], query=f"token={w.tokens['alice']}") as c:
                    outcomes.append(await first_outcome(c))
                    if len(outcomes) == 6:
                        opened.set()
                    await release.wait()

            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(one)
                await opened.wait()
                release.set()
            assert sorted(map(str, outcomes)) == ["1008"] * 4 + ["session_sync"] * 2, outcomes


# -- the CLI against a real server process --------------------------------------------------


async def navi(*args: str, data_dir: Path, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(STARTUP_S):
        result = await trio.run_process(
            [NAVI, "users", "--data-dir", str(data_dir), *args],
            env=clean_env(),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert b"Traceback" not in result.stderr, result.stderr
    return result


async def cli_add(name: str, role: str, data_dir: Path, cwd: Path) -> str:
    result = await navi("add", name, "--role", role, data_dir=data_dir, cwd=cwd)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    tokens = [line for line in lines if line.startswith("nv_")]
    assert len(tokens) == 1, lines  # printed once
    assert result.stdout.decode().count(tokens[0]) == 1
    return tokens[0]


def database_bytes(data_dir: Path) -> bytes:
    files = sorted(data_dir.glob("navi.sqlite3*"))
    assert files, list(data_dir.iterdir())
    return b"".join(f.read_bytes() for f in files)


async def test_cli_users_add_list_revoke_against_a_running_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(4 * STARTUP_S):
        admin = await cli_add("root", "admin", data, tmp_path)
        alice = await cli_add("alice", "user", data, tmp_path)
        assert admin != alice
        listed = await navi("list", data_dir=data, cwd=tmp_path)
        assert listed.returncode == 0
        out = listed.stdout.decode()
        assert "root\tadmin\tactive" in out and "alice\tuser\tactive" in out, out
        for token in (admin, alice):
            assert token not in out and token[3:] not in out
            assert hash_token(token) not in out
        # the database holds only the SHA-256 of each token
        db = database_bytes(data)
        for token in (admin, alice):
            assert token.encode() not in db and token[3:].encode() not in db
            assert hash_token(token).encode() in db
        # a second user with the same name is refused
        dup = await navi("add", "alice", data_dir=data, cwd=tmp_path)
        assert dup.returncode != 0 and b"nv_" not in dup.stdout

        async with spawn(navi_serve(data, "--auth", "required"), clean_env(), tmp_path) as srv:
            url = await srv.wait_listening()
            host, port = srv.host_port
            async with http_client(url) as http:
                r = await http.post("/sessions", json={}, headers=bearer(alice))
                assert r.status_code == 201, r.text
                sid = r.json()["id"]
                r = await http.get("/sessions", headers=bearer(admin))
                assert r.status_code == 200 and [s["id"] for s in r.json()] == [sid]
                assert_error(await http.get("/sessions"), 401)
                async with ws_open(host, port, f"/ws/sessions/{sid}", ws_headers(f"Bearer {alice}")) as c:
                    assert await first_outcome(c) == "session_sync"
                    revoked = await navi("revoke", "alice", data_dir=data, cwd=tmp_path)
                    assert revoked.returncode == 0, revoked.stderr
                    t0 = trio.current_time()
                    with trio.fail_after(5):
                        code = await c.until_closed()
                    assert code == 4003
                    assert trio.current_time() - t0 < 2.5
                assert_error(await http.get("/sessions", headers=bearer(alice)), 401)
                assert await ws_outcome(host, port, f"/ws/sessions/{sid}?token={alice}") == 4003
                assert (await http.get(f"/sessions/{sid}", headers=bearer(admin))).status_code == 200
            srv.signal(signal.SIGTERM)
            assert await srv.wait_exit(15) == 0, srv.output
        listed = await navi("list", data_dir=data, cwd=tmp_path)
        assert "alice\tuser\trevoked" in listed.stdout.decode()
        assert (await navi("revoke", "nobody", data_dir=data, cwd=tmp_path)).returncode == 1


# -- no token in any log line ---------------------------------------------------------------


async def test_no_token_or_token_hash_in_any_log_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(4 * STARTUP_S):
        alice = await cli_add("alice", "user", data, tmp_path)
        bob = await cli_add("bob", "user", data, tmp_path)
        wrong = new_token()
        malformed = "not-a-token-" + uuid4().hex
        env = clean_env(NAVI_LOG_FORMAT="json", NAVI_LOG_LEVEL="debug")
        cmd = navi_serve(data, "--auth", "required", "--access-log", "-")
        async with spawn(cmd, env, tmp_path) as srv:
            url = await srv.wait_listening()
            host, port = srv.host_port
            async with http_client(url) as http:
                sid = (await http.post("/sessions", json={"title": "t"}, headers=bearer(alice))).json()["id"]
                assert (await http.get("/sessions", headers=bearer(alice))).status_code == 200
                r = await http.post(f"/sessions/{sid}/files?name=a.txt", content=b"x", headers=bearer(alice))
                assert r.status_code == 201
                async with ws_open(host, port, f"/ws/sessions/{sid}?token={alice}") as c:
                    assert await first_outcome(c) == "session_sync"
                    await c.send_message(script({"text": "logged"}))
                    assert (await c.until_terminal())[-1]["type"] == "stream_end"
                for bad in (wrong, malformed):
                    assert_error(await http.get("/sessions", headers=bearer(bad)), 401)
                    assert await ws_outcome(host, port, f"/ws/sessions/{sid}?token={bad}") == 4003
                    assert await ws_outcome(host, port, f"/ws/sessions/{sid}", ws_headers(f"Bearer {bad}")) == 4003
                bob_sid = (await http.post("/sessions", json={}, headers=bearer(bob))).json()["id"]
                async with ws_open(host, port, f"/ws/sessions/{bob_sid}?token={bob}") as c:
                    assert await first_outcome(c) == "session_sync"
                    assert (await navi("revoke", "bob", data_dir=data, cwd=tmp_path)).returncode == 0
                    assert await c.until_closed() == 4003
                assert_error(await http.get("/sessions", headers=bearer(bob)), 401)
                assert await ws_outcome(host, port, f"/ws/sessions/{bob_sid}?token={bob}") == 4003
            srv.signal(signal.SIGTERM)
            assert await srv.wait_exit(15) == 0, srv.output
        output = srv.output
        # the logs were really on: access lines and structured lines for what was done
        assert "/ws/sessions/" in output and "GET /sessions" in output, output
        assert " 401 " in output
        assert any(line.startswith("{") and "ws.open" in line for line in output.splitlines()), output
        for secret in (alice, bob, wrong, malformed):
            assert secret not in output, secret
            assert secret.removeprefix("nv_") not in output
            assert hash_token(secret) not in output
        # every structured line is JSON
        for line in output.splitlines():
            if line.startswith("{"):
                json.loads(line)


# -- the access log of the hypercorn deployment, with a format that logs everything --------

#: An operator's access-log format with every atom that could hold a token.
HOSTILE_FORMAT = (
    '%(h)s "%(r)s" R="%(R)s" q="%(q)s" Uq="%(Uq)s" auth="%({authorization}i)s" AUTH="%({Authorization}i)s" %(s)s'
)


async def _hypercorn_access_log(tmp_path: Path, exercise: Any) -> str:
    """Run ``hypercorn --config python:navi_trio.hypercorn_conf`` with ``HOSTILE_FORMAT``,
    call ``exercise(url, host, port, tokens)``, stop it, return its whole output."""
    data = tmp_path / "data"
    tokens = {"alice": await cli_add("alice", "user", data, tmp_path)}
    port = free_port()
    env = clean_env(NAVI_PORT=str(port), NAVI_DATA_DIR=str(data), NAVI_AUTH="required", NAVI_ACCESS_LOG="-")
    cmd = [HYPERCORN, "--config", "python:navi_trio.hypercorn_conf", "--access-logformat", HOSTILE_FORMAT]
    async with spawn([*cmd, "navi_trio.asgi:app"], env, tmp_path, ready=HYPERCORN_URL) as srv:
        url = await srv.wait_listening()
        await exercise(url, "127.0.0.1", port, tokens)
        srv.signal(signal.SIGTERM)
        assert await srv.wait_exit(15) == 0, srv.output
    return srv.output


async def test_hypercorn_access_log_redacts_tokens_whatever_the_format(tmp_path: Path) -> None:
    wrong = new_token()
    seen: dict[str, str] = {}

    async def exercise(url: str, host: str, port: int, tokens: dict[str, str]) -> None:
        alice = tokens["alice"]
        async with http_client(url) as http:
            sid = (await http.post("/sessions", json={}, headers=bearer(alice))).json()["id"]
            seen["sid"] = sid
            assert (await http.get(f"/sessions/{sid}?token={alice}", headers=bearer(alice))).status_code == 200
            assert_error(await http.get(f"/sessions?access_token={wrong}&x=1", headers=bearer(wrong)), 401)
        assert await ws_outcome(host, port, f"/ws/sessions/{sid}?token={alice}") == "session_sync"
        assert await ws_outcome(host, port, f"/ws/sessions/{sid}?a=b&token={wrong}") == 4003
        assert await ws_outcome(host, port, f"/ws/sessions/{sid}", ws_headers(f"bearer {alice}")) == "session_sync"
        seen.update(tokens)

    with trio.fail_after(4 * STARTUP_S):
        output = await _hypercorn_access_log(tmp_path, exercise)
    # the hostile atoms were logged, redacted
    assert f'Uq="/ws/sessions/{seen["sid"]}?token=[redacted]"' in output, output
    assert 'auth="[redacted]"' in output and 'AUTH="[redacted]"' in output, output
    assert "access_token=[redacted]&x=1" in output, output
    for secret in (seen["alice"], wrong):
        assert secret not in output
        assert secret.removeprefix("nv_") not in output
        assert hash_token(secret) not in output


async def test_hypercorn_access_log_redacts_a_percent_encoded_token_parameter(tmp_path: Path) -> None:
    """``?tok%65n=`` is ``?token=`` to the server (it percent-decodes the query), so it
    must be redacted too."""
    seen: dict[str, str] = {}

    async def exercise(url: str, host: str, port: int, tokens: dict[str, str]) -> None:
        async with http_client(url) as http:
            sid = (await http.post("/sessions", json={}, headers=bearer(tokens["alice"]))).json()["id"]
        # the server authenticates with it...
        assert await ws_outcome(host, port, f"/ws/sessions/{sid}?tok%65n={tokens['alice']}") == "session_sync"
        seen.update(tokens)

    with trio.fail_after(4 * STARTUP_S):
        output = await _hypercorn_access_log(tmp_path, exercise)
    assert "/ws/sessions/" in output
    # ...so it must not be in the log
    assert seen["alice"].removeprefix("nv_") not in output, output

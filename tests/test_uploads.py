"""Uploads (CONTRACT section 6) and the files a message may name (section 3).

``POST /sessions/{id}/files?name=NAME`` with the raw bytes stores a file for that
session; a message may name only uploads of its own session. Anything else (another
session's file, a missing one, a path, a planted symlink or FIFO, a mismatched path) is
answered with one ``error`` naming the file, starts no run, reads nothing, and leaves the
connection usable.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
import trio

from navi_trio.auth import hash_token, new_token
from navi_trio.store.base import User, utc_now

from .helpers import Client, Server, assert_grammar, open_server

Events = list[dict[str, Any]]


# -- helpers -------------------------------------------------------------------------------


async def upload(
    server: Server, sid: str, name: str, body: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await server.http.post(f"/sessions/{sid}/files", params={"name": name}, content=body, headers=headers)


async def upload_ok(server: Server, sid: str, name: str, body: bytes, headers: dict[str, str] | None = None) -> str:
    r = await upload(server, sid, name, body, headers)
    assert r.status_code == 201, r.text
    got = r.json()
    assert set(got) == {"name", "path"}, got
    assert got["name"] == name
    path: str = got["path"]
    return path


def assert_detail(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body


def files_under(root: Path) -> list[Path]:
    """Every non-directory entry under ``root`` (symlinks and FIFOs included)."""
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_symlink() or not p.is_dir())


def session_folder(data_dir: Path, sid: str) -> Path:
    """The folder the server stored this session's uploads in (found, not assumed)."""
    found = [p for p in (data_dir / "uploads").rglob(sid) if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


async def expect_sync(c: Client) -> None:
    assert await c.recv() == {"type": "session_sync"}


async def next_event(c: Client) -> dict[str, Any]:
    while True:
        event = await c.recv()
        if event["type"] != "heartbeat":
            return event


async def run_demo(c: Client, content: str, files: list[dict[str, Any]]) -> Events:
    """A message naming ``files`` runs the demonstration answer to its end."""
    await c.send_message(content, files=files)
    got = await c.until_terminal()
    assert_grammar(got, merged=False)
    kinds = [e["type"] for e in got]
    assert kinds[0] == "stream_start"
    assert "thinking_end" in kinds and "tool_call" in kinds, kinds
    assert got[-1]["type"] == "stream_end", got[-1]
    assert got[-1]["content"].startswith(content)
    return got


async def user_messages(server: Server, sid: str, headers: dict[str, str] | None = None) -> list[str]:
    r = await server.http.get(f"/sessions/{sid}/messages", headers=headers)
    assert r.status_code == 200, r.text
    return [m["content"] for m in r.json() if m["role"] == "user"]


# -- upload, then a message naming it ------------------------------------------------------


async def test_upload_then_a_message_naming_it_runs(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path) as server:
            sid = await server.new_session()
            body = b"line one\nline two\n\x00\xff binary too"
            path = await upload_ok(server, sid, "notes.txt", body)
            assert path == f"uploads/{sid}/notes.txt"
            stored = session_folder(tmp_path, sid) / "notes.txt"
            assert stored.read_bytes() == body
            assert stored.resolve().is_relative_to((tmp_path / "uploads").resolve())
            async with server.connect(sid) as c:
                await expect_sync(c)
                got = await run_demo(c, "summarise my notes", [{"name": "notes.txt", "path": path}])
                assert "notes.txt" in got[-1]["content"]  # the agent was told where the file is
            # the history shows what the user wrote, not the server's note
            assert await user_messages(server, sid) == ["summarise my notes"]


# -- refused file references ---------------------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("TOP SECRET")
    return secret


def _case_files(case: str, tmp_path: Path, sid: str, other_sid: str, folder: Path) -> list[dict[str, Any]]:
    """The ``files`` of a message that must be refused; plants what it needs on disk."""
    if case == "other-session-path":
        return [{"name": "theirs.txt", "path": f"uploads/{other_sid}/theirs.txt"}]
    if case == "other-session-file-as-own":
        return [{"name": "theirs.txt", "path": f"uploads/{sid}/theirs.txt"}]
    if case == "missing":
        return [{"name": "ghost.txt", "path": f"uploads/{sid}/ghost.txt"}]
    if case == "dotdot":
        return [{"name": "../x", "path": f"uploads/{sid}/../x"}]
    if case == "dotdot-into-other-session":
        return [{"name": f"../{other_sid}/theirs.txt", "path": f"uploads/{sid}/../{other_sid}/theirs.txt"}]
    if case == "absolute":
        return [{"name": "/etc/passwd", "path": "/etc/passwd"}]
    if case == "absolute-path-of-real-upload":
        return [{"name": "notes.txt", "path": str(folder / "notes.txt")}]
    if case == "slash-in-name":
        return [{"name": "sub/notes.txt", "path": f"uploads/{sid}/sub/notes.txt"}]
    if case == "dot-slash-name-of-real-upload":
        return [{"name": "./notes.txt", "path": f"uploads/{sid}/./notes.txt"}]
    if case == "nul-in-name":
        return [{"name": "notes.txt\x00", "path": f"uploads/{sid}/notes.txt\x00"}]
    if case == "symlink-outside":
        (folder / "link.txt").symlink_to(_outside(tmp_path))
        return [{"name": "link.txt", "path": f"uploads/{sid}/link.txt"}]
    if case == "symlink-to-sibling":
        (folder / "alias.txt").symlink_to(folder / "notes.txt")
        return [{"name": "alias.txt", "path": f"uploads/{sid}/alias.txt"}]
    if case == "fifo":
        os.mkfifo(folder / "pipe.txt")  # reading it would block forever: "nothing is read"
        return [{"name": "pipe.txt", "path": f"uploads/{sid}/pipe.txt"}]
    if case == "directory":
        (folder / "dir.txt").mkdir()
        return [{"name": "dir.txt", "path": f"uploads/{sid}/dir.txt"}]
    if case == "mismatched-path":
        return [{"name": "notes.txt", "path": f"uploads/{sid}/other.txt"}]
    if case == "mismatched-path-prefix":
        return [{"name": "notes.txt", "path": f"./uploads/{sid}/notes.txt"}]
    if case == "one-good-one-bad":
        return [{"name": "notes.txt", "path": f"uploads/{sid}/notes.txt"}, {"name": "ghost.txt", "path": None}]
    raise AssertionError(case)


REFUSED_CASES = [
    "other-session-path",
    "other-session-file-as-own",
    "missing",
    "dotdot",
    "dotdot-into-other-session",
    "absolute",
    "absolute-path-of-real-upload",
    "slash-in-name",
    "dot-slash-name-of-real-upload",
    "nul-in-name",
    "symlink-outside",
    "symlink-to-sibling",
    "fifo",
    "directory",
    "mismatched-path",
    "mismatched-path-prefix",
    "one-good-one-bad",
]


@pytest.mark.parametrize("case", REFUSED_CASES)
async def test_a_file_that_is_not_an_upload_of_this_session_is_refused(tmp_path: Path, case: str) -> None:
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path / "data", store="sqlite") as server:
            sid, other_sid = await server.new_session(), await server.new_session()
            good = await upload_ok(server, sid, "notes.txt", b"mine")
            await upload_ok(server, other_sid, "theirs.txt", b"theirs")
            folder = session_folder(tmp_path / "data", sid)
            files = _case_files(case, tmp_path, sid, other_sid, folder)
            bad_name = files[-1]["name"]
            async with server.connect(sid) as c:
                await expect_sync(c)
                await c.send_message("read this", files=files)
                err = await next_event(c)  # before anything else: no stream_start
                assert err["type"] == "error", err
                assert set(err) == {"type", "message"}
                assert bad_name in err["message"] or repr(bad_name) in err["message"], err
                assert "TOP SECRET" not in err["message"]
                # the same connection then runs a valid message, and only that one
                got = await run_demo(c, "now the real one", [{"name": "notes.txt", "path": good}])
                assert [e for e in got if e["type"] == "error"] == []
            assert await user_messages(server, sid) == ["now the real one"]


async def test_files_must_be_a_list_of_objects(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path) as server:
            sid = await server.new_session()
            good = await upload_ok(server, sid, "notes.txt", b"x")
            async with server.connect(sid) as c:
                await expect_sync(c)
                for files in ("notes.txt", ["notes.txt"], {"name": "notes.txt", "path": good}, [[]], [None], 7):
                    await c.send_message("read", files=files)
                    err = await next_event(c)
                    assert err["type"] == "error", (files, err)
                    assert err["message"], err
                await run_demo(c, "valid", [{"name": "notes.txt", "path": good}])
            assert await user_messages(server, sid) == ["valid"]


# -- size limit: 413 -----------------------------------------------------------------------


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_upload_over_the_limit_is_413_with_or_without_content_length(tmp_path: Path) -> None:
    # 0.001 MB = 1048 bytes
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path, max_upload_mb=0.001) as server:
            sid = await server.new_session()
            r = await upload(server, sid, "big.bin", b"x" * 1100)
            assert r.request.headers["content-length"] == "1100"
            assert_detail(r, 413)
            r = await server.http.post(
                f"/sessions/{sid}/files", params={"name": "big2.bin"}, content=_chunks(b"x" * 600, b"y" * 600)
            )
            assert "content-length" not in r.request.headers
            assert r.request.headers["transfer-encoding"] == "chunked"
            assert_detail(r, 413)
            # nothing stored, not even a partial or temporary file
            assert files_under(tmp_path / "uploads") == []
            # under the limit: accepted, both ways
            await upload_ok(server, sid, "small.bin", b"s" * 1000)
            r = await server.http.post(
                f"/sessions/{sid}/files", params={"name": "small2.bin"}, content=_chunks(b"a" * 500, b"b" * 500)
            )
            assert r.status_code == 201, r.text
            folder = session_folder(tmp_path, sid)
            assert sorted(p.name for p in files_under(tmp_path / "uploads")) == ["small.bin", "small2.bin"]
            assert (folder / "small2.bin").read_bytes() == b"a" * 500 + b"b" * 500


async def test_a_long_chunked_stream_is_cut_off_with_413(tmp_path: Path) -> None:
    """Without a Content-Length the limit is on the bytes as they arrive (raw HTTP/1.1)."""
    with trio.fail_after(15):
        async with open_server(data_dir=tmp_path, max_upload_mb=0.001) as server:
            sid = await server.new_session()
            stream = await trio.open_tcp_stream(server.host, server.port)
            async with stream:
                body = b"z" * 5000
                request = (
                    f"POST /sessions/{sid}/files?name=sneaky.bin HTTP/1.1\r\nHost: x\r\n"
                    "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                ).encode()
                for i in range(0, len(body), 1000):
                    request += b"3e8\r\n" + body[i : i + 1000] + b"\r\n"
                request += b"0\r\n\r\n"
                await stream.send_all(request)
                reply = b""
                while chunk := await stream.receive_some():
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
            assert files_under(tmp_path / "uploads") == []


# -- bad names: 422 ------------------------------------------------------------------------

BAD_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "..\\x",
    "x\x00y",
    "x\ny",
    ".hidden",
    " padded ",
    "é" * 200,  # 400 bytes
    "n" * 256,
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
async def test_bad_upload_name_is_422_and_writes_nothing(tmp_path: Path, name: str) -> None:
    with trio.fail_after(10):
        async with open_server(data_dir=tmp_path / "data") as server:
            sid = await server.new_session()
            assert_detail(await upload(server, sid, name, b"payload"), 422)
            assert files_under(tmp_path) == []


async def test_upload_without_name_is_422_and_to_a_missing_session_404(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_server(data_dir=tmp_path) as server:
            sid = await server.new_session()
            assert_detail(await server.http.post(f"/sessions/{sid}/files", content=b"x"), 422)
            assert_detail(await upload(server, "nosuchsession", "a.txt", b"x"), 404)
            assert files_under(tmp_path / "uploads") == []


# -- users: the owner's area, and nobody else's sessions -----------------------------------


async def test_uploads_of_a_users_session_land_in_the_owners_area(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_server(auth="required", data_dir=tmp_path, store="sqlite") as server:
            store = server.registry.store
            users: dict[str, User] = {}
            auth: dict[str, dict[str, str]] = {}
            for name, role in (("alice", "user"), ("bob", "user"), ("root", "admin")):
                token = new_token()
                users[name] = User(uuid4().hex, name, role, utc_now())
                await store.add_user(users[name], hash_token(token))
                auth[name] = {"Authorization": f"Bearer {token}"}
            r = await server.http.post("/sessions", json={}, headers=auth["alice"])
            alice_sid = r.json()["id"]
            bob_sid = (await server.http.post("/sessions", json={}, headers=auth["bob"])).json()["id"]

            path = await upload_ok(server, alice_sid, "notes.txt", b"alice's", auth["alice"])
            area = tmp_path / "uploads" / users["alice"].id / alice_sid
            assert (area / "notes.txt").read_bytes() == b"alice's"
            # an admin's upload to alice's session goes to alice's area too
            await upload_ok(server, alice_sid, "from-admin.txt", b"admin's", auth["root"])
            assert (area / "from-admin.txt").read_bytes() == b"admin's"
            assert not (tmp_path / "uploads" / users["root"].id).exists()
            # bob cannot upload to it, nor can anyone without a token
            assert_detail(await upload(server, alice_sid, "bob.txt", b"bob's", auth["bob"]), 403)
            assert_detail(await upload(server, alice_sid, "anon.txt", b"anon"), 401)
            assert sorted(p.name for p in files_under(tmp_path / "uploads")) == ["from-admin.txt", "notes.txt"]
            # bob's own uploads go to his area
            await upload_ok(server, bob_sid, "bobs.txt", b"b", auth["bob"])
            assert (tmp_path / "uploads" / users["bob"].id / bob_sid / "bobs.txt").is_file()

            token_query = "token=" + auth["alice"]["Authorization"].removeprefix("Bearer ")
            async with server.connect(alice_sid, query=token_query) as c:
                await expect_sync(c)
                await run_demo(c, "alice reads", [{"name": "notes.txt", "path": path}])
            # bob's session cannot name alice's file
            bob_query = "token=" + auth["bob"]["Authorization"].removeprefix("Bearer ")
            async with server.connect(bob_sid, query=bob_query) as c:
                await expect_sync(c)
                await c.send_message("steal", files=[{"name": "notes.txt", "path": path}])
                err = await next_event(c)
                assert err["type"] == "error" and "notes.txt" in err["message"], err
                await run_demo(c, "bob reads his", [{"name": "bobs.txt", "path": f"uploads/{bob_sid}/bobs.txt"}])
            assert await user_messages(server, bob_sid, auth["bob"]) == ["bob reads his"]

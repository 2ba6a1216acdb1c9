"""``navi-trio chat`` (CONTRACT section 8) against a real server.

The client runs as a real process: through pipes for the non-terminal mode (stdin not a
terminal), and under a pseudo-terminal with pexpect for the terminal mode (pexpect is
synchronous, so it runs in a worker thread while the server serves in the test's trio
loop). A dropped connection is made by a loopback TCP proxy the test owns: it cuts every
connection it carries, with no WebSocket close, as a network failure would.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from subprocess import PIPE
from typing import Any, TypeVar

import attrs
import pexpect
import trio

from navi_trio.auth import User, hash_token, new_token
from navi_trio.store.base import utc_now

from .helpers import Server, open_server, script

T = TypeVar("T")
#: Bounds, not sleeps: how long one expectation may take on a loaded machine.
WAIT_S = 30
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def chat_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NAVI_")}
    env.update(extra)
    return env


def chat_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "navi_trio", "chat", *args]


async def run_chat(stdin: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    with trio.fail_after(WAIT_S):
        proc = await trio.run_process(
            chat_cmd(*args),
            stdin=stdin.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env if env is not None else chat_env(),
        )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def words(n: int, delay: float) -> tuple[list[str], str]:
    steps: list[dict[str, Any]] = []
    for i in range(n):
        steps += [{"text": f"w{i} "}, {"sleep": delay}]
    return [f"w{i}" for i in range(n)], script(*steps)


async def messages(server: Server, sid: str) -> list[dict[str, Any]]:
    r = await server.http.get(f"/sessions/{sid}/messages")
    assert r.status_code == 200
    result: list[dict[str, Any]] = r.json()
    return result


def session_id_in(stderr: str) -> str:
    m = re.search(r"session ([0-9a-f]{32})", ANSI.sub("", stderr))
    assert m, stderr
    return m[1]


# -- a proxy that can cut connections ------------------------------------------------------


@attrs.define(eq=False)
class Proxy:
    port: int
    #: The first line each client sent (the request line of its HTTP or WebSocket handshake).
    requests: list[str] = attrs.Factory(list)
    scopes: list[trio.CancelScope] = attrs.Factory(list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop_all(self) -> int:
        """Cut every connection now (no close frame); the listener stays open."""
        live = [s for s in self.scopes if not s.cancel_called]
        for scope in live:
            scope.cancel()
        return len(live)

    def websocket_requests(self) -> list[str]:
        return [r for r in self.requests if "/ws/" in r]


@asynccontextmanager
async def open_proxy(server: Server) -> AsyncIterator[Proxy]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy = Proxy(listeners[0].socket.getsockname()[1])

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope, first: bool) -> None:
        try:
            while chunk := await src.receive_some(65536):
                if first:
                    proxy.requests.append(chunk.split(b"\r\n", 1)[0].decode("latin-1"))
                    first = False
                await dst.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()  # one direction over: the connection is over

    async def handle(client: trio.SocketStream) -> None:
        async with client:
            upstream = await trio.open_tcp_stream(server.host, server.port)
            async with upstream:
                with trio.CancelScope() as scope:
                    proxy.scopes.append(scope)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(pump, client, upstream, scope, True)
                        nursery.start_soon(pump, upstream, client, scope, False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, handle, listeners))
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


# -- non-terminal mode: pipes --------------------------------------------------------------


async def test_pipes_send_each_line_wait_for_each_answer_and_exit_0(server: Server) -> None:
    lines = [script({"text": "first answer"}), script({"think": "hmm"}, {"text": "second"}), "", "hello there"]
    rc, out, err = await run_chat("\n".join(lines) + "\n", "--url", server.base)
    assert rc == 0, err
    # The answers' text on stdout, one after another; nothing else there.
    assert out == "first answer\nsecond\nhello there\n"
    sid = session_id_in(err)
    assert "hmm" in err and "[tool] echo" in err  # thinking and tool calls on stderr
    assert "\x1b[" not in err  # not a terminal: not dimmed
    history = await messages(server, sid)
    assert [(m["role"], m["status"]) for m in history] == [("user", "complete"), ("assistant", "complete")] * 3
    await server.no_run_left()


async def test_pipes_exit_1_when_an_answer_ends_in_error(server: Server) -> None:
    lines = [script({"text": "partial"}, {"error": "the model went away"}), "and then this"]
    rc, out, err = await run_chat("\n".join(lines) + "\n", "--url", server.base)
    assert rc == 1
    assert out == "partial\nand then this\n"  # the later line is still sent
    assert "[error: the model went away]" in err
    await server.no_run_left()


async def test_session_flag_continues_a_session_and_env_vars_stand_in(tmp_path: Path) -> None:
    async with open_server(auth="required", data_dir=tmp_path) as server:
        token = new_token()
        await server.registry.store.add_user(User("u-bob", "bob", "user", utc_now()), hash_token(token))
        headers = {"Authorization": f"Bearer {token}"}
        r = await server.http.post("/sessions", json={"title": "kept"}, headers=headers)
        sid = r.json()["id"]
        env = chat_env(NAVI_URL=server.base, NAVI_TOKEN=token)
        rc, out, err = await run_chat("hello again\n", "--session", sid, env=env)
        assert (rc, out) == (0, "hello again\n"), err
        sessions = (await server.http.get("/sessions", headers=headers)).json()
        assert [s["id"] for s in sessions] == [sid]  # no new session
        # No token, or a wrong one: one line that says so, exit 1.
        for env in (chat_env(NAVI_URL=server.base), chat_env(NAVI_URL=server.base, NAVI_TOKEN="nope")):
            rc, out, err = await run_chat("hi\n", env=env)
            assert rc == 1 and out == ""
            assert err.count("\n") == 1 and "token" in err and "Traceback" not in err, err
        rc, _, err = await run_chat("hi\n", "--session", "no-such-session", "--token", token, "--url", server.base)
        assert rc == 1 and "no-such-session" in err and "Traceback" not in err


async def test_an_unreachable_server_is_one_line_and_exit_1() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # a port that nothing listens on
    rc, out, err = await run_chat("hi\n", "--url", f"http://127.0.0.1:{port}")
    assert rc == 1 and out == ""
    assert err.startswith("navi-trio chat: cannot reach the server") and err.count("\n") == 1, err


async def test_pipes_resume_a_dropped_connection_by_seq(server: Server) -> None:
    expected, content = words(80, delay=0.02)
    async with open_proxy(server) as proxy, trio.open_nursery() as nursery:
        run = partial(
            trio.run_process,
            chat_cmd("--url", proxy.url),
            stdin=PIPE,
            stdout=PIPE,
            stderr=PIPE,
            check=False,
            env=chat_env(),
        )
        proc: trio.Process = await nursery.start(run)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        await proc.stdin.send_all((content + "\n").encode())
        await proc.stdin.aclose()
        out = b""
        with trio.fail_after(WAIT_S):
            while b"w10 " not in out:
                out += await proc.stdout.receive_some()
            assert proxy.drop_all() >= 1
            while chunk := await proc.stdout.receive_some():
                out += chunk
            err = b""
            while chunk := await proc.stderr.receive_some():
                err += chunk
            rc = await proc.wait()
    assert rc == 0, err
    assert out.decode().split() == expected  # nothing lost, nothing doubled
    assert "reconnecting" in err.decode()
    resumed = [r for r in proxy.websocket_requests() if "run_id=" in r and re.search(r"after=[1-9]", r)]
    assert resumed, proxy.requests
    await server.no_run_left()


# -- terminal mode: a pseudo-terminal ------------------------------------------------------


async def in_terminal(server_url: str, work: Callable[[pexpect.spawn], T]) -> T:
    """Run the client under a pseudo-terminal; ``work`` drives it in a worker thread."""

    def run() -> T:
        child = pexpect.spawn(
            sys.executable,
            ["-m", "navi_trio", "chat", "--url", server_url],
            env=chat_env(),
            encoding="utf-8",
            timeout=WAIT_S,
            dimensions=(40, 200),
        )
        try:
            return work(child)
        finally:
            child.close(force=True)

    return await trio.to_thread.run_sync(run)


async def test_terminal_streams_dims_stops_on_ctrl_c_and_exits_0_at_the_prompt(server: Server) -> None:
    # Short lines: a terminal's line buffer holds 4095 characters.
    long_answer = script({"text": "tick ", "repeat": 2000, "delay": 0.02})

    def work(child: pexpect.spawn) -> tuple[str, int | None, str]:
        child.expect_exact("> ")
        sid = re.search(r"session ([0-9a-f]{32})", ANSI.sub("", child.before or ""))
        child.sendline("hello terminal")
        child.expect_exact("hello terminal\r\n", timeout=WAIT_S)  # the echo of the typed line
        child.expect_exact("> ")
        shown = child.before or ""  # thinking, the tool call, then the answer, word by word
        child.sendline(long_answer)
        child.expect_exact("tick tick tick")
        child.sendintr()  # Ctrl-C during an answer: the run stops
        child.expect_exact("[stopped]")
        child.expect_exact("> ")
        child.sendintr()  # Ctrl-C at the prompt: exit 0
        child.expect(pexpect.EOF)
        child.close()
        assert sid is not None
        return shown, child.exitstatus, sid[1]

    shown, status, sid = await in_terminal(server.base, work)
    assert status == 0
    assert "\x1b[2mthinking: " in shown and "\x1b[2m[tool] echo" in shown  # dimmed
    assert ANSI.sub("", shown).rstrip().endswith("hello terminal")
    history = await messages(server, sid)
    assert [m["status"] for m in history if m["role"] == "assistant"] == ["complete", "stopped"]
    stopped = history[-1]["content"].split()
    assert 3 <= len(stopped) < 2000
    await server.no_run_left()


async def test_terminal_end_of_input_at_the_prompt_exits_0(server: Server) -> None:
    def work(child: pexpect.spawn) -> int | None:
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        return child.exitstatus

    assert await in_terminal(server.base, work) == 0


async def test_terminal_resumes_a_dropped_connection_by_seq(server: Server) -> None:
    content = script({"text": "w ", "repeat": 150, "delay": 0.02})  # a short line, as typed
    async with open_proxy(server) as proxy:

        def work(child: pexpect.spawn) -> str:
            child.expect_exact("> ")
            child.sendline(content)
            child.expect_exact("w w w w w w w w w w")
            seen = (child.before or "") + (child.after or "")
            assert trio.from_thread.run_sync(proxy.drop_all) >= 1
            child.expect_exact("reconnecting")
            seen += (child.before or "") + (child.after or "")
            child.expect_exact("> ")
            seen += child.before or ""
            child.sendeof()
            child.expect(pexpect.EOF)
            return seen

        seen = await in_terminal(proxy.url, work)
    # Everything after the echo of the typed line: the answer's words, in order, once.
    answer = ANSI.sub("", seen).split(content, 1)[1]
    assert answer.split().count("w") == 150
    assert any("run_id=" in r for r in proxy.websocket_requests()), proxy.requests
    await server.no_run_left()


async def test_pipes_sigint_during_an_answer_stops_the_run(server: Server) -> None:
    content = script({"text": "tick ", "repeat": 2000, "delay": 0.02})
    async with trio.open_nursery() as nursery:
        cmd = chat_cmd("--url", server.base)
        run = partial(trio.run_process, cmd, stdin=PIPE, stdout=PIPE, stderr=PIPE, check=False, env=chat_env())
        proc: trio.Process = await nursery.start(run)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        await proc.stdin.send_all(f"{content}\nafter the stop\n".encode())
        await proc.stdin.aclose()
        out = b""
        with trio.fail_after(WAIT_S):
            while b"tick tick tick" not in out:
                out += await proc.stdout.receive_some()
            proc.send_signal(signal.SIGINT)
            while chunk := await proc.stdout.receive_some():
                out += chunk
            err = b""
            while chunk := await proc.stderr.receive_some():
                err += chunk
            rc = await proc.wait()
    assert rc == 0, err  # a stopped answer is not an error
    assert "[stopped]" in err.decode()
    text, last = out.decode().rstrip("\n").rsplit("\n", 1)
    assert last == "after the stop"  # the next line was still sent and answered
    history = await messages(server, session_id_in(err.decode()))
    assert [m["status"] for m in history if m["role"] == "assistant"] == ["stopped", "complete"]
    assert history[1]["content"].strip() == text.strip()
    await server.no_run_left()

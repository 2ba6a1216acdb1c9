"""The real commands in subprocesses: ``navi-trio serve`` and ``hypercorn ... navi_trio.asgi:app``.

Each server runs in its own process (its own session, so a failed test can kill the
whole group), with its output read by background tasks: a test waits for the printed
URL line (an event, not a sleep), then talks to it over real sockets with httpx and
trio-websocket (on a TCP stream the test owns, STYLE 1.2). Real clock only: a subprocess
is external I/O, never to be combined with ``autojump_clock`` (STYLE 4.5).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from trio_websocket import wrap_client_stream

from navi_trio.store import SqliteStore

from .helpers import Client, assert_grammar, script, text_of

BIN = Path(sys.executable).parent
NAVI = str(BIN / "navi-trio")
HYPERCORN = str(BIN / "hypercorn")
NAVI_URL = re.compile(rb"^navi-trio listening on (http://\S+)$", re.MULTILINE)
HYPERCORN_URL = re.compile(rb"Running on (http://\S+) \(CTRL \+ C to quit\)")
STARTUP_S = 30  # a cold interpreter start with every import, on a slow CI box


def clean_env(**navi: str) -> dict[str, str]:
    """The test's environment without any NAVI_* of the caller, plus ``navi``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NAVI_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["NAVI_LOG_FORMAT"] = "json"
    env.update(navi)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """A server subprocess whose stdout and stderr are collected as they arrive."""

    def __init__(self, proc: trio.Process, ready: re.Pattern[bytes]) -> None:
        self.proc = proc
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._ready = ready
        self.url = ""
        self.listening = trio.Event()
        self._watch: list[tuple[bytes, trio.Event]] = []
        #: Called the instant the URL line is seen (no scheduling delay at all).
        self.on_listening: Callable[[], None] | None = None

    async def pump(self, stream: trio.abc.ReceiveStream | None, buf: bytearray) -> None:
        assert stream is not None
        async for chunk in stream:
            buf += chunk
            for text, seen in self._watch:
                if text in self.stdout or text in self.stderr:
                    seen.set()
            if not self.listening.is_set():
                m = self._ready.search(buf)
                if m:
                    self.url = m.group(1).decode()
                    if self.on_listening is not None:
                        self.on_listening()
                    self.listening.set()

    async def wait_listening(self) -> str:
        """The URL the server printed, once it printed it (or fail, showing its output)."""
        with trio.move_on_after(STARTUP_S):
            async with trio.open_nursery() as nursery:

                async def exited() -> None:
                    await self.proc.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(exited)
                await self.listening.wait()
                nursery.cancel_scope.cancel()
        assert self.listening.is_set(), f"no URL line; exit code {self.proc.returncode}\n{self.output}"
        return self.url

    async def wait_output(self, text: bytes) -> None:
        """Until ``text`` appears in the output (a log line is the only signal there is)."""
        seen = trio.Event()
        self._watch.append((text, seen))
        if text in self.stdout or text in self.stderr:
            seen.set()
        await seen.wait()

    @property
    def output(self) -> str:
        return (self.stdout + b"\n--- stderr ---\n" + self.stderr).decode(errors="replace")

    @property
    def host_port(self) -> tuple[str, int]:
        url = urlsplit(self.url)
        assert url.hostname is not None
        assert url.port is not None
        return url.hostname, url.port

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait_exit(self, within: float) -> int:
        with trio.fail_after(within):
            return await self.proc.wait()


@asynccontextmanager
async def spawn(
    cmd: Sequence[str],
    env: dict[str, str],
    cwd: Path,
    ready: re.Pattern[bytes] = NAVI_URL,
    *,
    stderr: int | IO[bytes] = subprocess.PIPE,
) -> AsyncIterator[ServerProcess]:
    """Start ``cmd``; on exit make sure its whole process group is gone, pipes closed.

    ``stderr`` is a pipe whose output is collected, unless given (a file, ``/dev/full``)."""
    proc = await trio.lowlevel.open_process(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    server = ServerProcess(proc, ready)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.pump, proc.stdout, server.stdout)
            if proc.stderr is not None:
                nursery.start_soon(server.pump, proc.stderr, server.stderr)
            try:
                yield server
            finally:
                with trio.CancelScope(shield=True):
                    await reap(proc)
                # The pumps end at EOF, now that nothing holds the pipes; bound it anyway.
                nursery.cancel_scope.deadline = trio.current_time() + 10
    finally:
        with trio.CancelScope(shield=True):
            await reap(proc)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    await pipe.aclose()


async def reap(proc: trio.Process) -> None:
    """Kill the process (if it still runs) and anything it spawned (hypercorn's worker)."""
    if proc.returncode is None:
        killpg(proc.pid)
    with trio.move_on_after(10):
        await proc.wait()
    killpg(proc.pid)


def killpg(pgid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@asynccontextmanager
async def ws_connect(host: str, port: int, path: str) -> AsyncIterator[Client]:
    """A trio-websocket client over a TCP stream this test owns (STYLE 1.2)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, host, path)
        try:
            yield Client(ws)
        finally:
            with trio.move_on_after(2, shield=True):
                await ws.aclose()


def http_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=10)


def navi_serve(data_dir: Path, *args: str) -> list[str]:
    return [NAVI, "serve", "--port", "0", "--data-dir", str(data_dir), *args]


async def healthz(url: str) -> None:
    async with http_client(url) as http:
        r = await http.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


# -- navi-trio serve ---------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_serve_prints_real_url_answers_healthz_and_exits_on_signal(tmp_path: Path, signum: int) -> None:
    data = tmp_path / "data"
    with trio.fail_after(STARTUP_S + 20):
        async with spawn(navi_serve(data), clean_env(), tmp_path) as srv:
            url = await srv.wait_listening()
            host, port = srv.host_port
            assert host == "127.0.0.1"
            assert 0 < port < 65536
            assert url == f"http://127.0.0.1:{port}"
            await healthz(url)
            srv.signal(signum)
            assert await srv.wait_exit(5) == 0, srv.output
        assert "Traceback" not in srv.output
    assert (data / "navi.sqlite3").is_file()  # the default store: SQLite under the data dir


async def test_sigterm_stops_active_run_closes_1012_and_answer_is_interrupted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(NAVI_GRACE_S="0.5")
    content = json.dumps({"script": [{"text": "partial "}, {"tool": "t", "delay": 60}]})
    with trio.fail_after(2 * STARTUP_S + 30):
        async with spawn(navi_serve(data), env, tmp_path) as srv:
            url = await srv.wait_listening()
            host, port = srv.host_port
            async with http_client(url) as http:
                r = await http.post("/sessions", json={})
                assert r.status_code == 201, r.text
                sid = r.json()["id"]
            async with ws_connect(host, port, f"/ws/sessions/{sid}") as c:
                assert (await c.recv())["type"] == "session_sync"
                await c.send({"type": "message", "content": content})
                got = await c.until("tool_started")  # the run is in its 60 s tool
                t0 = trio.current_time()
                srv.signal(signal.SIGTERM)
                got += await c.until_terminal()
                code = await c.until_closed()
            assert_grammar(got, merged=False)
            assert got[-2]["type"] == "tool_call"
            assert (got[-2]["result"], got[-2]["success"]) == ("cancelled", False)
            assert got[-1] == {
                "type": "stream_stopped",
                "seq": got[-1]["seq"],
                "content": "partial ",
                "reason": "shutdown",
            }
            assert code == 1012
            assert await srv.wait_exit(15) == 0, srv.output
            assert trio.current_time() - t0 < 10  # the grace (0.5 s), not the tool's 60 s

        # The next start on the same data dir shows the partial answer, interrupted.
        async with spawn(navi_serve(data), clean_env(), tmp_path) as srv:
            url = await srv.wait_listening()
            async with http_client(url) as http:
                r = await http.get(f"/sessions/{sid}/messages")
            assert r.status_code == 200, r.text
            msgs = r.json()
            assert [(m["role"], m["status"]) for m in msgs] == [("user", "complete"), ("assistant", "interrupted")]
            assert msgs[0]["content"] == content
            assert msgs[1]["content"] == "partial "
            assert msgs[1]["tool_calls"] == [{"tool": "t", "args": {}, "result": "cancelled", "success": False}]
            srv.signal(signal.SIGINT)
            assert await srv.wait_exit(5) == 0, srv.output


async def test_second_sigint_exits_at_once(tmp_path: Path) -> None:
    """Ctrl-C starts the graceful drain; a second Ctrl-C exits at once (130), quietly."""
    env = clean_env(NAVI_GRACE_S="60")
    with trio.fail_after(STARTUP_S + 30):
        async with spawn(navi_serve(tmp_path / "data"), env, tmp_path) as srv:
            url = await srv.wait_listening()
            host, port = srv.host_port
            async with http_client(url) as http:
                sid = (await http.post("/sessions", json={})).json()["id"]
            async with ws_connect(host, port, f"/ws/sessions/{sid}") as c:
                assert (await c.recv())["type"] == "session_sync"
                await c.send_message(script({"tool": "t", "delay": 60}))
                await c.until("tool_started")
                srv.signal(signal.SIGINT)
                await srv.wait_output(b"server.draining")  # the first one was heard
                srv.signal(signal.SIGINT)
                with trio.move_on_after(10):
                    await srv.proc.wait()
                assert srv.proc.returncode is not None, f"still running 10 s after the second SIGINT\n{srv.output}"
                await c.until_closed()
            assert srv.proc.returncode == 130, srv.output
            assert "Traceback" not in srv.output, srv.output


def loopback_alias() -> str:
    """127.0.0.2 where it can be bound (Linux), so NAVI_HOST differs from the default."""
    try:
        free_port("127.0.0.2")
    except OSError:
        pytest.skip("127.0.0.2 cannot be bound here")
    return "127.0.0.2"


async def test_env_vars_configure_serve(tmp_path: Path) -> None:
    host = loopback_alias()
    port = free_port(host)
    data = tmp_path / "env-data"
    env = clean_env(NAVI_HOST=host, NAVI_PORT=str(port), NAVI_DATA_DIR=str(data))
    with trio.fail_after(STARTUP_S + 20):
        async with spawn([NAVI, "serve"], env, tmp_path) as srv:
            url = await srv.wait_listening()
            assert url == f"http://{host}:{port}"
            await healthz(url)
            srv.signal(signal.SIGTERM)
            assert await srv.wait_exit(5) == 0, srv.output
    assert (data / "navi.sqlite3").is_file()
    assert not (tmp_path / "navi-data").exists()  # the default data dir was not used


async def test_flags_beat_env_vars(tmp_path: Path) -> None:
    env_port, flag_port = free_port(), free_port()
    env = clean_env(NAVI_PORT=str(env_port), NAVI_DATA_DIR=str(tmp_path / "env-data"))
    cmd = [NAVI, "serve", "--port", str(flag_port), "--data-dir", str(tmp_path / "flag-data")]
    with trio.fail_after(STARTUP_S + 20):
        async with spawn(cmd, env, tmp_path) as srv:
            url = await srv.wait_listening()
            assert url == f"http://127.0.0.1:{flag_port}"
            await healthz(url)
            srv.signal(signal.SIGINT)
            assert await srv.wait_exit(5) == 0, srv.output
    assert (tmp_path / "flag-data" / "navi.sqlite3").is_file()
    assert not (tmp_path / "env-data").exists()


@pytest.mark.parametrize(
    ("name", "value", "mentions"),
    [
        ("NAVI_HEARTBEAT_S", "abc", "NAVI_HEARTBEAT_S"),
        ("NAVI_PORT", "eighty", "NAVI_PORT"),
        ("NAVI_GRACE_S", "soon", "NAVI_GRACE_S"),
        # Values that parse but are refused: the message names the setting.
        ("NAVI_HEARTBEAT_S", "0", "heartbeat_s"),
        ("NAVI_PORT", "70000", "port"),
        ("NAVI_AUTH", "sometimes", "auth"),
        ("NAVI_STORE", "postgres", "store"),
    ],
)
async def test_bad_env_value_exits_2_naming_it(tmp_path: Path, name: str, value: str, mentions: str) -> None:
    env = clean_env(**{name: value})
    with trio.fail_after(STARTUP_S):
        result = await trio.run_process(
            [NAVI, "serve", "--data-dir", str(tmp_path / "data")],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, err)
    assert mentions.lower() in err.lower(), err
    assert "Traceback" not in err
    assert b"listening" not in result.stdout
    assert not (tmp_path / "data").exists()  # refused before touching anything


async def test_python_dash_m_bad_flag_exits_2(tmp_path: Path) -> None:
    with trio.fail_after(STARTUP_S):
        result = await trio.run_process(
            [sys.executable, "-m", "navi_trio", "serve", "--port", "abc"],
            env=clean_env(),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert "--port" in result.stderr.decode()


# -- hypercorn --worker-class trio navi_trio.asgi:app ----------------------------------------


def hypercorn_cmd(port: int, *extra: str) -> list[str]:
    return [HYPERCORN, "--worker-class", "trio", "navi_trio.asgi:app", "--bind", f"127.0.0.1:{port}", *extra]


async def test_hypercorn_serves_the_app_configured_from_env(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "hyper-data"
    env = clean_env(NAVI_DATA_DIR=str(data))
    with trio.fail_after(STARTUP_S + 40):
        async with spawn(hypercorn_cmd(port), env, tmp_path, ready=HYPERCORN_URL) as srv:
            url = await srv.wait_listening()
            assert url == f"http://127.0.0.1:{port}"
            await healthz(url)
            async with http_client(url) as http:
                r = await http.post("/sessions", json={"title": "via hypercorn"})
                assert r.status_code == 201, r.text
                sid = r.json()["id"]
            async with ws_connect("127.0.0.1", port, f"/ws/sessions/{sid}") as c:
                assert (await c.recv())["type"] == "session_sync"
                await c.send_message(script({"text": "hi ", "repeat": 3}, {"tool": "t", "result": "ok"}))
                got = await c.until_terminal()
            assert_grammar(got)  # a burst may reach the reader merged if the machine is busy
            assert [e["type"] for e in got if e["type"] != "stream_delta"] == [
                "stream_start",
                "tool_started",
                "tool_call",
                "stream_end",
            ]
            assert got[-1]["content"] == text_of(got) == "hi hi hi "
            async with http_client(url) as http:
                r = await http.get(f"/sessions/{sid}/messages")
            assert [(m["role"], m["status"]) for m in r.json()] == [("user", "complete"), ("assistant", "complete")]
            srv.signal(signal.SIGTERM)
            assert await srv.wait_exit(15) == 0, srv.output
    # NAVI_DATA_DIR was honoured: the answer is in the SQLite database there.
    async with await SqliteStore.open(data / "navi.sqlite3") as store:
        with trio.fail_after(10):
            msgs = await store.list_messages(sid)
    assert [m.content for m in msgs][1] == "hi hi hi "


async def test_hypercorn_sigterm_closes_open_websockets_with_1012(tmp_path: Path) -> None:
    """CONTRACT 7: on SIGTERM every WebSocket is closed with 1012, also in the hypercorn
    deployment, where the app hears of the shutdown only when hypercorn cancels the
    connections after its graceful timeout."""
    port = free_port()
    env = clean_env(NAVI_DATA_DIR=str(tmp_path / "data"))
    with trio.fail_after(STARTUP_S + 40):
        async with spawn(hypercorn_cmd(port, "--graceful-timeout", "1"), env, tmp_path, ready=HYPERCORN_URL) as srv:
            url = await srv.wait_listening()
            async with http_client(url) as http:
                sid = (await http.post("/sessions", json={})).json()["id"]
            async with ws_connect("127.0.0.1", port, f"/ws/sessions/{sid}") as c:
                assert (await c.recv())["type"] == "session_sync"
                srv.signal(signal.SIGTERM)
                code = await c.until_closed()
            assert await srv.wait_exit(15) == 0, srv.output
    assert code == 1012


async def test_signal_right_after_the_url_line_is_graceful(tmp_path: Path) -> None:
    """The URL line means "ready": a supervisor may signal the moment it reads it, and
    the shutdown must still be graceful (exit 0), not the default action of the signal.
    Repeated, because it is a race; each round has the same chance to expose it."""
    rounds = 10
    codes: list[int] = []
    with trio.fail_after(rounds * (STARTUP_S / 3 + 10)):
        for i in range(rounds):
            signum = signal.SIGTERM if i % 2 else signal.SIGINT
            async with spawn(navi_serve(tmp_path / "data"), clean_env(), tmp_path) as srv:
                srv.on_listening = partial(srv.signal, signum)
                await srv.wait_listening()
                codes.append(await srv.wait_exit(10))
    assert codes == [0] * rounds, codes  # -15: killed by SIGTERM; 130: KeyboardInterrupt

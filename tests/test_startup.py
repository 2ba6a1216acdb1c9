"""Starting, failing to start, and the supervisor failing: the operator's view (CONTRACT 1).

Real processes (``navi-trio serve``, ``navi-trio users``, ``hypercorn``) with their output
read as it comes; the supervisor's failure also in-process, where ``/healthz`` can be
asked while the server is still up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from navi_trio import __version__

from .helpers import Server, all_tasks, open_server
from .test_cli import (
    HYPERCORN,
    HYPERCORN_URL,
    NAVI,
    STARTUP_S,
    clean_env,
    free_port,
    healthz,
    http_client,
    navi_serve,
    spawn,
    ws_connect,
)


async def run(cmd: Sequence[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(STARTUP_S):
        return await trio.run_process(
            list(cmd),
            env=clean_env(**env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def assert_one_line_failure(result: subprocess.CompletedProcess[bytes], *mentions: str) -> str:
    """Exit non-zero, no URL, no traceback, one line on stderr that names ``mentions``."""
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 1, (result.returncode, out, err)
    assert "listening" not in out and "Running on" not in err, (out, err)
    assert "Traceback" not in err and "Exception" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for text in mentions:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# -- the server cannot start: one line, no URL, non-zero ----------------------------------


async def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    line = assert_one_line_failure(await run(navi_serve(tmp_path / "data"), tmp_path), "data")
    assert "File exists" in line or "Not a directory" in line, line


async def test_database_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "navi.sqlite3").write_bytes(b"garbage " * 512)
    assert_one_line_failure(await run(navi_serve(tmp_path / "data"), tmp_path), "navi.sqlite3", "not a database")


async def test_database_from_a_newer_version_cannot_be_migrated(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "navi.sqlite3") as conn:
        conn.execute("PRAGMA user_version = 999")
    conn.close()
    assert_one_line_failure(await run(navi_serve(tmp_path / "data"), tmp_path), "navi.sqlite3", "schema version 999")


def read_only_cmd(directory: Path, cmd: list[str]) -> list[str]:
    """``cmd`` run with ``directory`` read-only: by its mode for a normal user, by a
    read-only bind mount in a user namespace for root (whom modes do not stop)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return cmd
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], check=False).returncode != 0:
        pytest.skip("running as root without user namespaces: no way to make a read-only directory")
    mount = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
    return [unshare, "-rm", "sh", "-c", mount, "sh", str(directory), *cmd]


async def test_read_only_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    try:
        result = await run(read_only_cmd(data, navi_serve(data)), tmp_path)
    finally:
        data.chmod(0o755)
    assert_one_line_failure(result, "navi.sqlite3", "read-only")


async def test_port_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [NAVI, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]
        assert_one_line_failure(await run(cmd, tmp_path), f"127.0.0.1:{port}", "in use")


# -- what a first-time user sees --------------------------------------------------------


async def test_version(tmp_path: Path) -> None:
    result = await run([NAVI, "--version"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"navi-trio {__version__}"


@pytest.mark.parametrize("where", ["after", "before"])
async def test_users_take_the_data_dir_before_or_after_their_arguments_and_say_which(
    tmp_path: Path, where: str
) -> None:
    data = tmp_path / "elsewhere"
    opt = ["--data-dir", str(data)]
    add = [NAVI, "users", *opt, "add", "alice"] if where == "before" else [NAVI, "users", "add", "alice", *opt]
    result = await run(add, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"data dir {data.resolve()}" in result.stderr.decode()
    assert (data / "navi.sqlite3").is_file()
    assert not (tmp_path / "navi-data").exists()
    listed = await run([NAVI, "users", "list", *opt], tmp_path)
    assert listed.stdout.decode().startswith("alice\tuser\tactive"), listed
    assert f"data dir {data.resolve()}" in listed.stderr.decode()


async def test_serve_says_its_data_dir_listens_once_and_how_to_exit_at_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(STARTUP_S + 20):
        async with spawn(navi_serve(data), clean_env(), tmp_path) as srv:
            url = await srv.wait_listening()
            await healthz(url)
            srv.signal(signal.SIGINT)
            assert await srv.wait_exit(10) == 0, srv.output
    assert f"navi-trio: data dir {data.resolve()}" in srv.stdout.decode()
    assert srv.output.count(url) == 1, srv.output  # hypercorn's own "Running on" is not repeated
    assert "Ctrl-C again exits at once" in srv.stdout.decode(), srv.output


async def test_access_log_dash_goes_to_stderr_as_help_says(tmp_path: Path) -> None:
    help_text = (await run([NAVI, "serve", "--help"], tmp_path)).stdout.decode()
    assert "'-' for stderr" in help_text
    with trio.fail_after(STARTUP_S + 20):
        async with spawn(navi_serve(tmp_path / "data", "--access-log", "-"), clean_env(), tmp_path) as srv:
            url = await srv.wait_listening()
            await healthz(url)
            await srv.wait_output(b"GET /healthz")
            srv.signal(signal.SIGTERM)
            assert await srv.wait_exit(10) == 0, srv.output
    assert b"GET /healthz" in srv.stderr
    assert b"GET /healthz" not in srv.stdout


# -- hypercorn's own CLI without the config module: one warning ----------------------------


@pytest.mark.parametrize("with_config", [False, True], ids=["plain", "with-config"])
async def test_hypercorn_without_config_warns_once(tmp_path: Path, with_config: bool) -> None:
    port = free_port()
    env = clean_env(NAVI_DATA_DIR=str(tmp_path / "data"), NAVI_PORT=str(port))
    if with_config:
        cmd = [HYPERCORN, "--config", "python:navi_trio.hypercorn_conf", "navi_trio.asgi:app"]
    else:
        cmd = [HYPERCORN, "--worker-class", "trio", "navi_trio.asgi:app", "--bind", f"127.0.0.1:{port}"]
    with trio.fail_after(STARTUP_S + 20):
        async with spawn(cmd, env, tmp_path, ready=HYPERCORN_URL) as srv:
            url = await srv.wait_listening()
            await healthz(url)
            srv.signal(signal.SIGTERM)
            assert await srv.wait_exit(15) == 0, srv.output
    warnings = [line for line in srv.output.splitlines() if "hypercorn.started_without_config" in line]
    if with_config:
        assert warnings == [], srv.output
    else:
        assert len(warnings) == 1, srv.output
        for text in ("16 MiB", "50 MB", "3 s", "NAVI_GRACE_S", "navi_trio.hypercorn_conf", '"level": "warning"'):
            assert text in warnings[0], (text, warnings[0])


# -- the run supervisor fails while serving: 503, then exit non-zero -----------------------


class InjectedFault(Exception):
    """Stands for a bug in any task of the server nursery."""


async def _fail() -> None:
    raise InjectedFault("injected fault")


def server_nursery() -> trio.Nursery:
    """The lifespan's server nursery: the one nursery of hypercorn's lifespan task, which
    runs our ``NaviApp.lifespan``."""
    [lifespan] = [t for t in all_tasks() if t.name.endswith("Lifespan.handle_lifespan")]
    [nursery] = lifespan.child_nurseries
    return nursery


async def test_supervisor_gone_makes_healthz_503_and_closes_sockets(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_server(store="sqlite", data_dir=tmp_path / "data") as server:
            await _healthz_status(server, 200)
            sid = await server.new_session()
            async with server.connect(sid) as c:
                assert (await c.recv())["type"] == "session_sync"
                server_nursery().start_soon(_fail)
                await server.app.failed.wait()
                r = await server.http.get("/healthz")
                assert r.status_code == 503, r.text
                assert "supervisor failed" in r.json()["detail"], r.text
                assert "injected fault" in r.json()["detail"], r.text
                assert await c.until_closed() == 1011


async def _healthz_status(server: Server, status: int) -> None:
    r = await server.http.get("/healthz")
    assert r.status_code == status, r.text


REPO = Path(__file__).resolve().parent.parent

#: ``navi-trio serve`` whose server nursery gets a failing task on SIGUSR1.
FAULT_ON_SIGUSR1 = """
import signal, sys, trio
from navi_trio.logs import configure_logging
from navi_trio.server import serve
from navi_trio.settings import Settings
from tests.helpers import all_tasks

async def fail():
    raise RuntimeError("injected fault")

async def main():
    settings = Settings.from_env(port=0)
    configure_logging("json")
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, settings)
            async for _ in signals:
                [lifespan] = [t for t in all_tasks() if t.name.endswith("Lifespan.handle_lifespan")]
                lifespan.child_nurseries[0].start_soon(fail)

try:
    trio.run(main)
except* SystemExit as group:  # serve's own exit, out of this script's nursery
    raise group.exceptions[0] from None
"""


async def test_supervisor_gone_exits_non_zero(tmp_path: Path) -> None:
    env = clean_env(NAVI_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO))
    with trio.fail_after(STARTUP_S + 30):
        async with spawn([sys.executable, "-c", FAULT_ON_SIGUSR1], env, tmp_path) as srv:
            url = await srv.wait_listening()
            await healthz(url)
            host, port = srv.host_port
            async with http_client(url) as http:
                sid = (await http.post("/sessions", json={})).json()["id"]
            async with ws_connect(host, port, f"/ws/sessions/{sid}") as c:
                assert (await c.recv())["type"] == "session_sync"
                srv.signal(signal.SIGUSR1)
                assert await c.until_closed() == 1011
            assert await srv.wait_exit(15) == 1, srv.output
    assert "server.supervisor_failed" in srv.stderr.decode(), srv.output
    last = srv.stderr.decode().splitlines()[-1]
    assert last == "navi-trio: The run supervisor failed: RuntimeError: injected fault; exiting", srv.output

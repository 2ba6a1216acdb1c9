"""A log that cannot be written never stops the server (CONTRACT section 1).

Real ``navi-trio serve`` processes whose stderr is a pipe nobody reads any more (a
supervisor restarting, ``| head``) or a full disk (``/dev/full``): every log line fails
with ``EPIPE`` / ``ENOSPC``, and runs, requests and health must not notice.
"""

from __future__ import annotations

import io
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio

from navi_trio.logs import SafePrintLogger, dropped_lines, guard_stdlib_logger

from .helpers import assert_grammar, script, text_of
from .test_cli import STARTUP_S, ServerProcess, clean_env, http_client, navi_serve, spawn, ws_connect


def serve_cmd(tmp_path: Path) -> list[str]:
    """``navi-trio serve`` with hypercorn's access log on stderr too (``-``)."""
    return navi_serve(tmp_path / "data", "--access-log", "-")


@asynccontextmanager
async def closed_pipe_stderr(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    """A server whose stderr pipe loses its reader once the server is listening."""
    read_end, write_end = os.pipe()
    try:
        async with spawn(serve_cmd(tmp_path), clean_env(), tmp_path, stderr=write_end) as srv:
            os.close(write_end)
            write_end = -1
            await srv.wait_listening()
            os.close(read_end)  # from now on every write to the server's stderr is EPIPE
            read_end = -1
            yield srv
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


@asynccontextmanager
async def full_disk_stderr(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    """A server whose stderr is ``/dev/full``: every write fails with ENOSPC, from the start."""
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        async with spawn(serve_cmd(tmp_path), clean_env(), tmp_path, stderr=full) as srv:
            await srv.wait_listening()
            yield srv
    finally:
        os.close(full)


@pytest.mark.parametrize("broken_stderr", [closed_pipe_stderr, full_disk_stderr], ids=["closed-pipe", "dev-full"])
async def test_unwritable_log_does_not_stop_runs_requests_or_health(
    tmp_path: Path, broken_stderr: Callable[[Path], AbstractAsyncContextManager[ServerProcess]]
) -> None:
    with trio.fail_after(STARTUP_S + 40):
        async with broken_stderr(tmp_path) as srv:
            host, port = srv.host_port
            async with http_client(srv.url) as http:
                r = await http.post("/sessions", json={})
                assert r.status_code == 201, r.text
                sid = r.json()["id"]
            for _ in range(2):  # the second run proves the first one left nothing broken
                async with ws_connect(host, port, f"/ws/sessions/{sid}") as c:
                    assert (await c.recv())["type"] == "session_sync"
                    await c.send_message(script({"think": "hm"}, {"text": "a ", "repeat": 3}, {"tool": "t"}))
                    got = await c.until_terminal()
                assert_grammar(got)
                assert got[-1]["type"] == "stream_end", got[-1]
                assert got[-1]["content"] == text_of(got) == "a a a "
            async with http_client(srv.url) as http:
                r = await http.get("/sessions")
                assert r.status_code == 200, r.text
                assert [s["id"] for s in r.json()] == [sid]
                r = await http.get(f"/sessions/{sid}")
                assert r.status_code == 200, r.text
                assert r.json()["running"] is False
                r = await http.get(f"/sessions/{sid}/messages")
                statuses = [(m["role"], m["status"]) for m in r.json()]
                assert statuses == [("user", "complete"), ("assistant", "complete")] * 2
                r = await http.get("/healthz")
                assert (r.status_code, r.json()) == (200, {"status": "ok"})
            srv.signal(signal.SIGTERM)
            assert await srv.wait_exit(15) == 0, srv.output


def test_a_line_that_cannot_be_written_is_dropped_and_counted(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as f:
        logger = SafePrintLogger(f)
        logger.info("written")
        f.flush()
        before = dropped_lines()
        f.close()  # a write now raises ValueError
        logger.info("dropped")
        logger.error("dropped too")
    assert dropped_lines() == before + 2
    assert (tmp_path / "log").read_text() == "written\n"
    full = open("/dev/full", "w")  # noqa: SIM115 (its close fails too: the line is still buffered)
    try:
        SafePrintLogger(full).warning("no space")
    finally:
        with suppress(OSError):
            full.close()
    assert dropped_lines() == before + 3


def test_hypercorn_handlers_drop_and_count_what_they_cannot_write(capsys: pytest.CaptureFixture[str]) -> None:
    """hypercorn's error and access logs are stdlib handlers; their lines are dropped and
    counted too, instead of a "--- Logging error ---" traceback per line on stderr."""
    logger = logging.getLogger("navi-test.broken-handler")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        guard_stdlib_logger(logger)
        stream.close()  # a write now fails
        before = dropped_lines()
        logger.warning("dropped")
        assert dropped_lines() == before + 1
        assert "Logging error" not in capsys.readouterr().err
    finally:
        logger.removeHandler(handler)

"""The terminal client's trio layer: the session over HTTP (httpx2), its runs over the
session's WebSocket (trio-websocket), the prompt, and Ctrl-C.

Three tasks in one nursery, each owning its piece:
- :meth:`Chat.serve` owns the WebSocket and the current :class:`~.answer.Answer`: it
  reconnects with backoff after a drop and resumes the answer by ``run_id`` and ``after``
  (the highest seq applied), so nothing is lost or printed twice;
- the prompt loop reads lines (in a worker thread: a blocked ``readline`` is abandoned on
  exit) and waits for each answer;
- the interrupt watcher turns SIGINT into a stop during an answer, or a clean exit at the
  prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, TextIO
from urllib.parse import quote, urlencode, urlsplit

import attrs
import httpx2 as httpx
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, wrap_client_stream

from .answer import Answer
from .output import Printer

DEFAULT_URL: Final = "http://127.0.0.1:8000"
CLOSE_DENIED: Final = 4003
CLOSE_NOT_FOUND: Final = 4004
#: Seconds between reconnection attempts (then the last, with jitter) while the server is away.
BACKOFF_S: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
#: How long the server may stay unreachable before the client gives up (a script must end).
GIVE_UP_S: Final = 120.0
#: A replay of a long answer comes as one merged event, and ``stream_end`` holds the whole text.
MAX_FRAME: Final = 64 * 1024 * 1024
EXIT_INTERRUPTED: Final = 130
NO_RUN_TO_STOP: Final = "No active run to stop."


class ChatError(Exception):
    """What ends the client, in words for its user (one line, no traceback)."""


@attrs.frozen
class Endpoint:
    """Where the server is: ``http(s)://host:port/prefix`` (``ws(s)://`` accepted too)."""

    host: str
    port: int
    tls: bool
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise ChatError(f"not a server URL: {url!r} (expected http://HOST:PORT)")
        tls = parts.scheme in ("https", "wss")
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            raise ChatError(f"not a server URL: {url!r} (bad port)") from None
        return cls(parts.hostname, port, tls, parts.path.rstrip("/"))

    @property
    def http_base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{self.prefix}"


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _http_problem(response: httpx.Response, what: str) -> ChatError:
    try:
        detail = str(response.json().get("detail", ""))
    except ValueError:
        detail = response.text[:200]
    if response.status_code == 401:
        return ChatError(f"{what}: {detail or 'a token is needed'} (pass --token or set NAVI_TOKEN)")
    return ChatError(f"{what}: {detail or response.reason_phrase} ({response.status_code})")


async def open_session(http: httpx.AsyncClient, session_id: str | None) -> str:
    """The session to talk in: ``session_id`` if it exists and is the caller's, else a new one."""
    if session_id is not None:
        r = await http.get(f"/sessions/{quote(session_id, safe='')}")
        if r.status_code != 200:
            raise _http_problem(r, f"cannot open session {session_id}")
        return session_id
    r = await http.post("/sessions", json={"title": "Terminal chat"})
    if r.status_code != 201:
        raise _http_problem(r, "cannot create a session")
    sid: str = r.json()["id"]
    return sid


class Chat:
    """One session followed over its WebSocket; see the module docstring."""

    def __init__(
        self, endpoint: Endpoint, http: httpx.AsyncClient, session_id: str, token: str | None, printer: Printer
    ) -> None:
        self.endpoint = endpoint
        self.http = http
        self.session_id = session_id
        self.token = token
        self.printer = printer
        #: The run being printed (ours or another client's), until the next one starts.
        self.answer: Answer | None = None
        #: The message sent and not answered yet, and the run that answers it once known.
        self.waiting: str | None = None
        self._mine: str | None = None
        self._dropped_before_start = False
        self.stopping = False
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._done_send, self._done_recv = trio.open_memory_channel[Answer | str](1)

    # -- the connection ------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the session's WebSocket up until cancelled; started once first connected.

        Raises :class:`ChatError` when the server refuses us (4003, 4004) or cannot be
        reached at first. Cancellation: closes the connection (bounded) and returns.
        """
        attempt = 0
        started = False
        lost_at = 0.0
        while True:
            problem = ""
            close_code: int | None = None
            try:
                async with self._open() as ws:
                    if not started:
                        task_status.started()
                        started = True
                    elif attempt:
                        self.printer.note("[reconnected]")
                    attempt = 0
                    close_code = await self._follow(ws)
            except* (OSError, HandshakeError, trio.BrokenResourceError) as group:
                problem = str(group.exceptions[0]) or type(group.exceptions[0]).__name__
            if close_code == CLOSE_DENIED:
                raise ChatError("the server refused the token (pass a valid --token or set NAVI_TOKEN)")
            if close_code == CLOSE_NOT_FOUND:
                raise ChatError(f"session {self.session_id} no longer exists")
            if not started:
                raise ChatError(f"cannot reach the server at {self.endpoint.http_base}: {problem}")
            if attempt == 0:
                lost_at = trio.current_time()
                if self.waiting is not None:
                    self.printer.note("[connection lost; reconnecting…]")
            elif trio.current_time() - lost_at > GIVE_UP_S:
                raise ChatError(f"lost the connection to {self.endpoint.http_base} ({problem or 'closed'})")
            if self.waiting is not None and self._mine is None:
                self._dropped_before_start = True
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            attempt += 1
            await trio.sleep(delay * (0.5 + random.random()))

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[WebSocketConnection]:
        """A WebSocket on a TCP stream this client owns (closed on exit, whoever closes
        first), resuming the current answer by seq if it has not ended."""
        ep = self.endpoint
        query: dict[str, str] = {}
        answer = self.answer
        if answer is not None and not answer.ended:
            query = {"run_id": answer.run_id, "after": str(answer.seq)}
        resource = f"{ep.prefix}/ws/sessions/{quote(self.session_id, safe='')}"
        if query:
            resource += "?" + urlencode(query)
        headers = [(k.lower().encode(), v.encode()) for k, v in _auth_headers(self.token).items()]
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        if ep.tls:
            stream = await trio.open_ssl_over_tcp_stream(ep.host, ep.port)
        else:
            stream = await trio.open_tcp_stream(ep.host, ep.port)
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, f"{ep.host}:{ep.port}", resource, extra_headers=headers, max_message_size=MAX_FRAME
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()

    async def _follow(self, ws: WebSocketConnection) -> int | None:
        """Read and handle events until the connection closes; its close code."""
        self._ws = ws
        self._connected.set()
        try:
            while True:
                try:
                    raw = await ws.get_message()
                except ConnectionClosed as exc:
                    return exc.reason.code if exc.reason is not None else None
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    await self._handle(event)
        finally:
            self._ws = None
            self._connected = trio.Event()

    async def _send(self, message: dict[str, Any]) -> None:
        """Send on the current connection, waiting for one if it is down."""
        text = json.dumps(message)
        while True:
            ws = self._ws
            if ws is None:
                await self._connected.wait()
                continue
            try:
                await ws.send_message(text)
            except ConnectionClosed:
                continue  # not sent: the next connection takes it
            return

    # -- events ----------------------------------------------------------------------------
    async def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("heartbeat", "replay_start", "replay_end"):
            return
        if kind == "session_sync":
            await self._sync()
            return
        if kind == "error" and "seq" not in event:
            message = str(event.get("message", "error"))
            if message == NO_RUN_TO_STOP:
                return  # a Ctrl-C that came as the answer ended: nothing left to stop
            if self.waiting is not None and self._mine is None:
                self._done(message)
            else:
                self.printer.problem(f"[server: {message}]")
            return
        if kind == "stream_start":
            run_id = str(event.get("run_id", ""))
            if self.answer is not None and self.answer.run_id == run_id:
                return  # a resume starts with it again
            self.answer = Answer(run_id, seq=int(event.get("seq", 1)))
            if self.waiting is not None and self._mine is None:
                self._mine = run_id
            else:
                self.printer.note("[an answer to another client of this session]")
            return
        answer = self.answer
        if answer is None:
            return
        self.printer.emit(answer.apply(event))
        if answer.ended:
            self._ended(answer)

    async def _sync(self) -> None:
        """``session_sync``: the run we were printing ended while we were away, or the
        message we sent was answered (or lost) while the connection was down."""
        answer = self.answer
        if answer is not None and not answer.ended:
            saved = await self._last_answer(None)
            self.printer.emit(answer.catch_up(saved or {"status": "interrupted"}))
            self._ended(answer)
        elif self.waiting is not None and self._mine is None and self._dropped_before_start:
            saved = await self._last_answer(self.waiting)
            if saved is None:
                self._done("the connection dropped before the message reached the server; send it again")
                return
            answer = self.answer = Answer("", seq=0)
            self._mine = ""
            self.printer.emit(answer.catch_up(saved))
            self._ended(answer)

    async def _last_answer(self, after_user_message: str | None) -> dict[str, Any] | None:
        """The last saved answer (if ``after_user_message``, only one that answers it)."""
        try:
            r = await self.http.get(f"/sessions/{quote(self.session_id, safe='')}/messages")
            r.raise_for_status()
            messages = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            self.printer.problem(f"[could not read the history: {exc}]")
            return None
        if not messages or messages[-1].get("role") != "assistant":
            return None
        if after_user_message is not None and (len(messages) < 2 or messages[-2].get("content") != after_user_message):
            return None
        last: dict[str, Any] = messages[-1]
        return last

    def _ended(self, answer: Answer) -> None:
        self.printer.end(answer)
        if self._mine is not None and answer.run_id == self._mine:
            self._done(answer)

    def _done(self, result: Answer | str) -> None:
        self.waiting = None
        self._mine = None
        self._dropped_before_start = False
        self.stopping = False
        self._done_send.send_nowait(result)

    # -- what the prompt asks ------------------------------------------------------------------
    async def ask(self, content: str) -> Answer | str:
        """Send ``content`` and wait for its answer to end: the :class:`Answer`, or the
        server's error message if it refused the message. Cancellation: the run goes on
        (a client leaving is never a stop)."""
        self.waiting = content
        self._mine = None
        # enqueue: if another client's run is active, ours starts right after it.
        await self._send({"type": "message", "content": content, "if_running": "enqueue"})
        return await self._done_recv.receive()

    async def stop(self) -> None:
        """Stop the run being answered: over the WebSocket, or over HTTP while it is down."""
        self.stopping = True
        if self._ws is not None:
            await self._send({"type": "stop"})
            return
        try:
            await self.http.post(f"/sessions/{quote(self.session_id, safe='')}/stop")
        except httpx.HTTPError as exc:
            self.printer.problem(f"[could not stop: {exc}]")


async def _converse(chat: Chat, stdin: TextIO, interactive: bool) -> int:
    """Each line a message, each answer awaited. Exit code at the end of input: 0, or in
    non-terminal mode 1 if an answer ended in error."""
    failed = False
    while True:
        if interactive:
            chat.printer.prompt("> ")
        line = await trio.to_thread.run_sync(stdin.readline, abandon_on_cancel=True)
        if not line:
            if interactive:
                chat.printer.prompt("\n")
            return 1 if failed and not interactive else 0
        content = line.rstrip("\r\n")
        if not content.strip():
            continue
        result = await chat.ask(content)
        if isinstance(result, str):
            chat.printer.problem(f"[error: {result}]")
            failed = True
        elif result.status == "error":
            failed = True


async def _watch_interrupts(chat: Chat, nursery: trio.Nursery, exit_code: list[int]) -> None:
    """Ctrl-C during an answer stops the run; at the prompt (or twice) it ends the client."""
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            if chat.waiting is not None and not chat.stopping:
                nursery.start_soon(chat.stop)
                continue
            exit_code[0] = EXIT_INTERRUPTED if chat.waiting is not None else 0
            if chat.waiting is None:
                chat.printer.prompt("\n")
            nursery.cancel_scope.cancel(reason="Ctrl-C")
            return


async def run_chat(
    url: str, session_id: str | None, token: str | None, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    """``navi-trio chat``: the whole client. Returns the exit code; raises :class:`ChatError`."""
    endpoint = Endpoint.parse(url)
    printer = Printer(stdout, stderr)
    interactive = stdin.isatty()
    async with httpx.AsyncClient(
        base_url=endpoint.http_base, headers=_auth_headers(token), timeout=30, trust_env=False
    ) as http:
        try:
            sid = await open_session(http, session_id)
        except httpx.HTTPError as exc:
            raise ChatError(f"cannot reach the server at {endpoint.http_base}: {exc}") from None
        printer.note(f"session {sid}")
        chat = Chat(endpoint, http, sid, token, printer)
        exit_code = [0]
        async with trio.open_nursery() as nursery:
            await nursery.start(chat.serve)
            nursery.start_soon(_watch_interrupts, chat, nursery, exit_code)
            exit_code[0] = await _converse(chat, stdin, interactive)
            nursery.cancel_scope.cancel(reason="end of input")
        return exit_code[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``navi-trio chat`` (each with its environment variable)."""
    parser.add_argument("--url", help=f"the server (NAVI_URL, default {DEFAULT_URL})")
    parser.add_argument("--session", help="a session to continue (default: a new one)")
    parser.add_argument("--token", help="your token, if the server needs one (NAVI_TOKEN)")


def main(args: argparse.Namespace) -> int:
    """Run the client in its own trio run; a :class:`ChatError` is one line and exit 1."""
    code = 1
    try:
        return trio.run(
            run_chat,
            args.url or os.environ.get("NAVI_URL") or DEFAULT_URL,
            args.session,
            args.token or os.environ.get("NAVI_TOKEN") or None,
            sys.stdin,
            sys.stdout,
            sys.stderr,
        )
    except* ChatError as group:
        print(f"navi-trio chat: {group.exceptions[0]}", file=sys.stderr)
    except* KeyboardInterrupt:  # Ctrl-C before the client could listen for it
        code = EXIT_INTERRUPTED
    return code

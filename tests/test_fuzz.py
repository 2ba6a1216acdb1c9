"""Property-based tests (hypothesis) against one live server per test.

Each test starts one in-process server (and, for the WebSocket, one connection), then
runs the hypothesis examples inside it: the ``@given`` function runs in a worker thread
(``trio.to_thread``) and drives the server on the test's own trio loop with
``trio.from_thread.run``. So every example meets the same server and the SAME connection,
which is the point: a bad message must leave them usable.

WebSocket: every bad message gets exactly one ``error`` (no run starts), and the same
connection then runs a valid message to ``stream_end``. HTTP: never a 500, never a stack
trace; every refusal is JSON ``{"detail": str}``.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from trio_websocket import wrap_client_stream

from .helpers import Client, Server, open_server, script

# Hypothesis keeps caches in ./.hypothesis even without an example database: keep them
# out of the source tree.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "navi-trio-hypothesis"))

EXPECTED: Final = "Expected {type: 'message', content: '...'}"
INVALID_JSON: Final = "Invalid JSON"
IF_RUNNING: Final = ("reject", "interrupt", "enqueue")
MAX_CHARS: Final = 100_000
MB: Final = 1024 * 1024
ALLOWED_HTTP: Final = {200, 201, 204, 400, 401, 403, 404, 405, 409, 413, 422}


def fuzz_settings(max_examples: int) -> settings:
    """No example database (nothing written into the tree), no deadline (real I/O), and
    no shrinking: a failing example on a shared connection is reported as found."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
        print_blob=False,
    )


def on_trio(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """From the hypothesis thread: run ``fn`` on the test's trio loop and return its result."""
    return trio.from_thread.run(partial(fn, *args, **kwargs))


async def drive(prop: Callable[[], None]) -> None:
    """Run a ``@given`` test (sync) in a worker thread; it calls back with :func:`on_trio`."""
    await trio.to_thread.run_sync(prop)


# -- strategies ----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
#: Unicode beyond the BMP, combining marks, RTL, zero-width, private use, escapes-to-be.
odd_text = st.text(
    alphabet=st.characters(codec="utf-8")
    | st.sampled_from(["\u202e", "\u200b", "\ufeff", "\U0001f600", "\u0301", "\ue000", '"', "\\", "\x00", "\n"]),
    max_size=40,
)
#: Strings of 100 001 characters to 1 MiB, drawn as (piece, count) and built in the test
#: (hypothesis would otherwise print megabytes of argument repr).
huge_specs = st.tuples(st.sampled_from(["a", "é", "\U0001f600", " x", "\x00"]), st.sampled_from([MAX_CHARS + 1, MB]))


def huge(spec: tuple[str, int]) -> str:
    piece, count = spec
    return piece * count


def is_valid_images(v: Any) -> bool:
    return v is None or (isinstance(v, list) and len(v) <= 8 and all(isinstance(i, str) for i in v))


# -- the WebSocket -------------------------------------------------------------------------


@attrs.define(eq=False)
class WsProbe:
    """Sends one bad frame, then a valid message, on one connection; checks the answers.

    After a failed example (the server got something wrong) the probe waits for the
    session to be idle and reconnects, so that the next examples test something again;
    the test fails anyway.
    """

    server: Server
    sid: str
    #: Owned by the test's task, so that any task may (re)connect (trio-websocket's
    #: reader runs in it).
    nursery: trio.Nursery
    c: Client | None = None
    stream: trio.SocketStream | None = None
    valid_runs: int = 0
    failures: int = 0

    async def connect(self) -> None:
        await self.close()
        with trio.fail_after(10):
            while self.server.registry.active(self.sid) is not None:
                self.server.registry.stop(self.sid)
                await trio.sleep(0.01)
            host, port = self.server.host, self.server.port
            self.stream = await trio.open_tcp_stream(host, port)
            # room for an error that quotes a 1 MiB file name back (repr-escaped)
            ws = await wrap_client_stream(
                self.nursery, self.stream, host, f"/ws/sessions/{self.sid}", max_message_size=16 * MB
            )
            self.c = Client(ws)
            assert await self.c.recv() == {"type": "session_sync"}

    async def close(self) -> None:
        if self.c is not None:
            with trio.move_on_after(2):
                await self.c.ws.aclose()
            self.c = None
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None

    @property
    def client(self) -> Client:
        assert self.c is not None
        return self.c

    async def refused(self, frame: str | bytes, expected: str | Callable[[str], bool] | None = None) -> str:
        """``frame`` gets exactly one ``error`` (whose message is ``expected``), starts no
        run, and the connection then runs a valid message. Returns the error message."""
        try:
            return await self._refused(frame, expected)
        except BaseException:
            self.failures += 1
            with trio.CancelScope(shield=True):
                await self.connect()
            raise

    async def _refused(self, frame: str | bytes, expected: str | Callable[[str], bool] | None) -> str:
        with trio.fail_after(10):
            await self.client.ws.send_message(frame)
            await self.client.send_message(script({"text": "ok"}))
            got = await self._until_stream_end()
        self.valid_runs += 1
        shown = frame if len(frame) < 300 else frame[:300]
        assert got[0]["type"] == "error", (shown, got[:4])
        assert set(got[0]) == {"type", "message"}, got[0]
        message: str = got[0]["message"]
        assert isinstance(message, str) and message
        assert [e["type"] for e in got[1:]] == ["stream_start", "stream_delta", "stream_end"], (shown, got)
        assert got[-1]["content"] == "ok"
        if isinstance(expected, str):
            assert message == expected, (shown, message)
        elif expected is not None:
            assert expected(message), (shown, message)
        return message

    async def accepted(self, frame: str, content: str) -> None:
        """``frame`` is a valid message: it runs the demo answer to ``stream_end``."""
        try:
            with trio.fail_after(15):
                await self.client.ws.send_message(frame)
                got = await self._until_stream_end()
            self.valid_runs += 1
            assert got[0]["type"] == "stream_start", got[:3]
            assert [e for e in got if e["type"] == "error"] == [], got
            assert got[-1]["content"] == content.lstrip(), (content, got[-1])
        except BaseException:
            self.failures += 1
            with trio.CancelScope(shield=True):
                await self.connect()
            raise

    async def _until_stream_end(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] not in ("stream_end", "stream_stopped"):
            event = await self.client.recv()
            if event["type"] != "heartbeat":
                got.append(event)
        return got

    async def finish(self) -> None:
        """The server is still up, and exactly the valid messages became runs."""
        with trio.fail_after(10):
            assert (await self.server.http.get("/healthz")).status_code == 200
            await self.refused("not json at the end", INVALID_JSON)
            r = await self.server.http.get(f"/sessions/{self.sid}/messages")
        assert r.status_code == 200
        roles = [m["role"] for m in r.json()]
        if not self.failures:
            assert roles.count("user") == self.valid_runs, (roles.count("user"), self.valid_runs)


async def with_probe(run: Callable[[WsProbe], Any], tmp_path: Path, bound: float = 60) -> None:
    """One server, one session, one connection for all the examples of ``run``."""
    with trio.fail_after(bound):
        async with open_server(data_dir=tmp_path) as server, trio.open_nursery() as nursery:
            probe = WsProbe(server, await server.new_session(), nursery)
            try:
                await probe.connect()
                await run(probe)
                await probe.finish()
            finally:
                with trio.CancelScope(shield=True):
                    await probe.close()


async def test_ws_random_json_values_are_not_messages(tmp_path: Path) -> None:
    @fuzz_settings(150)
    @given(value=json_values)
    @example(value={"type": "Message", "content": "hi"})
    @example(value={"type": ["message"], "content": "hi"})
    @example(value=[{"type": "message", "content": "hi"}])
    @example(value="message")
    def prop(probe: WsProbe, value: Any) -> None:
        assume(not (isinstance(value, dict) and value.get("type") in ("message", "stop")))
        on_trio(probe.refused, json.dumps(value), EXPECTED)

    await with_probe(lambda probe: drive(partial(prop, probe)), tmp_path)


wrong_type = json_values.filter(lambda v: v not in ("message", "stop"))
wrong_content = json_values.filter(lambda v: not isinstance(v, str)) | st.just("")
wrong_images = json_values.filter(lambda v: not is_valid_images(v)) | st.lists(st.just("aGk="), min_size=9, max_size=20)
#: Falsy wrong types (0, "", {}, false) are tested on their own below.
wrong_files = json_values.filter(bool)
wrong_if_running = json_values.filter(lambda v: v is not None and v not in IF_RUNNING) | odd_text.filter(
    lambda s: s not in IF_RUNNING
)


def _expected_for(field: str, value: Any) -> str | Callable[[str], bool] | None:
    if field in ("type", "content"):
        return EXPECTED
    if field == "images" and isinstance(value, list) and len(value) > 8 and all(isinstance(i, str) for i in value):
        return f"Too many images ({len(value)}). Max 8 allowed."
    if field == "if_running":
        return lambda m: "if_running" in m
    return None  # an error of its own choosing


async def test_ws_wrong_types_for_every_field(tmp_path: Path) -> None:
    @fuzz_settings(250)
    @given(
        field_value=st.one_of(
            st.tuples(st.just("type"), wrong_type),
            st.tuples(st.just("content"), wrong_content),
            st.tuples(st.just("images"), wrong_images),
            st.tuples(st.just("files"), wrong_files),
            st.tuples(st.just("if_running"), wrong_if_running),
        )
    )
    @example(field_value=("files", [1]))
    @example(field_value=("files", {"name": "x"}))
    @example(field_value=("images", False))
    @example(field_value=("images", {}))
    @example(field_value=("images", [None]))
    @example(field_value=("if_running", ""))
    @example(field_value=("if_running", False))
    @example(field_value=("if_running", "REJECT"))
    @example(field_value=("content", ["hi"]))
    @example(field_value=("type", None))
    def prop(probe: WsProbe, field_value: tuple[str, Any]) -> None:
        field, value = field_value
        msg = {"type": "message", "content": "hello there", field: value}
        on_trio(probe.refused, json.dumps(msg), _expected_for(field, value))

    await with_probe(lambda probe: drive(partial(prop, probe)), tmp_path)


async def test_ws_falsy_files_of_a_wrong_type_are_refused(tmp_path: Path) -> None:
    """``files`` is a list of {name, path}: ``0``, ``""``, ``{}`` or ``false`` is a wrong
    type like any other (only null and [] mean "no files")."""

    async def run(probe: WsProbe) -> None:
        failed = []
        for value in (0, 0.0, "", {}, False):
            try:
                await probe.refused(json.dumps({"type": "message", "content": "hello there", "files": value}))
            except AssertionError:
                failed.append(value)
        assert failed == [], f"files={failed!r} were not refused"

    await with_probe(run, tmp_path)


async def test_ws_huge_and_odd_strings(tmp_path: Path) -> None:
    @fuzz_settings(60)
    @given(data=st.data())
    def refused(probe: WsProbe, data: st.DataObject) -> None:
        kinds = ["long-content", "huge-type", "odd-type", "surrogate", "huge-not-json", "huge-file-name"]
        kind = data.draw(st.sampled_from(kinds))
        if kind == "long-content":
            content = huge(data.draw(huge_specs))
            n = len(content)
            expected = f"Message too long ({n} characters). Max {MAX_CHARS} allowed."
            on_trio(probe.refused, json.dumps({"type": "message", "content": content}), expected)
        elif kind == "huge-type":
            on_trio(probe.refused, json.dumps({"type": huge(data.draw(huge_specs)), "content": "x"}), EXPECTED)
        elif kind == "odd-type":
            value = data.draw(odd_text.filter(lambda s: s not in ("message", "stop")))
            on_trio(probe.refused, json.dumps({"type": value, "content": "x"}), EXPECTED)
        elif kind == "surrogate":
            # a lone surrogate, escaped in JSON text (ensure_ascii writes \\udXXX)
            lone = data.draw(st.integers(min_value=0xD800, max_value=0xDFFF).map(chr))
            field = data.draw(st.sampled_from(["content", "type", "if_running", "images", "files"]))
            inner: Any = {"content": f"a{lone}b"}
            if field != "content":
                inner[field] = f"{lone}" if field != "files" else [{"name": lone, "path": lone}]
                inner["content"] = "hello"
            frame = json.dumps({"type": "message", **inner})
            assert "\\ud" in frame
            on_trio(probe.refused, frame, INVALID_JSON)
        elif kind == "huge-file-name":
            name = huge(data.draw(huge_specs))
            frame = json.dumps({"type": "message", "content": "x", "files": [{"name": name, "path": None}]})
            on_trio(probe.refused, frame)
        else:
            on_trio(probe.refused, "{" + huge(data.draw(huge_specs)), INVALID_JSON)

    @fuzz_settings(25)
    @given(content=odd_text.filter(lambda s: s.strip() and len(s.split()) <= 12))
    @example(content="\U0001f600 \u202eevil\u202c \x00 \ufeff")
    @example(content='{"script": "not a list"}')
    def accepted(probe: WsProbe, content: str) -> None:
        on_trio(probe.accepted, json.dumps({"type": "message", "content": content}), content)

    async def run(probe: WsProbe) -> None:
        await drive(partial(refused, probe))
        await drive(partial(accepted, probe))

    await with_probe(run, tmp_path, bound=90)


#: Not base64, however lenient the decoder: characters outside every alphabet, bad
#: padding, a length no base64 text can have.
bad_base64 = st.one_of(
    st.text(alphabet=st.sampled_from("!@#$%^&*()<>?~` ;:"), min_size=1, max_size=30),
    st.sampled_from(["a", "abcde", "====", "a===", "aGk=aGk", "%%%", "aGk=\u00e9", "data:", "data:image/png;base64"]),
    st.builds(lambda s: "data:image/png;base64," + s, st.sampled_from(["!!!", "a", "====", "<script>", "aGk=aGk"])),
    st.builds(lambda s: "data:image/png;base64" + s, st.sampled_from(["", "aGk=", ";aGk="])),  # no comma
)


async def test_ws_bad_base64_and_data_urls_are_refused(tmp_path: Path) -> None:
    @fuzz_settings(60)
    @given(bad=bad_base64, good=st.lists(st.sampled_from(["aGk=", "data:image/png;base64,aGk="]), max_size=3))
    @example(bad="not base64!", good=[])
    @example(bad="data:image/png;base64,@@@@", good=["aGk="])
    def prop(probe: WsProbe, bad: str, good: list[str]) -> None:
        msg = {"type": "message", "content": "look", "images": [*good, bad]}
        on_trio(probe.refused, json.dumps(msg))

    await with_probe(lambda probe: drive(partial(prop, probe)), tmp_path)


hostile_names = st.one_of(
    st.text(max_size=40),
    odd_text,
    st.sampled_from(
        [
            "../real.txt",
            "./real.txt",
            "real.txt/",
            "real.txt\x00",
            "/etc/passwd",
            "..",
            ".",
            "",
            "real.txt ",
            " real.txt",
            "REAL.TXT",
            "real.txt/.",
            "uploads/real.txt",
            "..\\real.txt",
            "~/real.txt",
            "%2e%2e%2freal.txt",
            "real.txt\n",
        ]
    ),
    st.builds(lambda n: "x" * n, st.sampled_from([255, 256, 4096])),
)
hostile_paths = st.one_of(
    st.none(), st.text(max_size=40), json_values, st.sampled_from(["/etc/passwd", "uploads/", "uploads/../real.txt"])
)


async def test_ws_hostile_file_names(tmp_path: Path) -> None:
    async def run(probe: WsProbe) -> None:
        r = await probe.server.http.post(f"/sessions/{probe.sid}/files", params={"name": "real.txt"}, content=b"r")
        assert r.status_code == 201, r.text
        real_path = r.json()["path"]

        @fuzz_settings(150)
        @given(
            name=hostile_names | json_values.filter(lambda v: not isinstance(v, str)),
            path=hostile_paths,
            first_real=st.booleans(),
        )
        @example(name="real.txt", path="uploads/other/real.txt", first_real=False)
        @example(name="real.txt", path=f"/{real_path}", first_real=True)
        @example(name=None, path=None, first_real=False)
        def prop(name: Any, path: Any, first_real: bool) -> None:
            assume(not (name == "real.txt" and path in (None, real_path)))
            files = [{"name": name, "path": path}]
            if first_real:
                files.insert(0, {"name": "real.txt", "path": real_path})

            def names_it(message: str) -> bool:
                if not isinstance(name, str):
                    return True  # a non-string name cannot be named verbatim
                return name in message or repr(name) in message

            on_trio(probe.refused, json.dumps({"type": "message", "content": "read", "files": files}), names_it)

        await drive(prop)

    await with_probe(run, tmp_path)


def _is_json(raw: str | bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


valid_frame = json.dumps({"type": "message", "content": "hi", "images": ["aGk="], "if_running": "reject"})


async def test_ws_non_json_text_and_binary_frames(tmp_path: Path) -> None:
    @fuzz_settings(200)
    @given(
        frame=st.one_of(
            st.text(max_size=60).filter(lambda s: not _is_json(s)),
            odd_text.filter(lambda s: not _is_json(s)),
            st.integers(min_value=0, max_value=len(valid_frame) - 1).map(lambda i: valid_frame[:i]),
            st.binary(max_size=60).filter(lambda b: not _is_json(b)),
            st.binary(min_size=1, max_size=60).map(lambda b: b"\xff" + b),  # never UTF-8
            st.sampled_from([b"", "", " ", "\n", "NaN", "Infinity", "{'type': 'message'}", '{"type":"message",}']),
        )
    )
    @example(frame=b'{"type": "message", "content": "hi\xff"}')
    @example(frame="[1, 2,]")
    @example(frame='{"type": "message", "content": "x"} trailing')
    def prop(probe: WsProbe, frame: str | bytes) -> None:
        on_trio(probe.refused, frame, INVALID_JSON)

    await with_probe(lambda probe: drive(partial(prop, probe)), tmp_path)


# -- HTTP ----------------------------------------------------------------------------------


def assert_clean_answer(r: httpx.Response) -> None:
    """Never a 500, never a stack trace; an error is JSON ``{"detail": str}``."""
    assert r.status_code in ALLOWED_HTTP, (r.status_code, r.text[:500])
    assert "Traceback" not in r.text and 'File "' not in r.text
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body, dict) and set(body) == {"detail"}, body
        assert isinstance(body["detail"], str) and body["detail"]


query_params = st.dictionaries(st.text(max_size=10), st.text(max_size=20) | odd_text, max_size=4)
titles = st.one_of(st.none(), st.text(max_size=30), odd_text, json_values)


def _expected_create(body: Any) -> int:
    if not isinstance(body, dict):
        return 422
    title = body.get("title")
    if title is None:
        return 201
    if not isinstance(title, str) or len(title) > 500:
        return 422
    return 201


async def test_http_create_session_bodies_and_queries(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_server(data_dir=tmp_path) as server:

            @fuzz_settings(250)
            @given(
                body=st.one_of(
                    json_values,
                    st.fixed_dictionaries({"title": titles}, optional={"extra": json_values}),
                ),
                params=query_params,
                long_title=st.sampled_from([None, None, None, 500, 501, MAX_CHARS + 1, MB // 2]),
            )
            @example(body={}, params={}, long_title=500)
            @example(body={}, params={}, long_title=501)
            @example(body={"title": 5}, params={"title": "from the query"}, long_title=None)
            def json_bodies(body: Any, params: dict[str, str], long_title: int | None) -> None:
                if long_title is not None:
                    body = {"title": "t" * long_title}
                raw = json.dumps(body).encode()
                r = on_trio(server.http.post, "/sessions", content=raw, params=params)
                assert_clean_answer(r)
                assert r.status_code == _expected_create(body), (body if len(raw) < 300 else "...", r.text)
                if r.status_code == 201:
                    got = r.json()
                    assert set(got) == {"id", "title", "user_id", "created_at"}
                    title = body.get("title")
                    assert got["title"] == ("New session" if title is None else title)
                    assert got["user_id"] is None

            @fuzz_settings(150)
            @given(
                raw=st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode)),
                content_type=st.sampled_from([None, "application/json", "text/plain", "multipart/form-data"]),
            )
            @example(raw=b'{"title": "\\ud800"}', content_type="application/json")
            @example(raw=b"\xff\xfe{}", content_type=None)
            @example(raw=b'{"title": 1e400}', content_type=None)
            @example(raw=b"[" * 10000 + b"]" * 10000, content_type=None)
            def raw_bodies(raw: bytes, content_type: str | None) -> None:
                headers = {} if content_type is None else {"content-type": content_type}
                r = on_trio(server.http.post, "/sessions", content=raw, headers=headers)
                assert_clean_answer(r)
                assert r.status_code in (201, 400, 422), (raw, r.status_code, r.text)
                if r.status_code == 201:
                    assert not raw.strip() or isinstance(json.loads(raw), dict), raw

            await drive(json_bodies)
            await drive(raw_bodies)
            assert (await server.http.get("/healthz")).status_code == 200


def _obviously_bad(name: str) -> bool:
    return name in ("", ".", "..") or any(ch in name for ch in "/\\\x00") or name.startswith(".")


async def test_http_upload_names_bodies_and_queries(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(60):
        async with open_server(data_dir=data) as server:
            sid = await server.new_session()
            accepted: dict[str, bytes] = {}

            @fuzz_settings(200)
            @given(name=hostile_names.filter(lambda n: len(n) < 5000), body=st.binary(max_size=300), extra=query_params)
            @example(name="../../../../tmp/escape.txt", body=b"x", extra={})
            @example(name="notes.txt", body=b"", extra={"name2": "../x"})
            @example(name="ok.txt", body=b"x", extra={"": ""})
            def prop(name: str, body: bytes, extra: dict[str, str]) -> None:
                params = {**extra, "name": name}
                r = on_trio(server.http.post, f"/sessions/{sid}/files", params=params, content=body)
                assert_clean_answer(r)
                assert r.status_code in (201, 422), (name, r.status_code, r.text)
                if r.status_code == 201:
                    assert not _obviously_bad(name), name
                    assert r.json() == {"name": name, "path": f"uploads/{sid}/{name}"}
                    accepted[name] = body
                else:
                    assert name not in accepted or _obviously_bad(name)

            await drive(prop)
            # everything accepted sits, as a plain file, directly in this session's folder
            folders = [p for p in (data / "uploads").rglob(sid) if p.is_dir()] if accepted else []
            for name in accepted:
                assert len(folders) == 1
                stored = folders[0] / name
                assert stored.is_file() and not stored.is_symlink()
                assert stored.resolve().parent == folders[0].resolve()
            entries = [p for p in data.rglob("*") if not p.is_dir()]
            assert all(folders and p.parent == folders[0] for p in entries), entries
            assert len(entries) == len(accepted)
            for p in entries:
                assert p.read_bytes() == accepted[p.name]


path_segment = st.text(alphabet=string.ascii_letters + string.digits + "-_.%~!$&'()*+,;=:@", min_size=1, max_size=70)


async def test_http_random_routes_methods_and_queries(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_server(data_dir=tmp_path) as server:
            sid = await server.new_session()

            @fuzz_settings(200)
            @given(
                method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]),
                parts=st.lists(
                    st.sampled_from(["sessions", "files", "stop", "messages", ".."]) | path_segment, max_size=4
                ),
                params=query_params,
                body=st.binary(max_size=40),
            )
            @example(method="GET", parts=["sessions", "..", "healthz"], params={}, body=b"")
            @example(method="POST", parts=["sessions", "x" * 65, "stop"], params={}, body=b"")
            @example(method="GET", parts=["sessions", "%2e%2e", "messages"], params={}, body=b"")
            def prop(method: str, parts: list[str], params: dict[str, str], body: bytes) -> None:
                path = "/" + "/".join(parts)
                assume(sid not in path)
                kwargs: dict[str, Any] = {"params": params}
                if method in ("POST", "PUT", "PATCH"):
                    kwargs["content"] = body
                r = on_trio(server.http.request, method, path, **kwargs)
                assert_clean_answer(r)

            await drive(prop)
            r = await server.http.get(f"/sessions/{sid}")
            assert r.status_code == 200  # the fuzzing touched nothing it was not pointed at


async def raw_http(server: Server, head: bytes, chunks: list[bytes]) -> bytes:
    """Send a raw HTTP/1.1 request (the body possibly still going when the server answers);
    return the response head and body."""
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream, trio.open_nursery() as nursery:

        async def sender() -> None:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(head)
                for chunk in chunks:
                    await stream.send_all(chunk)

        nursery.start_soon(sender)
        reply = b""
        with suppress(trio.BrokenResourceError):
            while True:
                data = await stream.receive_some()
                if not data:
                    break
                reply += data
                top, sep, body = reply.partition(b"\r\n\r\n")
                if sep:
                    length = [line for line in top.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                    if length and len(body) >= int(length[0].split(b":")[1]):
                        break
        nursery.cancel_scope.cancel()
    return reply


async def test_http_bodies_over_a_mebibyte_are_413_never_500(tmp_path: Path) -> None:
    """A 1 MiB title (the JSON body is over the 1 MiB limit): 413, with and without a
    Content-Length; the server stays up."""
    with trio.fail_after(20):
        async with open_server(data_dir=tmp_path) as server:
            body = json.dumps({"title": "t" * MB}).encode()
            head = f"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            reply = await raw_http(server, head, [body])
            assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
            detail = json.loads(reply.partition(b"\r\n\r\n")[2])
            assert set(detail) == {"detail"} and isinstance(detail["detail"], str)

            head = b"POST /sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            step = 64 * 1024
            chunks = [
                b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step]) for i in range(0, len(body), step)
            ]
            reply = await raw_http(server, head, [*chunks, b"0\r\n\r\n"])
            assert reply.startswith(b"HTTP/1.1 413"), reply[:300]

            assert (await server.http.get("/healthz")).status_code == 200
            assert (await server.http.post("/sessions", json={"title": "t" * 500})).status_code == 201

"""Large client frames (issue 10, defect 4): read in steps, answered as before.

``frame_json.loads`` must give what ``orjson.loads`` gives, for any frame, and
``base64_check.is_base64`` what ``a2b_base64(strict_mode=True)`` accepts; both must let
other tasks run while they work on a large frame (counted in checkpoints, not timed: the
latency figure is bench/large_images.py's). Through a real server, a large image message
still starts its run, and bad base64, a bad ``data:`` URL, too many images and bad JSON
get their contract answers.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import trio
from hypothesis import example, given
from hypothesis import strategies as st

from navi_trio import frame_json
from navi_trio.base64_check import is_base64

from .helpers import Server, run_events

LONG = frame_json.LONG_STRING
B64 = base64.b64encode(os.urandom(3 * 200_000)).decode()  # 800,000 characters


def frame(**fields: Any) -> str:
    return json.dumps({"type": "message", "content": "look", **fields})


async def same_as_orjson(text: str) -> Any:
    """``frame_json.loads(text)``, checked against ``orjson.loads(text)`` (value or error)."""
    try:
        expected = orjson.loads(text)
    except orjson.JSONDecodeError:
        with pytest.raises(orjson.JSONDecodeError):
            await frame_json.loads(text)
        return None
    got = await frame_json.loads(text)
    assert got == expected
    return got


# -- frame_json.loads == orjson.loads -------------------------------------------------------

LARGE_FRAMES = {
    "images": frame(images=[B64, B64[:LONG], "aGk=", "data:image/png;base64," + B64]),
    "long content and files": frame(content="x" * 90_000, images=[B64], files=[{"name": "a.txt", "path": "p"}]),
    "short escapes around": json.dumps({"type": "message", "content": 'a "quoted"\n\\ line', "images": [B64] * 2}),
    "a long key": json.dumps({"type": "message", "content": "k", B64: 1, "images": [B64]}),
    "deep": json.dumps({"type": "message", "content": "d", "x": [[[[{"y": [B64]}]]]]}),
    "a long literal with escapes": json.dumps({"type": "message", "content": "e", "images": [B64]}).replace("/", "\\/"),
    "a large skeleton": json.dumps({"type": "message", "content": "n", "n": list(range(200_000)), "i": [B64]}),
    "a string that looks like a placeholder": frame(content="\x00navi-long-string:0000:0", images=[B64]),
    "no string at all": json.dumps(list(range(100_000))),
    "not a message": json.dumps([B64, B64]),
    "one long string": json.dumps(B64),
    "non-ASCII": frame(content="é" * 100_000, images=[B64]),
}
BAD_LARGE_FRAMES = {
    "not JSON": "x" * 600_000,
    "unterminated long string": '{"type": "message", "content": "' + B64,
    "a control character in a long string": frame(images=[B64[:400_000] + "\n" + B64[400_000:]]).replace("\\n", "\n"),
    "trailing garbage": frame(images=[B64]) + "}",
    "a bad escape in a long string": frame(images=[B64 + "\\q"]).replace("\\\\q", "\\q"),
    "a lone surrogate escape": frame(content="\\ud800", images=[B64]).replace("\\\\ud800", "\\ud800"),
    "missing comma": frame(images=[B64]).replace(", ", " "),
}


@pytest.mark.parametrize("text", LARGE_FRAMES.values(), ids=LARGE_FRAMES.keys())
async def test_large_frames_parse_as_orjson_parses_them(text: str) -> None:
    assert len(text) > frame_json.LARGE_FRAME
    assert await same_as_orjson(text) is not None


@pytest.mark.parametrize("text", BAD_LARGE_FRAMES.values(), ids=BAD_LARGE_FRAMES.keys())
async def test_bad_large_frames_are_refused_as_orjson_refuses_them(text: str) -> None:
    assert len(text) > frame_json.LARGE_FRAME
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)
    with pytest.raises(orjson.JSONDecodeError):
        await frame_json.loads(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(codec="utf-8", max_codepoint=0x2FF)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@given(value=json_values, padding=st.sampled_from(["", " ", "\n"]))
async def test_any_json_value_in_a_large_frame_parses_as_orjson_parses_it(value: Any, padding: str) -> None:
    text = json.dumps({"v": value, "pad": B64[: frame_json.LARGE_FRAME]}, ensure_ascii=False, separators=(",", ":"))
    assert await same_as_orjson(padding + text) is not None


async def test_images_checked_later_skip_only_the_images_control_check() -> None:
    """The caller's base64 check refuses what the skipped check would have."""
    control_in_image = frame(images=[B64 + "\u0001"]).replace("\\u0001", "\u0001")
    got = await frame_json.loads(control_in_image, images_checked_later=True)
    assert got["images"] == [B64 + "\u0001"]
    assert not await is_base64(got["images"][0])
    control_in_content = json.dumps({"type": "message", "content": B64 + "\u0001", "images": []})
    control_in_content = control_in_content.replace("\\u0001", "\u0001")
    with pytest.raises(orjson.JSONDecodeError):
        await frame_json.loads(control_in_content, images_checked_later=True)
    nested = json.dumps({"type": "message", "content": "c", "images": [], "x": {"images": [B64 + "\u0001"]}})
    with pytest.raises(orjson.JSONDecodeError):
        await frame_json.loads(nested.replace("\\u0001", "\u0001"), images_checked_later=True)


async def count_checkpoints(work: Callable[[], Awaitable[Any]]) -> int:
    """How many times another task got to run while ``work`` ran."""
    steps = 0
    done = False

    async def other() -> None:
        nonlocal steps
        while not done:
            await trio.lowlevel.checkpoint()
            steps += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # its first step comes at work's first checkpoint
        await work()
        done = True
    return steps


async def test_a_large_frame_is_parsed_in_steps() -> None:
    text = frame(images=[B64] * 8)  # 6.4 MB, 25 chunks of each of the two checks
    steps = await count_checkpoints(lambda: frame_json.loads(text))
    # A chunk per step: the control check of each image, and its cut, and its restore.
    assert steps >= 8 * len(B64) // frame_json.CHUNK


async def test_small_frames_are_one_call() -> None:
    assert await count_checkpoints(lambda: frame_json.loads(frame(images=["aGk="]))) == 0


# -- is_base64 == a2b_base64(strict_mode=True) ---------------------------------------------


def strict_ok(text: str) -> bool:
    """``a2b_base64(strict_mode=True)`` accepts it, and its padding is RFC 4648's: CPython
    also takes padding after a complete group (``"AAAA="``), which base64 is not."""
    try:
        binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return False
    return len(text) % 4 == 0 and len(text) - len(text.rstrip("=")) <= 2


@example(text="0000=")
@example(text="0000====")
@given(text=st.text(alphabet="AZaz09+/=\n é-_", max_size=14))
async def test_base64_check_agrees_with_strict_a2b(text: str) -> None:
    assert await is_base64(text) == strict_ok(text)
    head = "data:image/png;base64,"
    assert await is_base64(head + text, len(head)) == strict_ok(text)


@pytest.mark.parametrize("where", [0, len(B64) // 2, len(B64) - 5])
@pytest.mark.parametrize("bad", ["!", "=", "\n", "é", "-"])
async def test_one_bad_character_anywhere_in_a_long_image_is_found(where: int, bad: str) -> None:
    text = B64[:where] + bad + B64[where + 1 :]
    assert not strict_ok(text)
    assert not await is_base64(text)


async def test_long_base64_is_checked_in_steps() -> None:
    assert strict_ok(B64)
    steps = await count_checkpoints(lambda: is_base64(B64))
    assert steps >= len(B64) // 256 // 1024  # a chunk per step


# -- through the server: the contract's answers ---------------------------------------------


async def answer_to(server: Server, text: str) -> dict[str, Any]:
    """The first answer to ``text`` on a fresh session's connection."""
    sid = await server.new_session()
    async with server.connect(sid) as c:
        assert (await c.recv())["type"] == "session_sync"
        await c.ws.send_message(text)
        return await c.recv()


async def test_a_large_image_message_starts_its_run(server: Server) -> None:
    with trio.fail_after(20):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            await c.ws.send_message(frame(images=[B64, "data:image/jpeg;base64," + B64, "aGk="]))
            got = await c.until_terminal()
        evs = run_events(got)
        assert evs[0]["type"] == "stream_start" and evs[-1]["type"] == "stream_end", got
        assert "3 images attached" in evs[-1]["content"]


BAD_IMAGE_ANSWERS = {
    "bad base64": (frame(images=[B64, B64, B64[:-1] + "!"]), "Image 3 is not valid base64."),
    "bad padding": (frame(images=[B64 + "="]), "Image 1 is not valid base64."),
    "a data: URL that is not base64": (
        frame(images=["aGk=", "data:image/png," + B64]),
        "Image 2 is not a base64 data: URL.",
    ),
    "too many images": (frame(images=[B64] + ["aGk="] * 8), "Too many images (9). Max 8 allowed."),
    "a control character in an image": (
        frame(images=["aGk=", B64[:1000] + "\u0000" + B64[1000:]]).replace("\\u0000", "\u0000"),
        "Image 2 is not valid base64.",
    ),
    "not JSON": ("{" + B64, "Invalid JSON"),
    "not a message": (json.dumps({"type": "massage", "content": "x", "images": [B64]}), None),
}


@pytest.mark.parametrize(("text", "message"), BAD_IMAGE_ANSWERS.values(), ids=BAD_IMAGE_ANSWERS.keys())
async def test_large_bad_messages_get_their_answers(server: Server, text: str, message: str | None) -> None:
    with trio.fail_after(20):
        got = await answer_to(server, text)
    expected = message if message is not None else "Expected {type: 'message', content: '...'}"
    assert got == {"type": "error", "message": expected}
    assert server.registry.runs == []

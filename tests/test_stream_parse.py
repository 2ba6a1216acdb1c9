"""Sans-IO parsing of a streamed chat completion: SSE lines, inline <think> tags, tool
call fragments and chunks (navi_trio.agents.stream_parse). No trio, no sockets."""

from __future__ import annotations

import itertools
import json

import pytest

from navi_trio.agents.stream_parse import (
    DONE,
    SSEDecoder,
    StreamFormatError,
    ThinkSplitter,
    ToolCallAssembler,
    parse_chunk,
)


# -- SSEDecoder ------------------------------------------------------------------------
def decode(lines: list[str]) -> list[str]:
    decoder = SSEDecoder()
    out = [d for d in (decoder.feed_line(line) for line in lines) if d is not None]
    last = decoder.flush()
    if last is not None:
        out.append(last)
    return out


def test_sse_one_data_line_per_event() -> None:
    assert decode(['data: {"a": 1}', "", "data: [DONE]", ""]) == ['{"a": 1}', DONE]


def test_sse_event_is_complete_only_at_the_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_line("data: x") is None
    assert decoder.feed_line("") == "x"
    assert decoder.feed_line("") is None  # no data pending: nothing


def test_sse_multi_line_data_is_joined_with_newlines() -> None:
    assert decode(["data: first", "data: second", "data:third", ""]) == ["first\nsecond\nthird"]


def test_sse_only_one_leading_space_is_stripped() -> None:
    assert decode(["data:  two spaces", ""]) == [" two spaces"]
    assert decode(["data:no space", ""]) == ["no space"]
    assert decode(["data:", ""]) == [""]


def test_sse_comments_and_other_fields_are_ignored() -> None:
    lines = [": keep-alive", "event: message", "id: 7", "retry: 100", "data: payload", "", ":", ""]
    assert decode(lines) == ["payload"]


def test_sse_blank_lines_without_data_give_nothing() -> None:
    assert decode(["", "", ": ping", ""]) == []


def test_sse_flush_gives_an_unterminated_event() -> None:
    decoder = SSEDecoder()
    decoder.feed_line("data: tail")
    assert decoder.flush() == "tail"
    assert decoder.flush() is None


# -- parse_chunk -----------------------------------------------------------------------
def test_parse_chunk_returns_the_object() -> None:
    chunk = {"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}
    assert parse_chunk(json.dumps(chunk)) == chunk


@pytest.mark.parametrize("data", ["{not json", "", '{"choices": [', "\x00"])
def test_parse_chunk_refuses_malformed_json(data: str) -> None:
    with pytest.raises(StreamFormatError, match="not JSON"):
        parse_chunk(data)


@pytest.mark.parametrize("data", ["[1, 2]", '"text"', "42", "null"])
def test_parse_chunk_refuses_a_non_object(data: str) -> None:
    with pytest.raises(StreamFormatError, match="not an object"):
        parse_chunk(data)


def test_parse_chunk_turns_an_in_stream_error_into_its_message() -> None:
    with pytest.raises(StreamFormatError, match="context length exceeded"):
        parse_chunk(json.dumps({"error": {"message": "context length exceeded", "code": 400}}))
    with pytest.raises(StreamFormatError, match="overloaded"):
        parse_chunk(json.dumps({"error": "overloaded"}))


# -- ThinkSplitter ---------------------------------------------------------------------
def split_all(chunks: list[str]) -> tuple[list[tuple[str, str]], ThinkSplitter]:
    splitter = ThinkSplitter()
    out: list[tuple[str, str]] = []
    for c in chunks:
        out.extend(splitter.feed(c))
    out.extend(splitter.flush())
    return out, splitter


def summarise(pieces: list[tuple[str, str]]) -> tuple[str, str, list[str]]:
    """(text, thinking, the sequence of markers and kinds with adjacent kinds collapsed)."""
    text = "".join(p for k, p in pieces if k == "text")
    think = "".join(p for k, p in pieces if k == "think")
    shape: list[str] = []
    for kind, _ in pieces:
        if not shape or shape[-1] != kind or kind in ("think_start", "think_end"):
            shape.append(kind)
    return text, think, shape


SAMPLE = "Hi <think>a < b, so </thin no</think>Answer: 1<2"


def test_think_in_one_chunk() -> None:
    pieces, splitter = split_all([SAMPLE])
    assert summarise(pieces) == (
        "Hi Answer: 1<2",
        "a < b, so </thin no",
        ["text", "think_start", "think", "think_end", "text"],
    )
    assert not splitter.inside


def test_think_tags_split_at_every_position() -> None:
    """Every way of cutting the text into three chunks (so each tag is cut at each of
    its positions, and both tags at once) gives the same text, thinking and markers."""
    expected = summarise(split_all([SAMPLE])[0])
    n = len(SAMPLE)
    for i, j in itertools.combinations(range(n + 1), 2):
        chunks = [SAMPLE[:i], SAMPLE[i:j], SAMPLE[j:]]
        pieces, splitter = split_all(chunks)
        assert summarise(pieces) == expected, chunks
        assert all(p for k, p in pieces if k in ("text", "think")), chunks  # no empty pieces
        assert not splitter.inside


def test_think_one_character_at_a_time() -> None:
    pieces, _ = split_all(list(SAMPLE))
    assert summarise(pieces) == summarise(split_all([SAMPLE])[0])


def test_a_tag_prefix_is_held_back_until_it_is_decided() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("Hello <th") == [("text", "Hello ")]
    assert splitter.feed("ink>deep") == [("think_start", ""), ("think", "deep")]
    assert splitter.feed("</") == []
    assert splitter.feed("b> more") == [("think", "</b> more")]
    assert splitter.feed("</think>") == [("think_end", "")]
    assert splitter.flush() == []


def test_text_that_only_looks_like_a_tag_is_released_by_flush() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("x <thin") == [("text", "x ")]
    assert splitter.flush() == [("text", "<thin")]


def test_unclosed_think_stays_inside_and_flushes_as_thinking() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("<think>still going</thi") == [("think_start", ""), ("think", "still going")]
    assert splitter.inside
    assert splitter.flush() == [("think", "</thi")]


def test_two_think_blocks() -> None:
    pieces, _ = split_all(["<think>one</think>A<think>two</think>B"])
    text, think, shape = summarise(pieces)
    assert (text, think) == ("AB", "onetwo")
    assert shape == ["think_start", "think", "think_end", "text", "think_start", "think", "think_end", "text"]


def test_text_without_tags_passes_through_unchanged() -> None:
    for chunks in (["plain text"], ["a <b> c"], ["less < than", " and > more"]):
        pieces, _ = split_all(chunks)
        assert summarise(pieces) == ("".join(chunks), "", ["text"])


# -- ToolCallAssembler -----------------------------------------------------------------
def test_one_call_assembled_from_many_fragments() -> None:
    assembler = ToolCallAssembler()
    args = '{"expression": "6*7"}'
    assembler.feed([{"index": 0, "id": "call_1", "type": "function", "function": {"name": "calc", "arguments": ""}}])
    assembler.feed([{"index": 0, "function": {"name": "ulator"}}])
    for ch in args:
        assembler.feed([{"index": 0, "function": {"arguments": ch}}])
    [call] = assembler.calls()
    assert (call.id, call.name, call.arguments) == ("call_1", "calculator", args)


def test_several_calls_interleaved_come_out_in_index_order() -> None:
    assembler = ToolCallAssembler()
    assembler.feed([{"index": 1, "id": "b", "function": {"name": "clock", "arguments": "{"}}])
    assembler.feed([{"index": 0, "id": "a", "function": {"name": "read_file", "arguments": '{"name"'}}])
    assembler.feed([{"index": 1, "function": {"arguments": "}"}}, {"index": 0, "function": {"arguments": ': "x"}'}}])
    calls = assembler.calls()
    assert [(c.id, c.name, c.arguments) for c in calls] == [("a", "read_file", '{"name": "x"}'), ("b", "clock", "{}")]


def test_fragments_without_index_are_separate_calls() -> None:
    assembler = ToolCallAssembler()
    assembler.feed([{"id": "a", "function": {"name": "clock", "arguments": "{}"}}])
    assembler.feed([{"id": "b", "function": {"name": "list_files", "arguments": "{}"}}])
    assert [c.name for c in assembler.calls()] == ["clock", "list_files"]


def test_no_fragments_no_calls() -> None:
    assembler = ToolCallAssembler()
    assembler.feed([])
    assert assembler.calls() == []


@pytest.mark.parametrize(
    "fragments",
    [
        {"index": 0},  # not a list
        ["not an object"],
        [{"index": "0", "function": {"name": "clock"}}],
    ],
)
def test_malformed_fragments_are_a_stream_format_error(fragments: object) -> None:
    with pytest.raises(StreamFormatError):
        ToolCallAssembler().feed(fragments)

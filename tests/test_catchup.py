"""The catch-up cursor and the writer's merging (sans-IO), with the one merge rule."""

from __future__ import annotations

import json
from collections.abc import Callable

from navi_trio.catchup import EMPTY, CatchUp, Cursor, coalesce
from navi_trio.events import MERGE_MAX_CHARS, Event, RunLog, next_frame


def deltas(*texts: str, start: int = 2, kind: str = "stream_delta") -> list[Event]:
    out = []
    for i, text in enumerate(texts):
        seq = start + i
        out.append(Event(seq, kind, json.dumps({"type": kind, "seq": seq, "delta": text}), text))
    return out


def taker(items: list[object]) -> Callable[[], object]:
    return lambda: items.pop(0)  # IndexError once empty: coalesce's default "empty"


def test_coalesce_never_grows_past_the_bound() -> None:
    """The writer's merge and the log's catch-up follow the same rule: a frame never
    grows past MERGE_MAX_CHARS (the writer's own rule used to let one delta overshoot)."""
    half = "x" * (MERGE_MAX_CHARS // 2)
    evs = deltas(half, half, "y", half)
    frame, nxt = coalesce(evs[0], taker(list(evs[1:])))
    assert json.loads(frame) == {"type": "stream_delta", "seq": 3, "delta": half + half}
    assert nxt is evs[2]
    # The log's catch-up cuts the same frame at the same place.
    assert next_frame(evs_with_start(evs), 1, 5) == (frame, 3)


def evs_with_start(evs: list[Event]) -> list[Event]:
    return [Event(1, "stream_start", '{"type":"stream_start","seq":1}'), *evs]


def test_coalesce_stops_at_another_kind_and_at_an_empty_outbox() -> None:
    text = deltas("a", "b")
    think = deltas("t", start=4, kind="thinking_delta")
    frame, nxt = coalesce(text[0], taker([text[1], think[0]]))
    assert json.loads(frame) == {"type": "stream_delta", "seq": 3, "delta": "ab"}
    assert nxt is think[0]
    frame, nxt = coalesce(text[0], taker([]))
    assert frame == text[0].wire
    assert nxt is EMPTY
    frame, nxt = coalesce(text[0], taker(["heartbeat frame"]))
    assert frame == text[0].wire
    assert nxt == "heartbeat frame"


class Sub:
    def __init__(self, log: RunLog, name: str) -> None:
        self.cursor = Cursor(lagging=True)
        self.log = log
        self.name = name

    @property
    def queued(self) -> int:
        return self.cursor.queued

    def next_catch_up_frame(self) -> str | None:
        return self.cursor.next_frame(self.log, settled=False)


def test_catch_up_walks_lagging_subscriptions_oldest_first_and_drops_each_when_caught_up() -> None:
    first, second = RunLog("r1"), RunLog("r2")
    for log, text in ((first, "ab"), (second, "c")):
        log.start()
        for d in text:
            log.text_delta(d)
    a, b = Sub(first, "a"), Sub(second, "b")
    catch_up: CatchUp[Sub] = CatchUp([a, b])
    frames, carried = [], []
    while (caught := catch_up.next_frame()) is not None:
        frames.append(json.loads(caught[0]))
        carried.append(caught[1])
    assert carried == [1, 2, 1, 1]  # the two deltas of the first run in one frame
    assert [f["type"] for f in frames] == ["stream_start", "stream_delta", "stream_start", "stream_delta"]
    assert frames[1]["delta"] == "ab"
    assert not catch_up
    assert not a.cursor.lagging
    assert not b.cursor.lagging


def test_replay_cursor_prelude_then_merged_then_replay_end() -> None:
    log = RunLog("r")
    log.start()
    for d in "abc":
        log.text_delta(d)
    cursor = Cursor()
    cursor.start_replay(log, after=None)
    frames = []
    while (frame := cursor.next_frame(log, settled=True)) is not None:
        frames.append(json.loads(frame))
    assert frames == [
        {"type": "stream_start", "seq": 1, "run_id": "r"},
        {"type": "replay_start", "count": 1},
        {"type": "stream_delta", "seq": 4, "delta": "abc"},
        {"type": "replay_end"},
        {"type": "session_sync"},
    ]

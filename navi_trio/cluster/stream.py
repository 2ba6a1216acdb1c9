"""A run's log as a Redis Stream, and the readers that follow it from any process.

Entry ``0-<seq>`` holds event ``seq`` (fields ``t``: its type, ``w``: its wire text; a
reader takes a delta's text from the wire text), so a reader's cursor *is* the seq: resume after
seq N is ``XREAD`` from ``0-N``. Entry ``1-0`` (greater than every ``0-<seq>``) says the
run is settled: its answer is saved. The stream is bounded (``MAXLEN ~``, just over
``NAVI_MAX_RUN_EVENTS``, so a run's own bound is what limits it) and gets a TTL once the
run has ended.

Appends are fenced: each batch is one Lua script that appends only if the stream's top is
the seq the writer expects and no terminal event is in yet. So a process that ends an
orphaned run (its owner died: :func:`end_orphan`) and an owner that was only stalled can
never both write a terminal event, nor can the stalled owner write after it: its next
append is refused (:class:`RunTakenOver`).

:class:`MirrorLog` is what a reader builds from the stream: the events, with the same
``next_frame`` as a local run's log, so the catch-up and merging rules of ``catchup.py``
and ``events.py`` are the same on every process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import orjson
from coredis.response.types import StreamEntry

from ..errors import NaviError
from ..events import DELTA_TYPES, MERGE_MAX_CHARS, TERMINAL_TYPES, Event, RunLog, next_frame
from .redis import Client, Keys

#: How long an ended run's log stays readable (a client resuming after a reconnect).
ENDED_TTL_S: Final = 600
#: The entry that says the run is settled (its answer saved).
SETTLED_ID: Final = "1-0"
#: Room over NAVI_MAX_RUN_EVENTS for what closes a run past its bound.
_SLACK: Final = 64

# KEYS[1] the stream. ARGV: expected top seq, maxlen, first seq, then (type, wire) each.
# Returns 1 (appended), 0 (a terminal event is in already), -1 (the top is not the
# expected seq: someone else appended).
#: Lua: ``over(top)``, whether a stream's top entry (from ``XREVRANGE ... COUNT 1``) says
#: the run is over: settled (``1-0``) or a terminal event. Shared by every script that asks.
OVER_LUA: Final = """
local function over(top)
  if #top == 0 then return false end
  if top[1][1] == '1-0' then return true end
  local fields = top[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' and (fields[i + 1] == 'stream_end' or fields[i + 1] == 'stream_stopped'
        or fields[i + 1] == 'error') then
      return true
    end
  end
  return false
end
"""

_APPEND: Final = (
    OVER_LUA
    + """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local top_seq = 0
if #top > 0 then
  if over(top) then return 0 end
  top_seq = tonumber(string.sub(top[1][1], 3))
end
if top_seq ~= tonumber(ARGV[1]) then return -1 end
local seq = tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '0-' .. seq, 't', ARGV[i], 'w', ARGV[i + 1])
  seq = seq + 1
end
return 1
"""
)


#: The append script's SHA1, as ``EVALSHA`` names it (in a pipeline of many runs' appends;
#: after a ``NOSCRIPT`` answer, load :data:`APPEND_SCRIPT` and send the trip again).
APPEND_SCRIPT: Final = _APPEND
APPEND_SHA: Final = hashlib.sha1(_APPEND.encode()).hexdigest()


class RunTakenOver(NaviError):
    """The run's log refused an append: another process ended the run (its owner's lease
    had expired), so this process must stop playing it."""


def entry_id(seq: int) -> str:
    return f"0-{seq}"


def to_event(entry: StreamEntry) -> Event:
    """The event an entry ``0-<seq>`` holds (the client decodes replies to ``str``)."""
    fields = cast("Mapping[str, str]", entry.field_values)
    seq = int(cast(str, entry.identifier).partition("-")[2])
    type_, wire = fields["t"], fields["w"]
    delta = orjson.loads(wire)["delta"] if type_ in DELTA_TYPES else None
    return Event(seq, type_, wire, delta)


class RunStream:
    """The owner's side of one run's stream: it appends the run's events in order."""

    def __init__(self, client: Client, keys: Keys, run_id: str, max_events: int) -> None:
        self._client = client
        self.key = keys.log(run_id)
        self._maxlen = max_events + _SLACK
        #: The seq of the last event in the stream.
        self.top = 0
        self._append = client.register_script(_APPEND)

    async def append(self, events: Sequence[Event]) -> None:
        """Append ``events`` (the next seqs, in order) in one round trip.

        Raises:
            RunTakenOver: another process ended the run meanwhile; nothing was appended.

        Cancellation: the script runs whole or not at all; if a cancel lands after Redis
        ran it, :attr:`top` is behind and the next append finds out (-1: taken over), so
        a caller that cancels an append must treat the run as lost.
        """
        if not events:
            return
        self.appended(events, await self._append(keys=[self.key], args=self.append_args(events)))

    def append_args(self, events: Sequence[Event]) -> list[str | int]:
        """The append script's arguments for ``events`` (for a pipeline of many runs'
        appends: ``script(keys=[stream.key], args=..., client=pipe)``)."""
        args: list[str | int] = [self.top, self._maxlen, events[0].seq]
        for ev in events:
            args += (ev.type, ev.wire)
        return args

    def appended(self, events: Sequence[Event], done: int) -> None:
        """What the append script answered for ``events``: the top moves on, or
        :class:`RunTakenOver` is raised (nothing was appended)."""
        if done != 1:
            raise RunTakenOver(self.key)
        self.top = events[-1].seq

    async def settle(self, ttl_s: int = ENDED_TTL_S) -> None:
        """Mark the run settled (its answer saved) and let the stream expire."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.key, {"settled": "1"}, identifier=SETTLED_ID)
            pipe.expire(self.key, ttl_s)


class MirrorLog:
    """A run's log as a reader on any process has it: the events read so far, in order.

    It answers ``next_frame`` and ``events`` like :class:`~navi_trio.events.RunLog`, so a
    :class:`~navi_trio.catchup.Cursor` walks it as it walks a local run's log.
    """

    __slots__ = ("events", "run_id", "settled", "terminal")

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.events: list[Event] = []
        self.terminal: Event | None = None
        self.settled = False

    @property
    def last_seq(self) -> int:
        return len(self.events)

    @property
    def finished(self) -> bool:
        return self.terminal is not None

    def extend(self, events: Sequence[Event]) -> None:
        """Add what was read; each must be the next seq (a gap is a bug: raise)."""
        for ev in events:
            if ev.seq != len(self.events) + 1:
                raise ValueError(f"run {self.run_id}: seq {ev.seq} after {len(self.events)}")
            self.events.append(ev)
            if ev.type in TERMINAL_TYPES:
                self.terminal = ev

    def next_frame(self, after: int, until: int | None = None, max_chars: int = MERGE_MAX_CHARS) -> tuple[str, int]:
        return next_frame(self.events, after, len(self.events) if until is None else until, max_chars)


class StreamReader:
    """Reads one run's stream from a cursor into a :class:`MirrorLog`."""

    def __init__(self, client: Client, keys: Keys, run_id: str) -> None:
        self._client = client
        self.key = keys.log(run_id)
        self.log = MirrorLog(run_id)

    async def read(self, *, block_ms: int | None = None, count: int = 1000) -> list[Event]:
        """The events after the mirror's last seq (waiting up to ``block_ms`` for some if
        none are there yet), added to the mirror; sets ``log.settled`` at ``1-0``.

        Cancellation: ``XREAD BLOCK`` is a plain wait: a cancel ends it, nothing is lost
        (the cursor moves only once the entries are in the mirror).
        """
        if self.log.settled:
            return []
        got = await self._client.xread({self.key: entry_id(self.log.last_seq)}, count=count, block=block_ms)
        if not got:
            return []
        new: list[Event] = []
        for entry in got.get(self.key, ()):
            if entry.identifier == SETTLED_ID:
                self.log.settled = True
                break
            new.append(to_event(entry))
        self.log.extend(new)
        return new

    async def read_until_settled(self, *, block_ms: int = 1000) -> MirrorLog:
        """Follow the stream until the run is settled; the whole log.

        Cancellation: only waits (see :meth:`read`).
        """
        while not self.log.settled:
            await self.read(block_ms=block_ms)
        return self.log


def rebuild(events: Sequence[Event], run_id: str) -> RunLog:
    """A :class:`~navi_trio.events.RunLog` in the state ``events`` leave it (each replayed
    through the grammar), so what closes it is decided by the same rules as for a run
    that plays here. Raises ``GrammarError`` (or ``ValueError``) on a log that does not
    replay to the same wire text."""
    log = RunLog(run_id)
    for ev in events:
        obj: dict[str, Any] = orjson.loads(ev.wire)
        t = ev.type
        if t == "stream_start":
            out = [log.start()]
        elif t == "thinking_delta":
            out = log.thinking_delta(obj["delta"])
        elif t == "thinking_end":
            out = log.thinking_end()
        elif t == "stream_delta":
            out = log.text_delta(obj["delta"])
        elif t == "tool_started":
            out = log.tool_started(obj["tool"], obj["args"], is_subagent=obj.get("is_subagent", False))
        elif t == "tool_call":
            out = log.tool_call(obj["result"], success=obj["success"])
        elif t == "context_compressed":
            out = log.context_compressed()
        else:
            raise ValueError(f"run {run_id}: cannot replay {t} (seq {ev.seq})")
        if [e.wire for e in out] != [ev.wire]:
            raise ValueError(f"run {run_id}: seq {ev.seq} does not replay to the same event")
    return log


async def ended_unsettled(client: Client, keys: Keys, run_id: str) -> RunLog | None:
    """The log of a run that ended (its terminal event is in its stream) but was never
    settled (its owner died before saving its answer), rebuilt up to that event; None if
    it is settled, has no terminal event, or no log."""
    entries = await client.xrange(keys.log(run_id), "-", "+")
    events = [to_event(e) for e in entries if e.identifier != SETTLED_ID]
    if not events or len(events) != len(entries) or events[-1].type not in TERMINAL_TYPES:
        return None
    return rebuild(events[:-1], run_id)


async def end_orphan(
    client: Client, keys: Keys, run_id: str, *, max_events: int, reason: str = "shutdown"
) -> RunLog | None:
    """End a run whose owner is gone: append what closes it and ``stream_stopped`` with
    ``reason``, exactly once in the cluster (fenced like every append), and mark it
    settled-to-be by a TTL. Returns the rebuilt log (its answer to save as
    ``interrupted``), or None if the run had ended already (by its owner or another
    process) or left no log.

    Cancellation: one read and one fenced append; cancelled between them, nothing was
    written, and the next sweep tries again.
    """
    key = keys.log(run_id)
    entries = await client.xrange(key, "-", "+")
    events = [to_event(e) for e in entries if e.identifier != SETTLED_ID]
    if not events or len(events) != len(entries) or events[-1].type in TERMINAL_TYPES:
        return None
    log = rebuild(events, run_id)
    closing = log.stopped(reason)
    writer = RunStream(client, keys, run_id, max_events)
    writer.top = log.last_seq - len(closing)
    try:
        await writer.append(closing)
    except RunTakenOver:
        return None  # its owner (or another process) wrote meanwhile
    await client.expire(key, ENDED_TTL_S)
    return log

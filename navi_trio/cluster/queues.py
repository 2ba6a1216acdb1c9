"""The messages waiting for a session's run, as Redis lists, decided cluster-wide.

Admission (``admission.py``) decides from what it sees: the session's holder and its
queue. In a cluster both can change between that look and the step that acts on it, so
each step here is one Lua script that acts only if what admission saw still holds (the
same holder, the same queue length), else changes nothing and says so: the caller looks
again and decides again (optimistic, like ``WATCH``/``MULTI``, in one round trip).

At a run's end, :meth:`Queues.pass_on` pops the next message and hands the session's
lease to its run in one step, or frees the session: no message from another process can
start a run in between.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import attrs
import orjson

from ..admission import Queued
from ..lifecycle import RunRequest
from .lease import Holder
from .redis import Client, Keys

# KEYS: lease, queue. ARGV: expected holder ('' none), expected length, position, item.
_INSERT: Final = """
local holder = redis.call('GET', KEYS[1]) or ''
if holder ~= ARGV[1] or redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[2]) then return 0 end
local at = tonumber(ARGV[3])
if at >= tonumber(ARGV[2]) then
  redis.call('RPUSH', KEYS[2], ARGV[4])
  return 1
end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
table.insert(items, at + 1, ARGV[4])
redis.call('DEL', KEYS[2])
redis.call('RPUSH', KEYS[2], unpack(items))
return 1
"""
# KEYS: lease, queue. ARGV: our holder value, the successor's, lease ms. Returns the item
# whose run now holds the session, '' if the session was freed, false if not ours.
_PASS_ON: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local item = redis.call('LPOP', KEYS[2])
if item then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return item
end
redis.call('DEL', KEYS[1])
return ''
"""


def dump(queued: Queued) -> str:
    """The message as JSON, without its arrival time: that is a time on this process's
    Trio clock, which means nothing to the process that pops it (it takes its own)."""
    obj = attrs.asdict(queued, recurse=True)
    del obj["request"]["received_at"]
    upload_dir = obj["request"]["upload_dir"]
    obj["request"]["upload_dir"] = None if upload_dir is None else str(upload_dir)
    return orjson.dumps(obj).decode()


def load(text: str) -> Queued:
    obj: dict[str, Any] = orjson.loads(text)
    req = obj["request"]
    upload_dir = req.pop("upload_dir")
    request = RunRequest(**req, upload_dir=None if upload_dir is None else Path(upload_dir))
    return Queued(request, interrupted=obj["interrupted"])


class Queues:
    """The sessions' queues, for one process (``owner``, as in its leases)."""

    def __init__(self, client: Client, keys: Keys, owner: str, lease_ms: int) -> None:
        self._client = client
        self._keys = keys
        self.owner = owner
        self.lease_ms = lease_ms
        self._insert = client.register_script(_INSERT)
        self._pass_on = client.register_script(_PASS_ON)

    async def view(self, session_id: str) -> list[Queued]:
        """What waits for the session's run, oldest first."""
        return [load(item) for item in await self._client.lrange(self._keys.queue(session_id), 0, -1)]

    async def look(self, session_id: str) -> tuple[Holder | None, list[Queued]]:
        """The session's holder and its queue, in one round trip (a transaction: one
        consistent view)."""
        async with self._client.pipeline(transaction=True) as pipe:
            value = pipe.get(self._keys.lease(session_id))
            items = pipe.lrange(self._keys.queue(session_id), 0, -1)
        held = await value
        return (None if held is None else Holder.parse(held)), [load(item) for item in await items]

    async def insert(self, session_id: str, queued: Queued, at: int, *, holder: Holder | None, length: int) -> bool:
        """Put ``queued`` at position ``at`` if the session is still held by ``holder``
        with ``length`` messages waiting (what admission decided from); False (nothing
        changed) if either moved. Cancellation: one atomic script, run or not."""
        keys = [self._keys.lease(session_id), self._keys.queue(session_id)]
        args: list[str | int] = ["" if holder is None else holder.value, length, at, dump(queued)]
        done: int = await self._insert(keys=keys, args=args)
        return bool(done)

    async def pass_on(self, session_id: str, run_id: str, successor_id: str) -> Queued | bool | None:
        """At the end of our run ``run_id``: pop the next message and make ``successor_id``
        (its run, played here) the session's holder, or free the session.

        Returns the message, None (nothing waited: the session is free), or False (the
        session was not ours: our lease was lost).
        """
        keys = [self._keys.lease(session_id), self._keys.queue(session_id)]
        mine, successor = Holder(run_id, self.owner).value, Holder(successor_id, self.owner).value
        got: str | None = await self._pass_on(keys=keys, args=[mine, successor, self.lease_ms])
        if got is None:
            return False
        return load(got) if got else None

    async def forget(self, session_id: str) -> list[Queued]:
        """Drop what waits for the session (deleted, or saved as unstarted at shutdown);
        what it held, oldest first."""
        key = self._keys.queue(session_id)
        async with self._client.pipeline(transaction=True) as pipe:
            items = pipe.lrange(key, 0, -1)
            pipe.delete([key])
        return [load(item) for item in await items]

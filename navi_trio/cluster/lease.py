"""Run ownership as a lease: at most one run per session in the whole cluster.

The session's lease key holds ``"<run_id> <owner>"`` with an expiry of ``NAVI_LEASE_S``.
A claim is one ``SET NX PX`` (atomic: of two processes racing for a session exactly one
wins). Only the holder renews, hands over (to the next queued message's run, in one step)
or releases it, each a Lua script that first checks the value is still its own, so an
owner that lost its lease (it expired while the process was stalled, and another process
ended the run) can never extend or delete the new holder's. An owner that dies stops
renewing: within ``NAVI_LEASE_S`` the key is gone and the other processes see its run is
orphaned (``Leases.holder`` no longer names it).
"""

from __future__ import annotations

from typing import Final

import coredis

from ..broker import Holder as Holder  # re-exported: a lease names its holder
from .redis import Client, Keys

#: NAVI_LEASE_S's default.
DEFAULT_LEASE_S: Final = 10.0

_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_HAND_OVER: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


class Leases:
    """The sessions' leases, as seen by one process (``owner``).

    Every method is one round trip to Redis; none leaves anything half-done when
    cancelled (each is a single atomic command or script: either Redis ran it or not,
    and a claim that ran but whose answer was lost expires by itself).
    """

    def __init__(self, client: Client, keys: Keys, owner: str, lease_s: float = DEFAULT_LEASE_S) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self._client = client
        self._keys = keys
        self.owner = owner
        self.lease_ms = max(1, round(lease_s * 1000))
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._hand_over = client.register_script(_HAND_OVER)

    def _mine(self, run_id: str) -> str:
        return Holder(run_id, self.owner).value

    async def claim(self, session_id: str, run_id: str) -> bool:
        """Make ``run_id`` (played here) the session's run; False if some run holds it."""
        return await self._client.set(
            self._keys.lease(session_id), self._mine(run_id), condition=coredis.PureToken.NX, px=self.lease_ms
        )

    async def renew(self, session_id: str, run_id: str) -> bool:
        """Extend our lease by ``lease_s``; False if it is no longer ours (lost)."""
        done: int = await self._renew(keys=[self._keys.lease(session_id)], args=[self._mine(run_id), self.lease_ms])
        return bool(done)

    async def hand_over(self, session_id: str, run_id: str, successor_id: str) -> bool:
        """Give our lease to ``successor_id`` (also played here) in one step, so no other
        process's message can take the session in between; False if it was not ours."""
        args: list[str | int] = [self._mine(run_id), self._mine(successor_id), self.lease_ms]
        done: int = await self._hand_over(keys=[self._keys.lease(session_id)], args=args)
        return bool(done)

    async def release(self, session_id: str, run_id: str) -> bool:
        """Free the session if our run holds it; False (nothing changes) if not."""
        done: int = await self._release(keys=[self._keys.lease(session_id)], args=[self._mine(run_id)])
        return bool(done)

    async def holder(self, session_id: str) -> Holder | None:
        """Who holds the session now (None: nobody; a dead owner's lease has expired)."""
        value = await self._client.get(self._keys.lease(session_id))
        return None if value is None else Holder.parse(value)

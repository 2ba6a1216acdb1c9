"""What several navi-trio processes share through Redis (CONTRACT section 9), in pieces.

Each piece is one small module with one kind of Redis key, usable and tested on its own
against a real redis-server; the Redis broker is made of them:

- ``redis.py``: the connection (coredis, which runs on anyio and so on Trio), the key
  names, and :class:`~navi_trio.cluster.redis.RedisUnavailable`, the one error the
  rest of the server sees for a lost or unreachable Redis;
- ``lease.py``: run ownership as a lease: one run per session in the whole cluster,
  claimed atomically, renewed and released only by its owner, so a dead owner is noticed
  when its lease expires;
- ``stream.py``: a run's log as a Redis Stream whose entry ids are the seq (``0-<seq>``),
  bounded, with a TTL once the run has ended, and the reader that follows it from a cursor
  into a :class:`~navi_trio.cluster.stream.MirrorLog` (the same catch-up and merging
  rules as a local run's log);
- ``bus.py``: the notices every process hears: a run started, stop this run, close the
  followers of a session;
- ``queues.py``: the messages waiting for a session's run, as Redis lists;
- ``broker.py``: :class:`~navi_trio.cluster.broker.RedisBroker`, the broker seam
  (``navi_trio/broker.py``) made of these for one process, and ``RemoteRun``, its view of
  a run another process plays.
"""

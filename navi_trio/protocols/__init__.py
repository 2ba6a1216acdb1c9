"""The protocols other frontends speak (CONTRACT section 10), translated from a run's events.

Each module is sans-IO, like :mod:`navi_trio.events`: a translator takes the run's events
one at a time (as the dicts a WebSocket client would see, merged deltas included) and
returns the protocol's parts; :mod:`.sse` turns parts into Server-Sent Events bytes. The
HTTP side (:mod:`navi_trio.protocol_routes`) only moves bytes.
"""

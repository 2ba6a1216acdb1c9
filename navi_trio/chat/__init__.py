"""``navi-trio chat``: the terminal client that ships with the server (CONTRACT section 8).

:mod:`.answer` is the sans-IO state of one answer (events applied once, by seq),
:mod:`.output` prints it, :mod:`.client` talks to the server (trio-websocket, httpx2)."""

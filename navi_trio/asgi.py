"""``hypercorn --worker-class trio navi_trio.asgi:app``: the app, configured from ``NAVI_*``.

Hypercorn's own shutdown trigger gives the app no notice before connections are torn
down, so the app listens for SIGINT/SIGTERM itself: a Ctrl-C in a terminal or a stop by
systemd (which signals the whole group) reaches the worker, which drains as
``navi-trio serve`` does. A signal sent to hypercorn's parent process alone still ends
every run with a terminal event and an ``interrupted`` answer, but only after hypercorn
has closed the connections (1012).
"""

from __future__ import annotations

from .app import create_app
from .logs import configure_logging
from .server import tune_gc
from .settings import Settings

_settings = Settings.from_env()
configure_logging(_settings.log_format, _settings.log_level)
app = create_app(_settings, watch_signals=True)
tune_gc()

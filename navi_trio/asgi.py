"""``hypercorn --worker-class trio navi_trio.asgi:app``: the app, configured from ``NAVI_*``.

Hypercorn's own shutdown trigger gives the app no notice before connections are torn
down (after ``--graceful-timeout``); runs still get their grace at lifespan shutdown and
end with ``stream_stopped`` (reason ``shutdown``) and a saved, ``interrupted`` answer.
"""

from __future__ import annotations

from .app import create_app
from .logs import configure_logging
from .settings import Settings

_settings = Settings.from_env()
configure_logging(_settings.log_format, _settings.log_level)
app = create_app(_settings)

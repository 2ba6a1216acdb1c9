"""The web chat page that ships with the server (CONTRACT section 8): static files in
``assets/``, served by :mod:`navi_trio.web.page`."""

"""``GET /`` and ``GET /assets/<name>``: the web chat page, from files inside the package.

No build step and nothing from another host: the page is plain HTML, CSS and JavaScript
modules, read once from the package and kept in memory (a few tens of kilobytes). The page
needs no token (CONTRACT section 6): it asks for one when the API answers 401.

The Content-Security-Policy allows scripts, styles and connections from this origin only,
so even a rendering mistake could not load or run anything an answer carries.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ..asgi_types import Scope, Send

_ASSET_PATH: Final = re.compile(r"^/assets/(?P<name>[a-z0-9_-]{1,64}\.(?:html|js|css|svg))$")
_TYPES: Final = {
    "html": b"text/html; charset=utf-8",
    "js": b"text/javascript; charset=utf-8",
    "css": b"text/css; charset=utf-8",
    "svg": b"image/svg+xml",
}
CSP: Final = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    b"connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def page_asset(path: str) -> str | None:
    """The asset file a request path names (``/`` is the page itself), or None if the
    path is not the page's."""
    if path == "/" or path == "/index.html":
        return "index.html"
    m = _ASSET_PATH.match(path)
    return m["name"] if m else None


@functools.cache
def _read(name: str) -> bytes | None:
    asset = resources.files(__package__).joinpath("assets", name)
    try:
        return asset.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


async def serve_page(name: str, scope: Scope, send: Send) -> None:
    """Answer a GET or HEAD for one of the page's files (404 if it does not exist, 405 for
    other methods). Cancellation: nothing to clean up; a cancelled send is hypercorn's."""
    method = scope["method"]
    body = _read(name)
    if method not in ("GET", "HEAD"):
        status, ctype, payload = 405, b"application/json", b'{"detail":"Method Not Allowed"}'
    elif body is None:
        status, ctype, payload = 404, b"application/json", b'{"detail":"Not Found"}'
    else:
        status, ctype, payload = 200, _TYPES[name.rsplit(".", 1)[1]], body
    headers = [
        (b"content-type", ctype),
        (b"content-length", str(len(payload)).encode()),
        # Small files, and a new version must show at the next reload: revalidate always.
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"content-security-policy", CSP),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else payload})

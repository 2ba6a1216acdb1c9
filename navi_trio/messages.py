"""Client messages on the WebSocket: parsing and the checks of CONTRACT section 3.

The receiver hands each text frame here; what comes back is a :class:`RunRequest` ready
for admission, or a :class:`~navi_trio.errors.BadClientMessage` (or
:class:`~navi_trio.uploads.BadUpload`) whose text is the wire ``error.message``. Nothing
here knows about connections or runs: the checks are plain functions, and the two that
read a lot of bytes or the disk (base64, uploads) run in a worker thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from . import uploads
from .admission import IF_RUNNING
from .base64_check import is_base64
from .errors import BadClientMessage, StoreError
from .lifecycle import RunRequest
from .uploads import BadUpload

if TYPE_CHECKING:
    from .store.base import Store

MAX_IMAGES: Final = 8
MAX_FILES: Final = 32
MAX_IMAGE_BYTES: Final = 50 * 1024 * 1024
EXPECTED_MESSAGE: Final = "Expected {type: 'message', content: '...'}"
UPLOADS_UNREADABLE: Final = "Uploads cannot be read now (storage is unavailable); try again shortly."


def is_stop(data: Any) -> bool:
    """``{"type": "stop"}`` (extra fields ignored)."""
    return isinstance(data, dict) and data.get("type") == "stop"


async def run_request(
    data: Any,
    *,
    session_id: str,
    user_id: str | None,
    conn_id: int | None,
    max_chars: int,
    uploads_root: Path | None,
    session_owner: str | None,
    store: Store | None = None,
) -> tuple[RunRequest, str]:
    """A client ``message`` made into a checked :class:`RunRequest` and its ``if_running``.

    ``store``: where uploads this process lacks are fetched from first (a cluster's).
    Cancellation: the base64 check runs in chunks on the event loop, the upload check in
    a worker thread; a cancel ends (or abandons) the check and nothing has been submitted.
    Raises :class:`BadClientMessage` or :class:`BadUpload`.
    """
    request, if_running = parse_message(data, session_id, user_id, conn_id, max_chars)
    if uploads_root is not None:
        folder = uploads.session_dir(uploads_root, session_owner, session_id)
        request = attrs.evolve(request, upload_dir=folder)
    if request.images:
        await check_base64(request.images)
    files = data.get("files")
    if files is not None and files != []:
        request = await with_files(request, files, uploads_root, session_owner, store)
    return request, if_running


async def with_files(
    request: RunRequest, files: Any, root: Path | None, session_owner: str | None, store: Store | None = None
) -> RunRequest:
    """Check that every named file is an upload of this session (metadata only, in a
    worker thread), and tell the agent where they are. With a ``store``, the named files
    this process lacks (uploaded to another process of a cluster) are fetched into its
    data dir first. Raises :class:`BadUpload`, or :class:`BadClientMessage` if the store
    cannot be read."""
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise BadClientMessage("files must be a list of {name, path} objects.")
    if len(files) > MAX_FILES:
        raise BadClientMessage(f"Too many files ({len(files)}). Max {MAX_FILES} allowed.")
    if root is None:
        raise BadUpload("Uploads are not available on this server.")
    session_id = request.session_id
    if store is not None:
        names = [n for f in files if isinstance(n := f.get("name"), str) and uploads.is_safe(n)]
        try:
            await store.local_uploads(uploads.session_dir(root, session_owner, session_id), session_id, names)
        except StoreError as exc:
            raise BadClientMessage(UPLOADS_UNREADABLE) from exc

    def check() -> list[str]:
        for f in files:
            uploads.resolve_upload(root, session_owner, session_id, f.get("name"), f.get("path"))
        return [f"- {f['name']} → {uploads.public_path(session_id, f['name'])}" for f in files]

    lines = await trio.to_thread.run_sync(check)
    note = "\n\n[Uploaded files on disk:\n" + "\n".join(lines) + "]"
    return attrs.evolve(request, content=request.content + note, files=[f["name"] for f in files])


def parse_message(
    data: Any, session_id: str, user_id: str | None, conn_id: int | None = None, max_chars: int = 100_000
) -> tuple[RunRequest, str]:
    """Validate a client ``message`` (CONTRACT section 3's bad-input table).

    Raises :class:`BadClientMessage` whose text is the wire ``error.message``.
    """
    if not isinstance(data, dict) or data.get("type") != "message":
        raise BadClientMessage(EXPECTED_MESSAGE)
    content = data.get("content")
    if not isinstance(content, str) or not content or content.isspace():  # no copy, unlike strip()
        raise BadClientMessage(EXPECTED_MESSAGE)
    if len(content) > max_chars:
        raise BadClientMessage(f"Message too long ({len(content)} characters). Max {max_chars} allowed.")
    if_running = data.get("if_running", "reject")
    if if_running is None:
        if_running = "reject"
    if if_running not in IF_RUNNING:
        raise BadClientMessage("if_running must be 'reject', 'interrupt' or 'enqueue'.")
    images = _parse_images(data.get("images"))
    agent_content = content
    if images:
        n = len(images)
        noun = "image" if n == 1 else "images"
        agent_content += f"\n\n[{n} {noun} attached inline — already in your context, no extra loading needed.]"
    return RunRequest(session_id, user_id, agent_content, content, images, conn_id), if_running


def _parse_images(raw: Any) -> list[str]:
    """Count and size checks (CONTRACT section 3); the images are kept as sent, so a
    ``data:`` URL keeps its media type. Their base64 is checked by :func:`check_base64`."""
    if raw is None or raw == []:
        return []
    if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
        raise BadClientMessage("images must be a list of base64 strings or data: URLs.")
    if len(raw) > MAX_IMAGES:
        raise BadClientMessage(f"Too many images ({len(raw)}). Max {MAX_IMAGES} allowed.")
    total = 0
    for img in raw:
        total += len(img) - _payload_start(img)
        if total > MAX_IMAGE_BYTES:
            raise BadClientMessage("Total image payload exceeds 50 MB limit.")
    return list(raw)


def _payload_start(img: str) -> int:
    """Where the payload of a ``data:<head>,<payload>`` image begins (0 if it is not one),
    found without copying a 50 MB string."""
    if not img.startswith("data:"):
        return 0
    return img.find(",") + 1  # no comma: 0, the whole string counts


async def check_base64(images: list[str]) -> None:
    """Each image is base64, or a ``data:<type>;base64,<data>`` URL. Up to 50 MB, checked
    in chunks on the event loop (:mod:`~navi_trio.base64_check`), so other streams go on.
    Raises :class:`BadClientMessage`.

    Cancellation: a cancel between chunks ends the check; the message is not submitted.
    """
    for i, img in enumerate(images, start=1):
        start = 0
        if img.startswith("data:"):
            comma = img.find(",")
            if comma < 0 or not img.endswith(";base64", 0, comma):
                raise BadClientMessage(f"Image {i} is not a base64 data: URL.")
            start = comma + 1
        if not await is_base64(img, start):
            raise BadClientMessage(f"Image {i} is not valid base64.")

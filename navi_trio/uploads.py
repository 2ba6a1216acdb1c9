"""Uploaded files: where they live, safe names, and resolving a message's ``files``.

Layout: ``<data_dir>/uploads/<user id or _anonymous>/<session id>/<name>``. A message
may name only files of its own session; tools read only inside the user's own area.
Everything here is synchronous file-system work: call it through ``trio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import unicodedata
from pathlib import Path
from typing import Final

from .errors import NaviError

MAX_NAME_BYTES: Final = 255
ANONYMOUS_DIR: Final = "_anonymous"


class BadUpload(NaviError):
    """A file name or reference that is refused; ``str(exc)`` names the file."""


def safe_name(name: str) -> str:
    """``name`` if it is a plain file name; raises :class:`BadUpload` otherwise.

    Refused: empty, ``.``/``..``, hidden (leading dot), any path separator, NUL or other
    control characters, more than 255 bytes.
    """
    if (
        not name
        or len(name) > MAX_NAME_BYTES
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
        or any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in name)
        or name != name.strip()
    ):
        raise BadUpload(f"Invalid file name {name!r}.")
    return name


def user_area(data_dir: Path, user_id: str | None) -> Path:
    return data_dir / "uploads" / (user_id or ANONYMOUS_DIR)


def session_dir(data_dir: Path, user_id: str | None, session_id: str) -> Path:
    return user_area(data_dir, user_id) / session_id


def public_path(session_id: str, name: str) -> str:
    """The ``path`` a client gets back and names in a message."""
    return f"uploads/{session_id}/{name}"


def save_upload(data_dir: Path, user_id: str | None, session_id: str, name: str, body: bytes) -> dict[str, str]:
    """Write an upload atomically (temp file, then rename). Returns ``{"name", "path"}``;
    raises ``OSError`` when storage cannot take it (full, read-only, not a directory)."""
    name = safe_name(name)
    folder = session_dir(data_dir, user_id, session_id)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"name": name, "path": public_path(session_id, name)}


def discard_upload(folder: Path, name: str) -> None:
    """Remove an upload just written for a session deleted meanwhile, and its folder if
    that leaves it empty (another upload may still be finishing into it)."""
    (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def resolve_upload(data_dir: Path, user_id: str | None, session_id: str, name: object, path: object) -> Path:
    """The file a message names, if it is an upload of this session; else :class:`BadUpload`
    naming it. Nothing is read: only its metadata is checked (no symlink, a regular file,
    inside the session's own folder)."""
    if path is not None and (not isinstance(name, str) or path != public_path(session_id, name)):
        raise _refused(name)
    return resolve_in(session_dir(data_dir, user_id, session_id), name)


def resolve_in(folder: Path, name: object) -> Path:
    """``folder / name`` if ``name`` is a plain name of a regular file there (not a
    symlink); else :class:`BadUpload` naming it."""
    if not isinstance(name, str):
        raise _refused(name)
    try:
        safe_name(name)
    except BadUpload:
        raise _refused(name) from None
    candidate = folder / name
    try:
        st = os.lstat(candidate)
    except OSError:
        raise _refused(name) from None
    if not stat.S_ISREG(st.st_mode) or candidate.resolve().parent != folder.resolve():
        raise _refused(name)
    return candidate


def _refused(name: object) -> BadUpload:
    shown = name if isinstance(name, str) else repr(name)
    return BadUpload(f"File {shown!r} is not an upload of this session.")


def delete_session_uploads(data_dir: Path, user_id: str | None, session_id: str) -> None:
    """Remove a deleted session's upload folder (and everything in it)."""
    shutil.rmtree(session_dir(data_dir, user_id, session_id), ignore_errors=True)

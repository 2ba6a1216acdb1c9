"""Uploaded files: where they live, safe names, and resolving a message's ``files``.

Layout: ``<data_dir>/uploads/<user id or _anonymous>/<session id>/<name>``. A message
may name only files of its own session; tools read only inside the user's own area.

In a cluster (a PostgreSQL store) the store keeps every upload's bytes as well, and a
process's folder is its own copy: what it lacks, or holds in an older version, is fetched
before a message naming it is checked and before a run plays
(:meth:`~navi_trio.store.base.Store.local_uploads`). A file's version is its ``stamp``, the
modification time (ns) of the file the upload wrote: copies carry the same one.

The functions here are synchronous file-system work (call them through ``trio.to_thread``)
except :func:`save`, which puts the file and the store's copy together.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog
import trio

from .errors import NaviError, StoreError

if TYPE_CHECKING:
    from .store.base import Store

log = structlog.get_logger("navi_trio.uploads")

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


def is_safe(name: str) -> bool:
    """Whether :func:`safe_name` takes ``name``."""
    try:
        safe_name(name)
    except BadUpload:
        return False
    return True


def user_area(data_dir: Path, user_id: str | None) -> Path:
    return data_dir / "uploads" / (user_id or ANONYMOUS_DIR)


def session_dir(data_dir: Path, user_id: str | None, session_id: str) -> Path:
    return user_area(data_dir, user_id) / session_id


def public_path(session_id: str, name: str) -> str:
    """The ``path`` a client gets back and names in a message."""
    return f"uploads/{session_id}/{name}"


def write_temp(folder: Path, body: bytes) -> tuple[Path, int]:
    """``body`` in a new hidden temp file in ``folder`` (created if need be); the file and
    its ``stamp`` (modification time in ns, set from the clock's nanoseconds: the kernel's
    own file times tick in milliseconds). Raises ``OSError``; nothing is left then."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        now = time.time_ns()
        os.utime(tmp, ns=(now, now))
        return Path(tmp), os.stat(tmp).st_mtime_ns
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def put_in_place(tmp: Path, target: Path) -> None:
    """Rename a temp file of :func:`write_temp` (or of a fetch) to its name; on failure
    the temp file is removed. Raises ``OSError``."""
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def save(
    store: Store, data_dir: Path, user_id: str | None, session_id: str, name: str, body: bytes
) -> dict[str, str]:
    """Save an upload for every process: the file in this process's data dir and, when the
    store keeps uploads (PostgreSQL), its bytes there too, before the file takes its name,
    so a refused copy leaves the old version in both places. ``body`` is written from the
    one copy the caller holds. Returns ``{"name", "path"}``.

    Raises ``OSError`` (the disk cannot take it), :class:`~navi_trio.errors.SessionGone`
    (the session was deleted meanwhile) or :class:`~navi_trio.errors.StoreError`.
    Cancellation: the file work runs in a worker thread that is waited for; a cancel while
    the store copies it leaves the temp file, which is then removed.
    """
    name = safe_name(name)
    folder = session_dir(data_dir, user_id, session_id)
    tmp, stamp = await trio.to_thread.run_sync(write_temp, folder, body)
    try:
        await store.keep_upload(session_id, name, body, stamp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a quick local unlink, also when cancelled
        raise
    await trio.to_thread.run_sync(put_in_place, tmp, folder / name)
    return {"name": name, "path": public_path(session_id, name)}


def rerooted(folder: Path, data_dir: Path) -> Path:
    """A session's upload folder as another process named it (a message checked there,
    queued, played here), under this process's ``data_dir``: the layout below the data
    dir is the same on every process."""
    return data_dir / "uploads" / folder.parent.name / folder.name


def is_fresh(path: Path, size: int, stamp: int) -> bool:
    """Whether ``path`` is a regular file holding the upload version ``(size, stamp)``."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_mtime_ns == stamp


def stale(folder: Path, versions: Iterable[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Those of ``versions`` (name, size, stamp) that ``folder`` lacks or holds in
    another version."""
    return [v for v in versions if not is_fresh(folder / v[0], v[1], v[2])]


def fetch_into(folder: Path, name: str, stamp: int, chunks: Iterable[bytes]) -> None:
    """Write a fetched upload into ``folder`` atomically (temp file, then rename), stamped
    with its version. Raises ``OSError``, or :class:`BadUpload` for a name that is not
    plain (nothing is written then)."""
    target = folder / safe_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.utime(tmp, ns=(stamp, stamp))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    put_in_place(Path(tmp), target)


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


def session_folders(data_dir: Path) -> list[Path]:
    """Every session's upload folder in ``data_dir``."""
    root = data_dir / "uploads"
    if not root.is_dir():
        return []
    return [f for area in root.iterdir() if area.is_dir() for f in area.iterdir() if f.is_dir()]


def remove_folders(folders: Iterable[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


async def sweep_forever(store: Store, interval_s: float) -> None:
    """Every ``interval_s``, remove this process's copies of the uploads of sessions
    deleted on another process of a cluster (:meth:`~navi_trio.store.base.Store.sweep_uploads`);
    a store fault is logged and the next sweep tries again. Cancellation: ends the loop;
    a sweep in its worker thread is abandoned (it only removes what is gone)."""
    while True:
        try:
            removed = await store.sweep_uploads()
        except StoreError as exc:
            log.warning("upload.sweep_failed", error=str(exc))
        else:
            if removed:
                log.info("upload.swept", sessions=removed)
        await trio.sleep(interval_s)


def delete_session_uploads(data_dir: Path, user_id: str | None, session_id: str) -> None:
    """Remove a deleted session's upload folder (and everything in it)."""
    shutil.rmtree(session_dir(data_dir, user_id, session_id), ignore_errors=True)

"""The stores' part of uploads (``Store.keep_upload``, ``Store.local_uploads``).

PostgreSQL keeps every upload's bytes, so a process whose data dir lacks a file (it was
uploaded to another process of a cluster) fetches it; SQLite and the memory store serve
one process, whose data dir holds every upload: they keep nothing and fetch nothing.
Real stores throughout (PostgreSQL: a real server, see ``tests/pg.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
import trio

from navi_trio import uploads
from navi_trio.errors import SessionGone
from navi_trio.store import Store
from navi_trio.store.postgres import FETCH_CHUNK, PostgresStore

from .pg import opened_store

single_process = pytest.mark.parametrize("store_kind", ["sqlite", "memory"], indirect=True)


def folder_of(root: Path, sid: str) -> Path:
    return uploads.session_dir(root, None, sid)


async def saved(store: Store, root: Path, sid: str, name: str, body: bytes) -> Path:
    """An upload as the upload route saves it: the file in ``root`` and the store's copy."""
    await uploads.save(store, root, None, sid, name, body)
    return folder_of(root, sid) / name


@single_process
async def test_a_store_of_one_process_keeps_nothing_and_fetches_nothing(any_store: Store, tmp_path: Path) -> None:
    store = any_store
    with trio.fail_after(10):
        await store.create_session("s1", "t", None)
        path = await saved(store, tmp_path / "a", "s1", "notes.txt", b"mine")
        assert path.read_bytes() == b"mine"
        elsewhere = folder_of(tmp_path / "b", "s1")
        assert await store.local_uploads(elsewhere, "s1") == elsewhere
        assert await store.local_uploads(elsewhere, "s1", ["notes.txt"]) == elsewhere
        assert not elsewhere.exists()


async def test_postgres_gives_another_data_dir_what_it_lacks(database_url: str, tmp_path: Path) -> None:
    big = os.urandom(2 * FETCH_CHUNK + 17)  # fetched in three slices
    with trio.fail_after(20):
        async with opened_store(database_url, tmp_path) as store:
            await store.create_session("s1", "t", None)
            await store.create_session("s2", "t", None)
            await saved(store, tmp_path / "a", "s1", "notes.txt", b"line\n\x00\xff")
            await saved(store, tmp_path / "a", "s1", "big.bin", big)
            await saved(store, tmp_path / "a", "s2", "other.txt", b"not s1's")
            here = folder_of(tmp_path / "b", "s1")
            assert await store.local_uploads(here, "s1", ["notes.txt"]) == here
            assert sorted(p.name for p in here.iterdir()) == ["notes.txt"]  # only what was named
            assert (here / "notes.txt").read_bytes() == b"line\n\x00\xff"
            await store.local_uploads(here, "s1")
            assert sorted(p.name for p in here.iterdir()) == ["big.bin", "notes.txt"]  # no temp file left
            assert (here / "big.bin").read_bytes() == big


async def test_postgres_fetches_a_copy_once_and_again_when_replaced(database_url: str, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with opened_store(database_url, tmp_path) as store:
            await store.create_session("s1", "t", None)
            await saved(store, tmp_path / "a", "s1", "notes.txt", b"first")
            here = folder_of(tmp_path / "b", "s1")
            await store.local_uploads(here, "s1")
            copy = here / "notes.txt"
            inode = copy.stat().st_ino
            await store.local_uploads(here, "s1")
            assert copy.stat().st_ino == inode  # fresh: not written again
            await saved(store, tmp_path / "a", "s1", "notes.txt", b"other")  # same size, new version
            await store.local_uploads(here, "s1")
            assert copy.read_bytes() == b"other"


async def test_postgres_puts_copies_under_its_own_data_dir(database_url: str, tmp_path: Path) -> None:
    """A queued message carries the folder the process that checked it named: the process
    playing it fetches into its own data dir, in the same layout."""
    with trio.fail_after(20):
        async with opened_store(database_url, tmp_path) as writer:
            await writer.create_session("s1", "t", None)
            await saved(writer, tmp_path / "a", "s1", "notes.txt", b"mine")
        store = await PostgresStore.open(database_url, data_dir=tmp_path / "b")
        try:
            got = await store.local_uploads(folder_of(tmp_path / "a", "s1"), "s1")
        finally:
            store.close()
    assert got == folder_of(tmp_path / "b", "s1")
    assert (got / "notes.txt").read_bytes() == b"mine"


async def test_postgres_deleting_a_session_deletes_its_uploads(database_url: str, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with opened_store(database_url, tmp_path) as store:
            await store.create_session("s1", "t", None)
            await saved(store, tmp_path / "a", "s1", "notes.txt", b"mine")
            assert await store.delete_session("s1")
            here = folder_of(tmp_path / "b", "s1")
            await store.local_uploads(here, "s1")
            assert not here.exists()
            with pytest.raises(SessionGone):  # an upload racing its session's DELETE
                await saved(store, tmp_path / "a", "s1", "late.txt", b"late")
    assert not (folder_of(tmp_path / "a", "s1") / "late.txt").exists()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM uploads").fetchone() == (0,)

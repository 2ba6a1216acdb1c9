#!/usr/bin/env python3
"""What a store call costs, SQLite against PostgreSQL, as the run registry makes them.

Each round plays one run's calls on each store in turn (interleaved, so machine noise
hits both alike): ``begin_runs`` of one run, a ``checkpoint`` of 20 running answers
(the server's 0.5 s tick with 20 streaming sessions), ``save_answer``, ``list_messages``
of a 10-message session and an uncached ``get_session`` (a new id). It prints the median
and p99 wall time per call in ms, measured from the event loop (worker-thread hop
included). PostgreSQL is a throw-away server on loopback started as the tests start it
(``tests/pg.py``: fsync off, so this is the call path, not the disk).

    python bench/store_calls.py --rounds 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from navi_trio.store import Answer, NewRun, SqliteStore, Store  # noqa: E402
from navi_trio.store.postgres import PostgresStore  # noqa: E402
from tests.pg import running_postgres  # noqa: E402

T0 = "2026-01-01T00:00:00.000Z"


def new_run(sid: str) -> NewRun:
    return NewRun(sid, uuid.uuid4().hex, "question " * 20, uuid.uuid4().hex, T0)


async def timed(out: list[float], call: Callable[[], Awaitable[object]]) -> None:
    t0 = trio.current_time()
    await call()
    out.append((trio.current_time() - t0) * 1000)


async def prepare(store: Store) -> tuple[list[NewRun], str]:
    runs = []
    for i in range(20):
        await store.create_session(f"live{i}", "t", None)
        runs.append(new_run(f"live{i}"))
    await store.begin_runs(runs)
    await store.create_session("history", "t", None)
    for _ in range(5):
        r = new_run("history")
        await store.begin_run(r)
        await store.save_answer(Answer(r.answer_id, "history", "complete", "answer " * 50, "", []))
    await store.create_session("runs", "t", None)
    return runs, "history"


async def one_round(store: Store, live: list[NewRun], history: str, times: dict[str, list[float]]) -> None:
    run = new_run("runs")
    text = "word " * 100
    answers = [Answer(r.answer_id, r.session_id, "running", text, "", []) for r in live]
    await timed(times["begin_runs"], lambda: store.begin_runs([run]))
    await timed(times["checkpoint(20)"], lambda: store.checkpoint(answers))
    await timed(
        times["save_answer"],
        lambda: store.save_answer(Answer(run.answer_id, "runs", "complete", text, "", [])),
    )
    await timed(times["list_messages(10)"], lambda: store.list_messages(history))
    await timed(times["get_session(miss)"], lambda: store.get_session(uuid.uuid4().hex))


async def main(rounds: int, url: str, data: Path) -> None:
    async with await SqliteStore.open(data / "navi.sqlite3") as sqlite, await PostgresStore.open(url) as pg:
        stores: dict[str, Store] = {"sqlite": sqlite, "postgres": pg}
        prepared = {name: await prepare(s) for name, s in stores.items()}
        times = {name: {k: [] for k in CALLS} for name in stores}
        for _ in range(rounds):
            for name, s in stores.items():
                await one_round(s, *prepared[name], times[name])
    print(f"{'call':<20} {'sqlite p50':>11} {'p99':>7} {'postgres p50':>13} {'p99':>7}   (ms, {rounds} rounds)")
    for call in CALLS:
        row = [call]
        for name in stores:
            xs = sorted(times[name][call])
            row += [f"{statistics.median(xs):.3f}", f"{xs[int(len(xs) * 0.99) - 1]:.3f}"]
        print(f"{row[0]:<20} {row[1]:>11} {row[2]:>7} {row[3]:>13} {row[4]:>7}")


CALLS = ["begin_runs", "checkpoint(20)", "save_answer", "list_messages(10)", "get_session(miss)"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with running_postgres() as server, server.database() as url, tempfile.TemporaryDirectory() as tmp:
        trio.run(main, args.rounds, url, Path(tmp))

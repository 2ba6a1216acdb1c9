"""Time the event loop's scheduler passes of a server under load: the time from one I/O
wait to the next (the tasks run in between), for passes longer than 2 ms.

Run as the candidate of ``compare.py``, so the load is the benchmark's own, with the
Python of a venv that has navi-trio installed (``just install`` makes ``.venv``):

    python bench/compare.py --reps 1 --only 6_c200_paced \\
        --server-cmd "$PWD/.venv/bin/python bench/pass_time.py navi {port}"
    python bench/compare.py --reps 1 --only 6_c200_paced \\
        --server-cmd "$PWD/.venv/bin/python bench/pass_time.py floor {port}"

``navi`` serves navi-trio (as ``navi-trio serve``, SQLite in a temporary directory);
``floor`` serves ``bench/floor_app.py:app`` (inline sends) on hypercorn's trio worker. Each
writes its summary to ``$TMPDIR/pass_time-<kind>-<port>.json``: the count of loaded passes,
their p50/p90/p99 in ms, and the p50/p90 of task steps per pass.

Why: in scenario 6 an event's latency is a number of scheduler passes times the length
of a pass. An inline send reaches the socket one pass after its stamp; navi-trio's
handoff from the run task to the connection's writer adds one (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

LOADED_S = 0.002


class PassTimer(trio.abc.Instrument):
    """Records each pass that ran tasks for longer than ``LOADED_S``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.start: float | None = None
        self.steps = 0
        self.durations: list[float] = []
        self.steps_per_pass: list[int] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def after_io_wait(self, timeout: float) -> None:
        self.start = time.perf_counter()
        self.steps = 0

    def before_io_wait(self, timeout: float) -> None:
        if self.start is not None:
            took = time.perf_counter() - self.start
            if took > LOADED_S:
                self.durations.append(took)
                self.steps_per_pass.append(self.steps)
                if len(self.durations) % 200 == 1:
                    self.dump()  # the server may be killed: keep the file current

    def dump(self) -> None:
        if not self.durations:
            return
        d, s = sorted(self.durations), sorted(self.steps_per_pass)

        def pct(a: list, q: float) -> float:
            return a[min(len(a) - 1, int(q * len(a)))]

        summary = {
            "loaded_passes": len(d),
            "p50_ms": round(pct(d, 0.5) * 1e3, 2),
            "p90_ms": round(pct(d, 0.9) * 1e3, 2),
            "p99_ms": round(pct(d, 0.99) * 1e3, 2),
            "steps_p50": pct(s, 0.5),
            "steps_p90": pct(s, 0.9),
        }
        self.out.write_text(json.dumps(summary))


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    timer = PassTimer(Path(tempfile.gettempdir()) / f"pass_time-{kind}-{port}.json")
    try:
        if kind == "navi":
            from navi_trio.logs import configure_logging
            from navi_trio.server import serve
            from navi_trio.settings import Settings

            data = tempfile.mkdtemp(prefix="pass_time-")
            settings = Settings.from_env(host="127.0.0.1", port=port, data_dir=data, log_level="warning")
            configure_logging(settings.log_format, settings.log_level)
            trio.run(partial(serve, settings), instruments=[timer])
        elif kind == "floor":
            from hypercorn.config import Config
            from hypercorn.trio import serve as hypercorn_serve

            sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))
            from bench.floor_app import app

            config = Config()
            config.bind = [f"127.0.0.1:{port}"]

            async def floor() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(partial(hypercorn_serve, app, config))  # type: ignore[arg-type]
                        async for _ in signals:
                            nursery.cancel_scope.cancel()
                            break

            trio.run(floor, instruments=[timer])
        else:
            sys.exit(f"usage: {sys.argv[0]} navi|floor PORT")
    finally:
        timer.dump()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Run the benchmark harness (``bench/harness/compare.py``) against this checkout.

It interleaves the seed's asyncio baseline (uvicorn) and navi-trio, each on a fresh
server process, and prints each scenario's ratio navi-trio / baseline (lower is better).

    python bench/compare.py --reps 3            # every scenario
    python bench/compare.py --only 4_stop_latency 6_c200_paced

The baseline's own dependencies (fastapi, uvicorn, websockets, httpx) are installed into
``.venv-bench`` on first use. navi-trio runs from the current interpreter's environment
with the SQLite store in a fresh temporary data directory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The benchmark harness: load generator, scenario matrix and the seed's asyncio baseline.
HARNESS = ROOT / "bench" / "harness"
BENCH_VENV = ROOT / ".venv-bench"
BASELINE_DEPS = ["fastapi", "uvicorn[standard]", "websockets", "httpx"]


def baseline_python() -> Path:
    py = BENCH_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *BASELINE_DEPS], check=True)
    return py


def main() -> int:
    compare = HARNESS / "compare.py"
    navi = Path(sys.executable).parent / "navi-trio"
    data = Path(tempfile.mkdtemp(prefix="navi-bench-"))
    server_cmd = f"{navi} serve --host 127.0.0.1 --port {{port}} --data-dir {data}/{{port}} --log-level warning"
    py = baseline_python()
    try:
        return subprocess.run(
            [str(py), str(compare), "--server-cmd", server_cmd, "--cwd", str(ROOT), *sys.argv[1:]],
            cwd=HARNESS,
        ).returncode
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

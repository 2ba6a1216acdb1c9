"""How fast an SSE client gets a run's answer, next to a WebSocket client (issue #14).

Starts a real server (memory store) in this process, plays a scripted answer of N word
deltas, and times request-to-end for ``POST /api/chat``, ``POST /ag-ui`` and the
WebSocket. Also counts how many text parts a reader that reads nothing until the run is
over gets (the catch-up from the run's log merges deltas). Prints one JSON line.

    .venv/bin/python bench/sse_stream.py [--deltas 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import Server, open_server, script


async def sse_seconds(server: Server, path: str, body: dict[str, object]) -> tuple[float, int]:
    t0 = trio.current_time()
    parts = 0
    async with server.http.stream("POST", path, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                parts += 1
    return trio.current_time() - t0, parts


async def ws_seconds(server: Server, steps: str) -> float:
    sid = await server.new_session()
    async with server.connect(sid) as ws:
        await ws.recv()
        t0 = trio.current_time()
        await ws.send_message(steps)
        await ws.until_terminal()
        return trio.current_time() - t0


def chat_body(sid: str, text: str) -> dict[str, object]:
    return {"id": sid, "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": text}]}]}


async def main(deltas: int, rounds: int) -> None:
    steps = script({"text": "word ", "repeat": deltas})
    out: dict[str, object] = {"deltas": deltas, "rounds": rounds}
    async with open_server() as server:
        times: dict[str, list[float]] = {"ai_sdk": [], "ag_ui": [], "websocket": []}
        for i in range(rounds):
            times["ai_sdk"].append((await sse_seconds(server, "/api/chat", chat_body(f"b{i}", steps)))[0])
            ag = {"threadId": f"a{i}", "runId": "r", "messages": [{"id": "u", "role": "user", "content": steps}]}
            times["ag_ui"].append((await sse_seconds(server, "/ag-ui", ag))[0])
            times["websocket"].append(await ws_seconds(server, steps))
            await server.no_run_left()
        out["median_s"] = {k: round(statistics.median(v), 4) for k, v in times.items()}
        # A reader that reads nothing until the run is over and saved.
        async with server.http.stream("POST", "/api/chat", json=chat_body("late", steps)) as r:
            await server.registry.wait_idle()
            late = [line async for line in r.aiter_lines() if '"text-delta"' in line]
        out["late_reader_text_deltas"] = len(late)
    print(json.dumps(out))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--deltas", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    trio.run(main, args.deltas, args.rounds)

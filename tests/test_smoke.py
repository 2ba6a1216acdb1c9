from __future__ import annotations

import trio

from .helpers import Server, assert_grammar, script, text_of


async def test_scripted_run_end_to_end(server: Server) -> None:
    with trio.fail_after(10):
        sid = await server.new_session()
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            # Paced, so that no delta waits behind another (a burst may arrive merged).
            await c.send_message(script({"think": "hmm"}, {"text": "ab", "repeat": 3, "delay": 0.05}))
            got = await c.until_terminal()
        assert_grammar(got, merged=False)
        assert got[-1] == {"type": "stream_end", "seq": got[-1]["seq"], "content": "ababab"}
        assert text_of(got) == "ababab"
        r = await server.http.get(f"/sessions/{sid}/messages")
        msgs = r.json()
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert msgs[1]["status"] == "complete" and msgs[1]["content"] == "ababab"


async def test_virtual_time_heartbeat(autojump_clock: trio.testing.MockClock) -> None:
    from .helpers import open_server

    async with open_server(heartbeat_s=15.0) as server:
        sid = await server.new_session()
        async with server.connect(sid) as c:
            assert (await c.recv())["type"] == "session_sync"
            t0 = trio.current_time()
            assert (await c.recv())["type"] == "heartbeat"
            assert trio.current_time() - t0 == 15.0

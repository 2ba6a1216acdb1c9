"""The fault matrix's state machine: Hypothesis drives a session through {send, stop,
disconnect, reconnect at a seq, open a tab, advance time, store fault} and every step is
checked against a small reference model of the contract.

The session lives in a real RunRegistry (memory store with a fault switch, virtual time);
each tab is a client: an outbox plus the catch-up a connection's writer does
(``Subscriber.next_catch_up_frame``). Hypothesis draws each next operation from the ones
the model allows in its current state (``st.data()``), in a fresh trio run per example,
and shrinks a failure to the shortest sequence of operations.

The model knows the script (N text deltas, one a second), when each run started, and
what was done to it; from that it says which terminal events a run may end with, whether
a run must (or may) be active, and what every tab must have seen: the run's log from the
point it joined (start, attach or resume), no gap, no duplicate, one terminal event.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any, Final

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from navi_trio.agents.scripted import ScriptedAgent
from navi_trio.broker import InProcessBroker
from navi_trio.errors import RunAlreadyActive
from navi_trio.events import TERMINAL_TYPES, Event, check_grammar
from navi_trio.fanout import Subscriber
from navi_trio.lifecycle import Run, RunRequest
from navi_trio.runs import RunRegistry
from navi_trio.testing._stage import FaultyStore

from .helpers import script

SID: Final = "s1"
N: Final = 4
DELAY: Final = 1.0
SCRIPT: Final = script({"text": "w ", "repeat": N, "delay": DELAY})
#: Time steps are multiples of 0.5 and the deltas come on whole seconds from a run's
#: start: an operation lands either clearly before or after a delta, or exactly on it
#: (the model then allows both orders).
STEPS: Final = (0.5, 1.0, 1.5, 3.0)
CHECKPOINT_S: Final = 0.25
MAX_OPS: Final = 14


class Tab:
    """One client: follows the session, gets every frame its outbox is offered, and
    catches up lagging subscriptions as a connection's writer does."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lagging: list[Subscriber] = []
        self.closed = False
        self.subs: list[Subscriber] = []
        #: run id -> (the seq it joined after, the frames it got)
        self.seen: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._current: str | None = None

    # Outbox
    def offer(self, frame: Event | str) -> bool:
        if self.closed:
            return False
        self._take(frame.wire if isinstance(frame, Event) else frame)
        return True

    def wake(self) -> None:
        pass

    def fall_behind(self, sub: Subscriber) -> None:
        self.lagging.append(sub)

    @property
    def behind(self) -> bool:
        return bool(self.lagging)

    # Follower
    @property
    def user_id(self) -> str | None:
        return None

    def run_started(self, run: Run) -> None:
        self.join(run, 0)
        self.subs.append(run.subscribe(self))

    def request_close(self, code: int, reason: str) -> None:
        self.closed = True

    def join(self, run: Run, after: int) -> None:
        self.seen[run.id] = (after, [])
        self._current = run.id

    def _take(self, wire: str) -> None:
        obj = json.loads(wire)
        if obj["type"] == "stream_start":
            self._current = obj["run_id"]
        if "seq" in obj and self._current is not None:
            self.seen[self._current][1].append(obj)

    def pump(self) -> None:
        """Write what the lagging subscriptions still need (a connection's writer)."""
        while self.lagging and not self.closed:
            sub = self.lagging[0]
            frame = sub.next_catch_up_frame()
            if frame is None:
                self.lagging.pop(0)
            else:
                self._current = sub.run.id
                self._take(frame)

    def last_seq(self, run_id: str) -> int:
        frames = self.seen.get(run_id, (0, []))[1]
        return frames[-1]["seq"] if frames else self.seen.get(run_id, (0, []))[0]


@attrs.define
class ModelRun:
    """What the model knows of one run."""

    start: float
    #: Terminal events the run may end with, narrowed as things happen to it.
    may_end: set[str]
    stop_at: float | None = None
    faulted: bool = False
    #: Sent while the store failed: its user message was never saved, so no answer is.
    never_saved: bool = False

    @property
    def end(self) -> float:
        """When the last delta is due (the run completes at once after it)."""
        return self.start + (N - 1) * DELAY


@attrs.define
class Model:
    """The reference model: time, the session's runs, the store's health."""

    now: float = 0.0
    runs: list[ModelRun] = attrs.Factory(list)
    failing: bool = False

    def must_be_active(self, run: ModelRun) -> bool:
        return run.stop_at is None and not run.faulted and self.now < run.end

    def must_be_over(self, run: ModelRun) -> bool:
        return run.stop_at is not None or self.now > run.end

    def stopped(self, run: ModelRun) -> None:
        """A stop while the run may be active: it ends stopped, or (stop exactly on its
        last delta) complete."""
        run.stop_at = self.now
        if self.now < run.end:  # no more complete; a fault already armed may still win
            run.may_end = {"stream_stopped"} | (run.may_end & {"error"})
        elif self.now == run.end:
            run.may_end = run.may_end | {"stream_stopped"}


class Session:
    """The implementation under test, and the model beside it."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.store = FaultyStore()
        self.registry = RunRegistry(
            nursery, self.store, ScriptedAgent(), broker=InProcessBroker(), save_timeout_s=2.0, max_queued_runs=2
        )
        self.model = Model()
        self.tabs: list[Tab] = []
        self.runs: list[Run] = []
        self.log: list[str] = []

    def open_tab(self, attach: bool = True) -> Tab:
        tab = Tab(f"tab{len(self.tabs)}")
        self.tabs.append(tab)
        active = self.registry.follow(SID, tab)
        if active is not None and attach:
            tab.join(active, 0)
            tab.subs.append(active.subscribe(tab, replay=True))
        return tab

    def close_tab(self, tab: Tab) -> None:
        tab.closed = True
        self.registry.unfollow(SID, tab)
        for sub in tab.subs:
            sub.run.unsubscribe(sub)

    async def settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()
        for tab in self.tabs:
            tab.pump()

    def model_run(self, run: Run) -> ModelRun:
        return self.model.runs[self.runs.index(run)]

    def check_active(self) -> Run | None:
        """The active run as the registry says, checked against what the model allows."""
        active = self.registry.active(SID)
        if active is not None and active.log.finished:
            active = None  # over on the wire, only saving
        for run in self.runs:
            m = self.model_run(run)
            if run is active:
                assert not self.model.must_be_over(m), (self.log, m, self.model.now)
            else:
                assert not self.model.must_be_active(m), (self.log, m, self.model.now)
        return active


async def play(data: st.DataObject) -> None:
    async with trio.open_nursery() as nursery:
        s = Session(nursery)
        nursery.start_soon(s.registry.serve_checkpoints, CHECKPOINT_S)
        await s.store.create_session(SID, "t", None)
        s.open_tab()
        for _ in range(data.draw(st.integers(1, MAX_OPS), label="ops")):
            active = s.check_active()
            open_tabs = [t for t in s.tabs if not t.closed]
            closed_tabs = [t for t in s.tabs if t.closed and t.seen]
            ops = ["send", "advance", "store_fault", "open_tab"]
            if active is not None:
                ops.append("stop")
            if open_tabs:
                ops.append("disconnect")
            if closed_tabs:
                ops.append("reconnect")
            op = data.draw(st.sampled_from(ops), label="op")
            s.log.append(op)
            m = s.model
            if op == "send":
                try:
                    run = s.registry.submit(RunRequest(SID, None, SCRIPT, SCRIPT))
                except RunAlreadyActive:
                    assert active is not None, s.log
                else:
                    assert active is None, s.log
                    assert run is not None
                    s.runs.append(run)
                    # With the store failing, saving the user's message fails: an error at once.
                    may_end = {"error"} if m.failing else {"stream_end"}
                    m.runs.append(ModelRun(m.now, may_end, faulted=m.failing, never_saved=m.failing))
            elif op == "stop":
                assert active is not None
                assert s.registry.stop(SID, "user") is active
                m.stopped(s.model_run(active))
            elif op == "advance":
                dt = data.draw(st.sampled_from(STEPS), label="dt")
                await trio.sleep(dt)
                m.now += dt
                s.store.failing = m.failing = False  # a fault lasts until time has passed
            elif op == "store_fault":
                s.store.failing = m.failing = True
                if active is not None:
                    mr = s.model_run(active)
                    mr.faulted = True
                    mr.may_end |= {"error"}
            elif op == "open_tab":
                s.open_tab()
            elif op == "disconnect":
                s.close_tab(data.draw(st.sampled_from(open_tabs), label="tab"))
            elif op == "reconnect":
                old = data.draw(st.sampled_from(closed_tabs), label="tab")
                run_id = list(old.seen)[-1]
                after = data.draw(st.integers(0, old.last_seq(run_id)), label="after")
                tab = s.open_tab(attach=False)
                current = s.registry.active(SID)
                if current is not None and current.id == run_id and not current.log.finished:
                    tab.join(current, after)  # resume: only the events after `after`
                    tab.subs.append(current.subscribe(tab, after=after, replay=True))
            await s.settle()
        # Heal, let every run end, and check everything.
        s.store.failing = s.model.failing = False
        await trio.sleep(N * DELAY + 2)
        s.model.now += N * DELAY + 2
        await s.settle()
        assert s.registry.active(SID) is None
        check_everything(s)
        nursery.cancel_scope.cancel()


def check_everything(s: Session) -> None:
    saved = {m.id: m for m in s.store.messages[SID]}
    for run, m in zip(s.runs, s.model.runs, strict=True):
        log = [json.loads(e.wire) for e in run.log.events]
        check_grammar([(e["type"], e["seq"]) for e in log])
        terminal = log[-1]
        assert terminal["type"] in m.may_end, (s.log, m, terminal)
        if terminal["type"] == "stream_stopped":
            assert terminal["reason"] == "user"
        text = "".join(e["delta"] for e in log if e["type"] == "stream_delta")
        if terminal["type"] == "stream_end":
            assert text == "w " * N
        if m.never_saved:
            assert run.answer_id not in saved and terminal["type"] == "error", (s.log, terminal)
            assert "Storage error" in terminal["message"]
        else:
            answer = saved[run.answer_id]
            want = {"stream_end": "complete", "stream_stopped": "stopped", "error": "error"}[terminal["type"]]
            assert (answer.status, answer.content) == (want, text), (s.log, answer, terminal)
        for tab in s.tabs:
            if run.id not in tab.seen:
                continue
            after, frames = tab.seen[run.id]
            seqs = [f["seq"] for f in frames]
            assert seqs == sorted(set(seqs)), (tab.name, seqs)  # no duplicate, in order
            # A resume starts with stream_start (its seq 1), then only the events after `after`.
            later = [f["seq"] for f in frames if f["type"] != "stream_start"]
            assert all(q > after for q in later), (tab.name, after, seqs)
            assert [f["type"] for f in frames].count("stream_start") <= 1
            got = "".join(f["delta"] for f in frames if f["type"] == "stream_delta")
            upto = seqs[-1] if seqs else after
            want_text = "".join(e["delta"] for e in log if e["type"] == "stream_delta" and after < e["seq"] <= upto)
            assert got == want_text, (s.log, tab.name, after, got, want_text)  # no gap either
            terminals = [f for f in frames if f["type"] in TERMINAL_TYPES]
            assert len(terminals) <= 1
            if not tab.closed:
                assert terminals == [terminal], (s.log, tab.name, frames)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_contract_holds_in_every_sequence_of_operations(data: st.DataObject) -> None:
    trio.run(partial(play, data), clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(
    ("ops", "terminal"),
    [
        (["send", ("advance", 1.5), "stop"], "stream_stopped"),
        (["send", ("advance", 5.0)], "stream_end"),
        (["send", ("advance", 0.5), "store_fault", ("advance", 1.5)], "error"),
    ],
)
def test_the_model_and_the_machine_agree_on_plain_sequences(ops: list[Any], terminal: str) -> None:
    """Fixed sequences, so that the model's own predictions are seen to bite."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            s = Session(nursery)
            nursery.start_soon(s.registry.serve_checkpoints, CHECKPOINT_S)
            await s.store.create_session(SID, "t", None)
            s.open_tab()
            for op in ops:
                if op == "send":
                    run = s.registry.submit(RunRequest(SID, None, SCRIPT, SCRIPT))
                    assert run is not None
                    s.runs.append(run)
                    s.model.runs.append(ModelRun(s.model.now, {"stream_end"}))
                elif op == "stop":
                    s.registry.stop(SID, "user")
                    s.model.stopped(s.model.runs[-1])
                elif op == "store_fault":
                    s.store.failing = True
                    s.model.runs[-1].faulted = True
                    s.model.runs[-1].may_end |= {"error"}
                else:
                    await trio.sleep(op[1])
                    s.model.now += op[1]
                    s.store.failing = False
                await s.settle()
            await trio.sleep(10)
            await s.settle()
            check_everything(s)
            assert json.loads(s.runs[-1].log.events[-1].wire)["type"] == terminal
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

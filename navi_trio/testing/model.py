"""What :func:`~navi_trio.testing.check_agent` reports: cases, cut points, violations."""

from __future__ import annotations

from typing import Final, Literal

import attrs

CutPath = Literal["stop", "delete", "interrupt", "clients_gone", "shutdown", "store_fault"]
#: Every way a run can be cut short, as a client or the server would do it (CONTRACT 2, 3, 7).
CUT_PATHS: Final[tuple[CutPath, ...]] = ("stop", "delete", "interrupt", "clients_gone", "shutdown", "store_fault")
#: The stop reason each cancelling path must end the run with.
REASON_FOR: Final[dict[str, str]] = {"stop": "user", "delete": "deleted", "interrupt": "user", "shutdown": "shutdown"}

#: The checks, by name. Each is made on every case it applies to.
CHECKS: Final[dict[str, str]] = {
    "terminal": "exactly one terminal event, and it is the last",
    "grammar": "the events follow the contract grammar (and the agent's emits were all accepted)",
    "saved": "the saved answer equals the text delivered, with the status the terminal event gives",
    "after_cut": (
        "nothing is emitted after the cut once ``Cancelled`` has reached the task "
        "(it may run on to its next unshielded checkpoint)"
    ),
    "after_end": "nothing is emitted after the run ended",
    "honoured": "a stop ends the run stopped (or in error, for a store fault), not complete",
    "stop_budget": "the terminal event comes within the stop budget after the cut",
    "resources": "what the agent opened (model streams, probes) is closed within the stop budget",
    "tasks": "no task is left running once the run has ended",
    "ended": "the run ends at all (an agent blocked where a stop cannot reach is reported)",
    "runs_on": "every client gone does not stop the run: it ends as it would have",
    "kit": "the kit itself failed on this case",
}


@attrs.frozen
class CutPoint:
    """Where a case cuts: right after the agent's ``index``-th emit (``event``), right
    after its ``index``-th task step (``step``: a checkpoint it passed), or nowhere."""

    kind: Literal["none", "event", "step"]
    index: int = 0

    def __str__(self) -> str:
        if self.kind == "none":
            return "uncut"
        return f"after {self.kind} {self.index}"


UNCUT: Final = CutPoint("none")


@attrs.frozen
class Violation:
    """A check that failed, where, and a minimal trace: the frames around the cut."""

    check: str
    path: CutPath | None
    cut: CutPoint
    message: str
    trace: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f"{self.path or 'baseline'} {self.cut}"
        lines = [f"[{self.check}] {where}: {self.message}"]
        lines.extend(f"    {t}" for t in self.trace)
        return "\n".join(lines)


@attrs.frozen
class Case:
    """One play of the agent: a cut path and point, whether the cut was reached (a replay
    can take fewer steps), how the run ended, and what failed."""

    path: CutPath | None
    cut: CutPoint
    reached: bool
    terminal: str | None
    violations: tuple[Violation, ...]


class AgentCheckFailed(AssertionError):
    """Raised by :meth:`Report.raise_for_violations`; its message lists the violations."""


@attrs.define
class Report:
    """Everything :func:`~navi_trio.testing.check_agent` found.

    ``events`` and ``steps`` are what the uncut play counted (the cut points); ``cases``
    holds the uncut play first, then one case per cut path and point.
    """

    agent: str
    events: int = 0
    steps: int = 0
    cases: list[Case] = attrs.Factory(list)
    #: Cases given up on (the agent blocked where nothing could reach it); their tasks
    #: were left running, and no further cases were played.
    abandoned: int = 0

    @property
    def violations(self) -> list[Violation]:
        return [v for case in self.cases for v in case.violations]

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        bad = self.violations
        head = (
            f"{self.agent}: {len(self.cases)} cases ({self.events} events, {self.steps} steps), {len(bad)} violations"
        )
        if not bad:
            return head
        by_check: dict[str, int] = {}
        for v in bad:
            by_check[v.check] = by_check.get(v.check, 0) + 1
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(by_check.items()))
        firsts: dict[str, Violation] = {}
        for v in bad:
            firsts.setdefault(v.check, v)
        return "\n".join([f"{head} ({counts}); the first of each:", *(str(v) for v in firsts.values())])

    def raise_for_violations(self) -> None:
        """Raise :class:`AgentCheckFailed` (an ``AssertionError``) if any check failed."""
        if self.violations or self.abandoned:
            raise AgentCheckFailed(self.summary())

"""One answer as the terminal client has seen it, sans-IO.

Every run event carries a seq, and a replayed or merged event keeps the seq of the last
event it covers, so applying an event only when its seq is above the highest one applied
is what makes a resume lose and double nothing. :meth:`Answer.apply` turns an event into
what to print; :meth:`Answer.catch_up` does the same from the saved message when the run
ended while the client was away.
"""

from __future__ import annotations

import json
from typing import Any, Final

import attrs

#: What to print, in order: (kind, text). Kinds: ``text`` (the answer, stdout),
#: ``thinking``, ``thinking_end``, ``tool``, ``note`` (stderr).
Output = tuple[str, str]

TERMINAL: Final = frozenset({"stream_end", "stream_stopped", "error"})
_STOP_STATUS: Final = {"user": "stopped", "deleted": "stopped", "shutdown": "interrupted"}


@attrs.define
class Answer:
    run_id: str
    seq: int = 0
    text: str = ""
    #: ``complete``, ``stopped``, ``error`` or ``interrupted`` once the run has ended.
    status: str | None = None
    #: The error's message, or why it stopped.
    detail: str = ""
    _thinking: bool = False

    @property
    def ended(self) -> bool:
        return self.status is not None

    def apply(self, event: dict[str, Any]) -> list[Output]:
        """Apply one run event (``stream_start`` excluded); nothing for one already seen."""
        seq = event.get("seq")
        if self.ended or not isinstance(seq, int) or seq <= self.seq:
            return []
        self.seq = seq
        kind = event.get("type")
        out: list[Output] = []
        if kind != "thinking_delta" and self._thinking:
            self._thinking = False
            out.append(("thinking_end", ""))
        if kind == "thinking_delta":
            self._thinking = True
            out.append(("thinking", str(event.get("delta", ""))))
        elif kind == "stream_delta":
            delta = str(event.get("delta", ""))
            self.text += delta
            out.append(("text", delta))
        elif kind == "tool_started":
            out.append(("tool", f"{_tool_name(event)}({_args(event.get('args'))}) …"))
        elif kind == "tool_call":
            mark = "→" if event.get("success", True) else "✗"
            out.append(("tool", f"{_tool_name(event)} {mark} {_short(event.get('result'))}"))
        elif kind == "context_compressed":
            out.append(("note", "(earlier messages were summarised to fit the model's context)"))
        elif kind in TERMINAL:
            content = event.get("content")
            if isinstance(content, str) and content.startswith(self.text) and len(content) > len(self.text):
                out.append(("text", content[len(self.text) :]))  # the log's own text is the truth
                self.text = content
            if kind == "stream_end":
                self.status = "complete"
            elif kind == "stream_stopped":
                reason = str(event.get("reason", "user"))
                self.status = _STOP_STATUS.get(reason, "stopped")
                self.detail = reason
            else:
                self.status = "error"
                self.detail = str(event.get("message", ""))
        return out

    def catch_up(self, saved: dict[str, Any]) -> list[Output]:
        """End from the saved answer (the run ended while the connection was down):
        print only the text not printed yet."""
        content = str(saved.get("content") or "")
        out: list[Output] = []
        if self._thinking:
            self._thinking = False
            out.append(("thinking_end", ""))
        if content.startswith(self.text) and len(content) > len(self.text):
            out.append(("text", content[len(self.text) :]))
            self.text = content
        self.status = str(saved.get("status") or "interrupted")
        if self.status == "running":  # cannot be: an answer in the history has ended
            self.status = "interrupted"
        return out


def _tool_name(event: dict[str, Any]) -> str:
    name = str(event.get("tool", "tool"))
    return f"{name} (sub-agent)" if event.get("is_subagent") else name


def _args(args: Any) -> str:
    if not args:
        return ""
    return _short(json.dumps(args, ensure_ascii=False), 120)


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

"""How the terminal client prints: the answer's text to stdout as it streams; thinking,
tool calls and notes to stderr, dimmed when stderr is a terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TextIO

if TYPE_CHECKING:
    from .answer import Answer, Output

DIM: Final = "\x1b[2m"
BOLD_RED: Final = "\x1b[1;31m"
YELLOW: Final = "\x1b[33m"
RESET: Final = "\x1b[0m"

_ENDINGS: Final = {
    "stopped": ("[stopped]", YELLOW),
    "interrupted": ("[interrupted: the server was restarting]", YELLOW),
    "error": ("[error]", BOLD_RED),
}


class Printer:
    """Owns both output streams and where their cursor is, so that a line on stderr
    never lands in the middle of the answer's line when both go to one terminal."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self.color = err.isatty()
        self._shared = out.isatty() and err.isatty()
        self._out_mid_line = False
        self._err_mid_line = False

    def _err_write(self, text: str, style: str = DIM) -> None:
        if self.color and text.strip():
            text = f"{style}{text}{RESET}"
        self.err.write(text)
        self.err.flush()

    def _err_line(self, line: str, style: str = DIM) -> None:
        if self._shared and self._out_mid_line:
            self.out.write("\n")
            self.out.flush()
            self._out_mid_line = False
        if self._err_mid_line:
            self._err_write("\n")
        self._err_write(line + "\n", style)
        self._err_mid_line = False

    def emit(self, outputs: list[Output]) -> None:
        for kind, text in outputs:
            if kind == "text":
                if self._err_mid_line:
                    self._err_write("\n")
                    self._err_mid_line = False
                self.out.write(text)
                self.out.flush()
                if text:
                    self._out_mid_line = not text.endswith("\n")
            elif kind == "thinking":
                if not self._err_mid_line:
                    if self._shared and self._out_mid_line:
                        self.out.write("\n")
                        self._out_mid_line = False
                    self._err_write("thinking: ")
                self._err_write(text)
                self._err_mid_line = True if not text else not text.endswith("\n")
            elif kind == "thinking_end":
                if self._err_mid_line:
                    self._err_write("\n")
                self._err_mid_line = False
            elif kind == "tool":
                self._err_line(f"[tool] {text}")
            else:
                self._err_line(text)

    def end(self, answer: Answer) -> None:
        """After an answer: end its line on stdout, and say plainly how it ended if not well."""
        if self._out_mid_line:
            self.out.write("\n")
            self.out.flush()
            self._out_mid_line = False
        ending = _ENDINGS.get(answer.status or "")
        if ending is not None:
            label, style = ending
            if answer.status == "error" and answer.detail:
                label = f"[error: {answer.detail}]"
            elif answer.status == "stopped" and answer.detail == "deleted":
                label = "[stopped: the session was deleted]"
            self._err_line(label, style)

    def note(self, line: str) -> None:
        self._err_line(line)

    def problem(self, line: str) -> None:
        self._err_line(line, BOLD_RED)

    def prompt(self, text: str) -> None:
        if self._err_mid_line:
            self._err_write("\n")
            self._err_mid_line = False
        self.err.write(text)
        self.err.flush()

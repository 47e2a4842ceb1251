"""Progress of long loops on stderr: a redrawn line on a terminal, log lines elsewhere.

On a terminal the line is redrawn in place (carriage return). When stderr is a file or a pipe (CI,
``nohup``, ``| tee``), a redrawn line would be one unreadable run of ``\\r``, so a plain line is
printed instead: at the start, every ``every_s`` seconds, and at the end, each with the step count,
the time elapsed and the estimated time left.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import TextIO

# seconds between log lines when stderr is not a terminal ($DYC_PROGRESS_INTERVAL overrides)
DEFAULT_INTERVAL_S = 5.0


def _fmt_s(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m}:{s:02d} min" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d} h"


def stderr_is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class Progress:
    """``n`` of ``total`` steps done: ``update()`` after each step, ``close()`` (or ``with``) at the end."""

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, every_s: float | None = None,
                 terminal: bool | None = None):
        self.total, self.label, self.n = max(0, int(total)), label, 0
        self.stream = sys.stderr if stream is None else stream
        self.terminal = stderr_is_terminal(self.stream) if terminal is None else terminal
        if every_s is None:
            every_s = float(os.environ.get("DYC_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._closed = False
        self._drawn_n = -1  # the count last shown
        self._draw()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n = min(self.total, self.n + n)
        now = time.perf_counter()
        if self.terminal or now - self._last >= self.every_s:
            self._last = now
            self._draw()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.terminal:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        elif self._drawn_n != self.n:
            self._draw()

    def status(self) -> str:
        """``label: 12/50 (24%), 3.1 s elapsed, ETA 9.8 s``."""
        elapsed = time.perf_counter() - self.t0
        text = f"{self.label}: {self.n}/{self.total}"
        if self.total:
            text += f" ({self.n / self.total:.0%})"
        text += f", {_fmt_s(elapsed)} elapsed"
        if 0 < self.n < self.total:
            text += f", ETA {_fmt_s(elapsed / self.n * (self.total - self.n))}"
        return text

    def _draw(self) -> None:
        self._drawn_n = self.n
        if self.terminal:
            width = 24
            done = int(width * self.n / self.total) if self.total else width
            self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {self.status()}\033[K")
        else:
            self.stream.write(self.status() + "\n")
        self.stream.flush()


class PhaseLog:
    """Log lines of a multi-phase command, each prefixed with the time since it started.

    A message of the form ``"phase: unit i/n ..."`` (``calibration: step 3/10 (t=760)``,
    ``export: group 2/8 …``) also gets the phase's estimated time left, from its pace so far.
    """

    _STEP = re.compile(r"^([^:]+): \w+ (\d+)/(\d+)\b")

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.t0 = time.perf_counter()
        self._phase: tuple[str, int, float] | None = None  # (name, first i seen, time it was seen)

    def __call__(self, msg: str) -> None:
        now = time.perf_counter()
        eta = ""
        m = self._STEP.match(msg)
        if m:
            name, i, n = m.group(1), int(m.group(2)), int(m.group(3))
            if self._phase is None or self._phase[0] != name or i <= self._phase[1]:
                self._phase = (name, i, now)
            _, i0, s0 = self._phase
            if i0 < i < n:
                eta = f" (ETA {_fmt_s((now - s0) / (i - i0) * (n - i))})"
        else:
            self._phase = None
        stream = sys.stderr if self.stream is None else self.stream
        stream.write(f"[{_fmt_s(now - self.t0):>8}] {msg}{eta}\n")
        stream.flush()

"""Progress lines for long evaluation steps (generating samples, executing programs).

``Progress("generate", "samples")`` is a ``progress(done, total)`` callback: it prints
``[eval generate] 40/164 samples (24%), 1.3 samples/s, elapsed 0:00:31, ETA 0:01:34`` to stderr, at most once per
``every`` seconds, and always for the first and the last call (so a run shows it started, and how it ended).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_duration(seconds: float) -> str:
    """``H:MM:SS``."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """A ``progress(done, total)`` callback printing done/total, rate and ETA (see the module docstring)."""

    def __init__(self, step: str, unit: str, *, every: float = 10.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.step, self.unit, self.every = step, unit, every
        self.stream = stream
        self.clock = clock
        self.start = clock()
        self._last: float | None = None

    def line(self, done: int, total: int) -> str:
        elapsed = self.clock() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = format_duration((total - done) / rate) if rate > 0 else "?"
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        return (f"[eval {self.step}] {done}/{total} {self.unit}{pct}, {rate:.2f} {self.unit}/s, "
                f"elapsed {format_duration(elapsed)}, ETA {eta}")

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self._last is not None and done < total and now - self._last < self.every:
            return
        self._last = now
        print(self.line(done, total), file=self.stream or sys.stderr, flush=True)

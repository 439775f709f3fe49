"""Run one function over many indexed items with a concurrency limit, a progress bar and outcome counts,
writing every result to a :class:`~megaocto.instruct.resumable.ResumableOutput` as it completes.

``work(item) -> (outcome, row)``: ``outcome == "ok"`` rows go to the output, any other outcome to the rejected
file (with ``reason = outcome``); an exception that is a transient failure (``TeacherError(retryable=True)``) is
counted as ``failed`` and written nowhere, so a rerun retries the item. Any other exception stops the run (after
the items in flight are written).
"""
from __future__ import annotations

import collections
import concurrent.futures
import sys
import time
from typing import Callable, Iterable

from megaocto.instruct.resumable import ResumableOutput
from megaocto.instruct.teacher import TeacherError


class Progress:
    """A one-line progress display on stderr: done/total, rate, ETA, outcome counts (tqdm when available)."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.count, self.start, self._last = 0, time.monotonic(), 0.0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
            except ImportError:
                pass

    def update(self, counts: dict) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(counts, refresh=False)
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last > 1.0 or self.count == self.total:
            self._last = now
            rate = self.count / max(now - self.start, 1e-9)
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            print(f"\r{self.desc}: {self.count}/{self.total} {rate:.2f} it/s ETA {eta:.0f}s {counts}", end="",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def run_items(items: Iterable, total: int, work: Callable, out: ResumableOutput, *, concurrency: int = 8,
              desc: str = "items", progress: bool = True, outcomes: tuple[str, ...] = ("ok",)) -> collections.Counter:
    """Process ``items`` (each with an ``index`` attribute or key) not yet in ``out.done``; returns the counts of
    this run per outcome (plus ``failed``)."""
    counts: collections.Counter = collections.Counter({k: 0 for k in (*outcomes, "failed")})
    bar = Progress(total, desc, enabled=progress)
    first_error: BaseException | None = None
    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
        pending: set = set()
        it = iter(items)

        def fill():
            while len(pending) < 2 * max(1, concurrency):
                try:
                    item = next(it)
                except StopIteration:
                    return
                pending.add(pool.submit(work, item))

        fill()
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                pending.discard(fut)
                try:
                    outcome, row = fut.result()
                except TeacherError as e:
                    if not e.retryable:
                        first_error = first_error or e
                    counts["failed"] += 1
                    print(f"\n{desc}: {e}", file=sys.stderr)
                    bar.update(dict(counts))
                    continue
                except Exception as e:  # noqa: BLE001 - re-raised after the in-flight items are written
                    first_error = first_error or e
                    continue
                if outcome == "ok":
                    out.write(row, kept=True)
                else:
                    out.write(dict(row, reason=outcome), kept=False)
                counts[outcome] += 1
                bar.update(dict(counts))
            if first_error is None:
                fill()
    bar.close()
    if first_error is not None:
        raise first_error
    return counts

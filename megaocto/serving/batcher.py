"""Collects concurrent requests into shared decode batches (one worker thread owns the model).

Requests are queued as jobs (all rows of one HTTP request: prompts × n). The worker takes the first waiting job,
waits for more until none has arrived for ``batch_wait_s`` (at most ``10 · batch_wait_s``), and decodes every job that fits in ``max_batch`` rows together in one
:meth:`Engine.run` — one prefill and one forward per step for all of them. Jobs that arrive while a batch decodes
wait for the next batch. A job larger than ``max_batch`` rows is decoded alone in chunks of ``max_batch``.

Under tensor parallelism the worker of global rank 0 broadcasts each batch's rows to the other ranks, which run
:func:`follower_loop` (the same ``Engine.run``, so the collectives match); ``close`` sends them ``None`` to stop.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Callable

from megaocto.serving.engine import Engine, Event, RowRequest


@dataclasses.dataclass
class Job:
    rows: list[RowRequest]
    on_event: Callable[[int, Event], None] | None
    future: concurrent.futures.Future


def _broadcast(payload, pc):
    import torch.distributed as dist

    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Batcher:
    """See the module doc. ``submit`` is thread-safe; results come back through the returned future."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, batch_wait_s: float = 0.005, pc=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.engine, self.max_batch, self.batch_wait_s = engine, max_batch, batch_wait_s
        self.distributed = pc is not None and pc.world_size > 1
        self.pc = pc
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self.batches_run = 0  # decode batches so far (stats for /health and tests)
        self.rows_run = 0
        self.max_rows_in_batch = 0
        self._thread = threading.Thread(target=self._loop, name="megaocto-batcher", daemon=True)
        self._thread.start()

    def submit(self, rows: list[RowRequest], on_event=None) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("the server is shutting down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(Job(rows, on_event, fut))
        return fut

    def close(self, timeout: float = 60.0) -> None:
        """Stop after the queued jobs; tell the other TP ranks to stop."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _take(self) -> tuple[list[Job], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, rows = [first], len(first.rows)
        # wait until no request has arrived for batch_wait_s (a burst of clients lands in one batch), at most
        # 10 * batch_wait_s after the first
        now = time.monotonic()
        deadline, cap = now + self.batch_wait_s, now + 10 * self.batch_wait_s
        stop = False
        while rows < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, min(deadline, cap) - time.monotonic()))
            except queue.Empty:
                break
            deadline = time.monotonic() + self.batch_wait_s
            if job is None:
                stop = True
                break
            if rows + len(job.rows) > self.max_batch:
                self._queue.put(job)  # next batch (order among waiting jobs may change; each is answered)
                break
            jobs.append(job)
            rows += len(job.rows)
        return jobs, stop

    def _loop(self) -> None:
        try:
            while True:
                jobs, stop = self._take()
                if jobs:
                    self._run(jobs)
                if stop:
                    # answer anything still queued, then stop
                    while True:
                        try:
                            job = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if job is not None:
                            self._run([job])
                    break
        finally:
            if self.distributed:
                _broadcast(None, self.pc)

    def _run(self, jobs: list[Job]) -> None:
        rows = [r for job in jobs for r in job.rows]
        owners = [(j, k) for j, job in enumerate(jobs) for k in range(len(job.rows))]
        results = []
        try:
            for start in range(0, len(rows), self.max_batch):
                chunk = rows[start:start + self.max_batch]
                if self.distributed:
                    _broadcast(chunk, self.pc)

                def on_event(i, event, _s=start):
                    j, k = owners[_s + i]
                    if jobs[j].on_event is not None:
                        jobs[j].on_event(k, event)

                results.extend(self.engine.run(chunk, on_event))
                self.batches_run += 1
                self.rows_run += len(chunk)
                self.max_rows_in_batch = max(self.max_rows_in_batch, len(chunk))
        except Exception as e:  # answered as a 500 to every request of the batch; the server lives on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        pos = 0
        for job in jobs:
            job.future.set_result(results[pos:pos + len(job.rows)])
            pos += len(job.rows)


def follower_loop(engine: Engine, pc) -> None:
    """Non-zero TP ranks: decode every batch rank 0 broadcasts, until it broadcasts ``None``."""
    while True:
        rows = _broadcast(None, pc)
        if rows is None:
            return
        engine.run(rows)

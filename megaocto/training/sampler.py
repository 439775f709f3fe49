"""Sequential, resumable micro-batch sampling (Megatron's MegatronPretrainingSampler semantics).

Samples are consumed in index order 0, 1, 2, ... . Each group of `micro_batch_size * dp` consecutive indices
is one micro batch across the data-parallel ranks; DP rank r takes the r-th slice of `micro_batch_size`.
Starting from `consumed_samples` therefore continues with exactly the next sample after a resume. All TP
ranks of a DP rank get the same indices (they share dp_rank).
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import weakref
from collections.abc import Iterator

import numpy as np
import torch


class PretrainingSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler layout: micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp={dp_size}")
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} is past the end of the dataset ({total_samples} "
                             "samples); the run is longer than the data built for it")
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp = dp_size

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's indices for each full micro batch (a trailing partial one is dropped)."""
        step = self.mbs * self.dp
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))


def collate_samples(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples (dicts of equal-length numpy arrays) into `[b, s]` CPU tensors."""
    return {key: torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples])) for key in samples[0]}


def collate(dataset, indices: list[int], device) -> dict[str, torch.Tensor]:
    """Read `indices` from `dataset` and stack them into `[b, s]` tensors on `device`."""
    return to_device(collate_samples([dataset[i] for i in indices]), device)


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


_PARENT_PID: int | None = None  # the training process, recorded in each worker at start


def _preempt_signal_in_worker(signum, frame) -> None:
    # Ignored while the training process is alive (it saves and shuts the workers down itself); a worker whose
    # parent is gone exits instead of lingering as an orphan.
    if os.getppid() != _PARENT_PID:
        os._exit(128 + signum)


def _worker_init(_worker_id: int) -> None:
    """DataLoader worker setup. SLURM signals every process of the step (SIGUSR1 before the time limit, SIGTERM
    on scancel): a worker must not die mid-step, because the main process finishes the step, saves and then stops
    the workers itself (`shutdown_loader`). So SIGTERM/SIGUSR1 are ignored *while the parent lives*; and on Linux
    the kernel kills the worker when its parent dies (prctl PR_SET_PDEATHSIG=SIGKILL), so a SIGKILLed or crashed
    trainer (torchrun's kill after its grace period) leaves no orphans."""
    global _PARENT_PID
    _PARENT_PID = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl: the ppid check in the handler still applies
            pass
        if os.getppid() != _PARENT_PID:  # the parent died before prctl took effect
            os._exit(1)
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _preempt_signal_in_worker)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


def shutdown_loader(iterator) -> None:
    """Stop the worker processes of a DataLoader iterator now (idempotent; a no-op without workers). The loop calls
    it in a `finally`: the workers ignore SIGTERM, so leaving them to Python's exit handler (which SIGTERMs and then
    joins daemon children without a timeout) would hang the process after an exception."""
    stop = getattr(iterator, "_shutdown_workers", None)
    if stop is not None:
        stop()
    _LIVE_ITERATORS.discard(iterator)


def _shutdown_all_loaders() -> None:
    for it in list(_LIVE_ITERATORS):
        shutdown_loader(it)


# Runs before multiprocessing's own exit handler (atexit is LIFO and torch imported multiprocessing already), so an
# iterator that escaped the loop's `finally` is still shut down before its workers would be SIGTERMed and joined.
atexit.register(_shutdown_all_loaders)


def _make_loader_class():
    from torch.utils.data import DataLoader

    class _TrackedDataLoader(DataLoader):
        def __iter__(self):
            it = super().__iter__()
            if self.num_workers:
                _LIVE_ITERATORS.add(it)
            return it

    return _TrackedDataLoader


def micro_batch_loader(dataset, sampler: PretrainingSampler, *, num_workers: int, pin_memory: bool, seed: int = 0):
    """A DataLoader yielding this rank's micro batches in sampler order, read by `num_workers` processes.

    The loader has its own generator (seeded with `seed`): creating its iterator draws the workers' base seed
    from it instead of from torch's default RNG, so starting the loader after a checkpoint's RNG state was
    restored does not shift the dropout masks (exact resume with dropout on). Stop its iterator's workers with
    :func:`shutdown_loader` when done (also on errors); the workers ignore SIGTERM/SIGUSR1 (see `_worker_init`).
    """
    return _make_loader_class()(
        dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=num_workers, pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None, prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(seed))

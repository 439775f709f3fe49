"""Sequential, resumable micro-batch sampling (Megatron's MegatronPretrainingSampler semantics).

Samples are consumed in index order 0, 1, 2, ... . Each group of `micro_batch_size * dp` consecutive indices
is one micro batch across the data-parallel ranks; DP rank r takes the r-th slice of `micro_batch_size`.
Starting from `consumed_samples` therefore continues with exactly the next sample after a resume. All TP
ranks of a DP rank get the same indices (they share dp_rank).
"""
from __future__ import annotations

import signal
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


def _ignore_preempt_signals(_worker_id: int) -> None:
    # SLURM signals every process of the step; the main process decides when to stop and shuts workers down.
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def micro_batch_loader(dataset, sampler: PretrainingSampler, *, num_workers: int, pin_memory: bool, seed: int = 0):
    """A DataLoader yielding this rank's micro batches in sampler order, read by `num_workers` processes.

    The loader has its own generator (seeded with `seed`): creating its iterator draws the workers' base seed
    from it instead of from torch's default RNG, so starting the loader after a checkpoint's RNG state was
    restored does not shift the dropout masks (exact resume with dropout on).
    """
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=num_workers,
                      pin_memory=pin_memory, worker_init_fn=_ignore_preempt_signals if num_workers else None,
                      prefetch_factor=2 if num_workers else None, generator=torch.Generator().manual_seed(seed))

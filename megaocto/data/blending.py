"""Weighted blending of datasets with Megatron's greedy rule (BlendableDataset)."""
from __future__ import annotations

import math

import numpy as np

from megaocto.data.index_helpers import build_blending_indices


def blended_num_samples(num_samples: int, weights: list[float]) -> list[int]:
    """Samples to ask of each dataset: ceil(n·w·1.005) (Megatron's 0.5% margin)."""
    return [int(math.ceil(int(num_samples) * float(w) * 1.005)) for w in weights]


def normalise_weights(weights) -> list[float]:
    w = [float(x) for x in weights]
    if not w or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"blending weights must be non-negative with a positive sum (got {weights})")
    return [x / sum(w) for x in w]


class BlendedDataset:
    """Sample t is datasets[dataset_index[t]][dataset_sample_index[t]]; at step t the dataset with the
    largest w_i·max(t, 1) − count_i is chosen (ties to the lowest i)."""

    def __init__(self, datasets: list, weights, size: int, *, use_cpp: bool | None = None):
        if not 1 <= len(datasets) <= 255 or len(datasets) != len(weights):
            raise ValueError(f"need 1..255 datasets with one weight each (got {len(datasets)} datasets, "
                             f"{len(weights)} weights)")
        self.datasets, self.weights, self.size = list(datasets), normalise_weights(weights), int(size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, self.size,
                                                                               use_cpp=use_cpp)
        for i, ds in enumerate(self.datasets):
            picked = self.dataset_sample_index[self.dataset_index == i]
            if picked.size and int(picked.max()) >= len(ds):
                raise ValueError(f"blended dataset {i} has {len(ds)} samples but the blend needs "
                                 f"{int(picked.max()) + 1}; build it with blended_num_samples()")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size}")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]

    def summary(self) -> dict:
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets)).tolist()
        parts = [ds.summary() if hasattr(ds, "summary") else {} for ds in self.datasets]
        return {"kind": "blend", "samples": self.size, "weights": self.weights, "samples_per_dataset": counts,
                "datasets": parts}

"""Synthetic, learnable token data for smoke tests and benchmarks (no files, no tokenizer).

Every sample is a pure function of (seed, split, index). Token 0 is EOD; the first token of a
sample is a split marker (1 train, 2 valid, 3 test), so two splits can never yield the same sample.
The rest are short "documents" separated by EOD, each following one simple rule a model learns
quickly: an arithmetic progression (start a, step b, modulo the vocab) or a repeated random block.
"""
from __future__ import annotations

import numpy as np

from megaocto.data.gpt_dataset import text_to_sample

SPLIT_STREAMS = {"train": 1, "valid": 2, "test": 3}
EOD = 0
FIRST_PATTERN_TOKEN = 4


def synthetic_text(seed: int, stream: int, index: int, length: int, vocab_size: int) -> np.ndarray:
    """`length` tokens for sample `index` of `stream` (int64)."""
    rng = np.random.default_rng([int(seed), int(stream), int(index)])
    span = vocab_size - FIRST_PATTERN_TOKEN
    out = np.empty(length, dtype=np.int64)
    out[0] = stream
    pos = 1
    while pos < length:
        n = min(int(rng.integers(8, 65)), length - pos)
        if rng.random() < 0.5:
            start, step = int(rng.integers(0, span)), int(rng.integers(1, 8))
            doc = (start + step * np.arange(n)) % span
        else:
            block = rng.integers(0, span, size=int(rng.integers(2, 9)))
            doc = np.resize(block, n)
        out[pos:pos + n] = doc + FIRST_PATTERN_TOKEN
        pos += n
        if pos < length:
            out[pos] = EOD
            pos += 1
    return out


class SyntheticDataset:
    """Map-style dataset of `num_samples` synthetic samples in the design.md sample format."""

    def __init__(self, split: str, num_samples: int, seq_length: int, seed: int, vocab_size: int = 256,
                 eod_mask_loss: bool = False, reset_position_ids: bool = False):
        if split not in SPLIT_STREAMS:
            raise ValueError(f"synthetic split must be one of {list(SPLIT_STREAMS)} (got {split!r})")
        self.split, self.num_samples, self.seq_length = split, int(num_samples), int(seq_length)
        self.seed, self.vocab_size = int(seed), int(vocab_size)
        self.eod_mask_loss, self.reset_position_ids = eod_mask_loss, reset_position_ids

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not -self.num_samples <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for synthetic {self.split} of {self.num_samples}")
        idx = idx % self.num_samples
        text = synthetic_text(self.seed, SPLIT_STREAMS[self.split], idx, self.seq_length + 1, self.vocab_size)
        return text_to_sample(text, EOD, eod_mask_loss=self.eod_mask_loss,
                              reset_position_ids=self.reset_position_ids)

    def summary(self) -> dict:
        return {"kind": "synthetic", "split": self.split, "samples": self.num_samples,
                "vocab_size": self.vocab_size}

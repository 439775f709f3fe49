"""Fill-in-the-middle (bigcode FIM) applied to GPT samples, keyed on (seed, sample index).

Unlike Megatron (one RNG per dataset instance advanced in call order, so decisions depend on the
dataloader worker and DP layout), every decision for sample i comes from an RNG seeded with
(seed, salt, i): FIM output is a pure function of those and the input tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_FIM_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")


@dataclass
class FIM:
    tokenizer: object  # encode(str) -> list[int], decode(ids) -> str
    rate: float
    spm_rate: float
    seed: int
    prefix_id: int
    middle_id: int
    suffix_id: int
    pad_id: int
    eod: int | None = None
    salt: int = 0  # distinguishes datasets of a blend

    @classmethod
    def from_tokenizer(cls, tokenizer, *, rate: float, spm_rate: float, seed: int,
                       tokens=DEFAULT_FIM_TOKENS, eod: int | None = None, salt: int = 0) -> "FIM":
        """Look up [prefix, middle, suffix, pad] ids; a clear error names the tokens that are missing."""
        ids = [tokenizer.token_to_id(t) for t in tokens]
        missing = [t for t, i in zip(tokens, ids) if i is None]
        if missing:
            raise ValueError(f"FIM (fim_rate={rate}) needs the tokens {', '.join(missing)}, which the tokenizer "
                             f"does not have; set data.fim_tokens to its names (SantaCoder uses <fim-prefix>, "
                             f"<fim-middle>, <fim-suffix>, <fim-pad>) or set data.fim_rate = 0")
        return cls(tokenizer, float(rate), float(spm_rate), int(seed), *ids, eod=eod, salt=int(salt))

    def _permute(self, segment: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.rate:
            return segment
        text = self.tokenizer.decode([int(t) for t in segment])
        lo, hi = sorted(int(b) for b in rng.integers(0, len(text) + 1, size=2))
        enc = self.tokenizer.encode
        prefix, middle, suffix = enc(text[:lo]), enc(text[lo:hi]), enc(text[hi:])
        if rng.random() < self.spm_rate:
            parts = [[self.prefix_id, self.suffix_id], suffix, [self.middle_id], prefix, middle]
        else:
            parts = [[self.prefix_id], prefix, [self.suffix_id], suffix, [self.middle_id], middle]
        return np.fromiter((t for p in parts for t in p), dtype=np.int64)

    def apply(self, text: np.ndarray, idx: int) -> np.ndarray:
        """FIM-permute every non-empty EOD-separated segment of `text`, then truncate or right-pad
        with <fim_pad> back to len(text)."""
        text = np.asarray(text, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.salt, int(idx)])
        if self.eod is None:
            out = self._permute(text, rng)
        else:
            pieces, start = [], 0
            for loc in np.flatnonzero(text == self.eod).tolist() + [len(text)]:
                if loc > start:
                    pieces.append(self._permute(text[start:loc], rng))
                if loc < len(text):
                    pieces.append(np.array([self.eod], dtype=np.int64))
                start = loc + 1
            out = np.concatenate(pieces) if pieces else text[:0]
        n = len(text)
        if len(out) >= n:
            return out[:n].copy()
        return np.concatenate([out, np.full(n - len(out), self.pad_id, dtype=np.int64)])

"""build_datasets(cfg, ...): the train/valid/test datasets the trainer iterates (design.md "data/").

gpt: one GPTDataset per (path, split) over that split's document range, blended with Megatron's
weights rule when several paths are given (each asked for ceil(n·w·1.005) samples), FIM optional.
packed: one PackedDataset per (path, split) over P_inputs_document / P_targets_document, blended
the same way. synthetic: generated patterns. Index caches are built where missing (may_build) or
prebuilt by `megaocto build-index` (prebuild_indices splits the work over plain rank ints).
"""
from __future__ import annotations

import logging

import numpy as np

from megaocto.config.data import DataConfig
from megaocto.data.synthetic import SyntheticDataset

SPLITS = ("train", "valid", "test")
log = logging.getLogger(__name__)


def _data_seed(cfg: DataConfig, seed: int) -> int:
    return int(cfg.seed if cfg.seed is not None else seed)


class _Sources:
    """Opened inputs of a gpt/packed config: indexed datasets, tokenizer, special ids."""

    def __init__(self, cfg: DataConfig):
        self.cfg, self.tokenizer, self._opened = cfg, None, {}
        if cfg.tokenizer:
            from megaocto.data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.tokenizer)
        tok = self.tokenizer
        self.eod = cfg.eod_id if cfg.eod_id is not None else (tok.eod if tok is not None else None)
        self.pad = next((x for x in (cfg.pad_id, getattr(tok, "pad", None), self.eod) if x is not None), None)

    def open(self, path: str) -> tuple:
        """(tokens,) for gpt, (inputs, targets) for packed; opened once per path."""
        from megaocto.data.indexed import MMapIndexedDataset, dataset_prefix

        if path not in self._opened:
            if self.cfg.kind == "gpt":
                self._opened[path] = (MMapIndexedDataset(path),)
            else:
                self._opened[path] = (MMapIndexedDataset(dataset_prefix(path, "inputs")),
                                      MMapIndexedDataset(dataset_prefix(path, "targets")))
        return self._opened[path]

    def for_split(self, split: str) -> tuple[list[str], list[float], list[tuple[int, int]]]:
        """(paths, normalised weights, document range per path) that feed `split`."""
        from megaocto.data.splits import split_ranges

        cfg = self.cfg
        separate = {"valid": cfg.valid_paths, "test": cfg.test_paths}.get(split)
        if separate:
            return list(separate), [1.0 / len(separate)] * len(separate), \
                [(0, len(self.open(p)[0].sizes)) for p in separate]
        ranges = [split_ranges(cfg.split, len(self.open(p)[0].sizes))[split] for p in cfg.paths]
        return list(cfg.paths), cfg.weights_normalised(), ranges


def _plan(cfg: DataConfig, src: _Sources, split: str, n: int) -> tuple[list, list[float]]:
    """([(path, salt, document range, samples)], weights) for one split; [] when the split has no documents."""
    from megaocto.data.blending import blended_num_samples

    if n <= 0:
        return [], []
    paths, weights, ranges = src.for_split(split)
    empty = [p for p, (a, b) in zip(paths, ranges) if b <= a]
    if len(empty) == len(ranges):
        log.warning("data.split=%r gives the %s split no documents; %s dataset is None", cfg.split, split, split)
        return [], []
    if empty:
        raise ValueError(f"data.split={cfg.split!r} leaves the {split} split of {', '.join(empty)} without "
                         f"documents while other paths have some; adjust data.split or use larger datasets")
    counts = blended_num_samples(n, weights) if len(ranges) > 1 else [n]
    # FIM RNG salt: distinct per (split, path), so sample i of train and sample i of valid on the same path
    # draw differently (the split is part of the salt whether or not valid/test have their own paths).
    salt = 256 * SPLITS.index(split)
    return [(p, salt + i, ranges[i], counts[i]) for i, p in enumerate(paths)], weights


def _make(cfg: DataConfig, src: _Sources, split: str, path: str, salt: int, documents, n: int, seq_length: int,
          seed: int, may_build: bool):
    if cfg.kind == "gpt":
        from megaocto.data.fim import FIM
        from megaocto.data.gpt_dataset import GPTDataset

        fim = None
        if cfg.fim_rate > 0:
            fim = FIM.from_tokenizer(src.tokenizer, rate=cfg.fim_rate, spm_rate=cfg.fim_spm_rate, seed=seed,
                                     tokens=tuple(cfg.fim_tokens), eod=src.eod, salt=salt)
        return GPTDataset(src.open(path)[0], name=split, documents=documents, num_samples=n,
                          seq_length=seq_length, seed=seed, eod=src.eod, eod_mask_loss=cfg.eod_mask_loss,
                          reset_position_ids=cfg.reset_position_ids, fim=fim, cache_dir=cfg.cache_dir,
                          may_build=may_build)
    from megaocto.data.packed import PackedDataset

    inputs, targets = src.open(path)
    return PackedDataset(inputs, targets, name=split, documents=documents, num_samples=n, seq_length=seq_length,
                         seed=seed, pad_id=src.pad, loss_on_inputs=cfg.loss_on_inputs,
                         norm_target_loss=cfg.norm_target_loss, cache_dir=cfg.cache_dir, may_build=may_build,
                         data_prefix=path, eod_id=src.eod, overlong=cfg.packed_overlong, packing=cfg.packing)


def build_datasets(cfg: DataConfig, *, seq_length: int, num_samples: dict, seed: int,
                   may_build: bool = True) -> dict:
    """{'train'|'valid'|'test': map-style dataset or None}; a split with 0 samples requested is None.

    may_build=False makes this process wait for index caches written by another one (pass
    may_build=(local_rank == 0), or prebuild with `megaocto build-index`).
    """
    cfg.validate()
    seed = _data_seed(cfg, seed)
    wanted = {s: int(num_samples.get(s, 0) or 0) for s in SPLITS}
    if cfg.kind == "synthetic":
        return {s: (SyntheticDataset(s, n, seq_length, seed, cfg.synthetic_vocab_size,
                                     eod_mask_loss=cfg.eod_mask_loss, reset_position_ids=cfg.reset_position_ids)
                    if n > 0 else None) for s, n in wanted.items()}
    from megaocto.data.blending import BlendedDataset

    src = _Sources(cfg)
    out = {}
    for split in SPLITS:
        plan, weights = _plan(cfg, src, split, wanted[split])
        parts = [_make(cfg, src, split, *job, seq_length, seed, may_build) for job in plan]
        if not parts:
            out[split] = None
        elif len(parts) == 1:
            out[split] = parts[0]
        else:
            out[split] = BlendedDataset(parts, weights, wanted[split])
    return out


def prebuild_indices(cfg: DataConfig, *, seq_length: int, num_samples: dict, seed: int, rank: int = 0,
                     world_size: int = 1) -> list[dict]:
    """Build the index caches build_datasets will need; job j (a (split, path) pair) runs on rank
    j % world_size, so several processes (e.g. SLURM tasks) can share the work. Returns the summaries
    of the datasets this rank handled."""
    cfg.validate()
    if cfg.kind == "synthetic":
        return []
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    seed = _data_seed(cfg, seed)
    src = _Sources(cfg)
    jobs = [(split, job) for split in SPLITS for job in _plan(cfg, src, split, int(num_samples.get(split, 0) or 0))[0]]
    done = []
    for j, (split, job) in enumerate(jobs):
        if j % world_size == rank:
            done.append(_make(cfg, src, split, *job, seq_length, seed, True).summary())
    return done


def epoch_num_samples(cfg: DataConfig, *, seq_length: int, seed: int) -> int:
    """Samples in one pass over the train split (used when a run's length is given in epochs).

    gpt: (tokens in the train document ranges − 1) // seq_length; packed: rows of one packing epoch;
    synthetic: data.synthetic_epoch_samples.
    """
    cfg.validate()
    if cfg.kind == "synthetic":
        return int(cfg.synthetic_epoch_samples)
    src = _Sources(cfg)
    paths, _, ranges = src.for_split("train")
    data = [src.open(p) for p in paths]
    if cfg.kind == "gpt":
        tokens = sum(int(np.sum(d[0].sizes[a:b], dtype=np.int64)) for d, (a, b) in zip(data, ranges))
        return max(0, (tokens - 1) // int(seq_length))
    from megaocto.data.packed import packing_epoch_rows

    return sum(packing_epoch_rows(d[0].sizes, d[1].sizes, r, seq_length, _data_seed(cfg, seed),
                                  cfg.packed_overlong, cfg.packing)
               for d, r in zip(data, ranges) if r[1] > r[0])

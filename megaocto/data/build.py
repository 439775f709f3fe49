"""build_datasets(cfg, ...): the train/valid/test datasets the trainer iterates (design.md "data/")."""
from __future__ import annotations

from megaocto.config.data import DataConfig
from megaocto.data.synthetic import SyntheticDataset

SPLITS = ("train", "valid", "test")


def _data_seed(cfg: DataConfig, seed: int) -> int:
    return int(cfg.seed if cfg.seed is not None else seed)


def build_datasets(cfg: DataConfig, *, seq_length: int, num_samples: dict, seed: int) -> dict:
    """{'train'|'valid'|'test': map-style dataset or None}; a split with 0 samples requested is None."""
    cfg.validate()
    seed = _data_seed(cfg, seed)
    wanted = {s: int(num_samples.get(s, 0) or 0) for s in SPLITS}
    if cfg.kind == "synthetic":
        return {s: (SyntheticDataset(s, n, seq_length, seed, cfg.synthetic_vocab_size,
                                     eod_mask_loss=cfg.eod_mask_loss, reset_position_ids=cfg.reset_position_ids)
                    if n > 0 else None) for s, n in wanted.items()}
    raise ValueError(f"data.kind={cfg.kind!r} is not built yet")


def epoch_num_samples(cfg: DataConfig, *, seq_length: int, seed: int) -> int:
    """Samples in one pass over the train split (used when a run's length is given in epochs)."""
    cfg.validate()
    if cfg.kind == "synthetic":
        return int(cfg.synthetic_epoch_samples)
    raise ValueError(f"data.kind={cfg.kind!r} is not built yet")

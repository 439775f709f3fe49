"""Reading a megaocto checkpoint without building anything: is it complete, what model config and dtype does it hold.

Shared by convert/ (which streams the tensors) and generation/ (which loads them into a model); both are peers
above this package. Errors are CheckpointError (a ConfigError: exit code 2) naming the file to fix.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch

from megaocto.checkpoint import format as ckpt
from megaocto.config.base import ConfigError
from megaocto.config.model import ModelConfig


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete or not a megaocto checkpoint; the message names the file."""


def saved_dtype(tensors: dict | Iterable[torch.Tensor], default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the first floating-point tensor of a state dict (or an iterable of tensors): the dtype a
    checkpoint's weights are stored in (``default`` when there is none)."""
    for t in (tensors.values() if isinstance(tensors, dict) else tensors):
        if torch.is_tensor(t) and t.is_floating_point():
            return t.dtype
    return default



def checkpoint_info(load: str, iteration: int | str | None = None) -> tuple[str, dict, int | str]:
    """``(iteration directory, metadata, iteration)`` of a megaocto checkpoint; CheckpointError if unusable."""
    if not os.path.isdir(load):
        raise CheckpointError(f"--load={load}: not a directory (expected a megaocto checkpoint directory holding "
                              f"{ckpt.TRACKER})")
    if iteration is None:
        iteration = ckpt.read_tracker(load)
        if iteration is None:
            its = ckpt.list_checkpoints(load)
            hint = f" (it has iter_* dirs {its[-3:]}; pass --iteration)" if its else ""
            raise CheckpointError(f"{os.path.join(load, ckpt.TRACKER)}: missing; {load} is not a megaocto "
                                  f"checkpoint directory{hint}")
    directory = ckpt.resolve_dir(load, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: missing (named by {os.path.join(load, ckpt.TRACKER)})")
    meta = ckpt.read_metadata(load, iteration)
    if meta is None:
        raise CheckpointError(f"{os.path.join(directory, ckpt.METADATA)}: missing; without it the model config is "
                              f"unknown (a Megatron-LM checkpoint? use `megaocto convert from-megatron`)")
    if not (meta.get("config") or {}).get("model"):
        raise CheckpointError(f"{os.path.join(directory, ckpt.METADATA)}: no config.model section")
    tp = int(meta.get("tp", 1))
    for r in range(tp):
        for path in stage_model_files(directory, meta, r):
            if not os.path.exists(path):
                pp = int(meta.get("pp", 1))
                raise CheckpointError(f"{path}: missing (metadata says tp={tp}{f', pp={pp}' if pp > 1 else ''}); the "
                                      f"checkpoint is incomplete")
    return directory, meta, iteration


def stage_model_files(directory: str, meta: dict, tp_rank: int) -> list[str]:
    """The model files of TP rank ``tp_rank``, one per pipeline stage (``mp_rank_XX_YYY`` when pp > 1)."""
    pp = int(meta.get("pp", 1))
    return [os.path.join(directory, ckpt.rank_dir_name(tp_rank, s, pp), ckpt.MODEL_FILE) for s in range(pp)]


def load_model_state(directory: str, meta: dict, tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s model state dict, its pipeline stages merged (memory-mapped: tensors are read when
    used). Stages hold the unsplit model's parameter names (global layer indices), so merging is a dict union; the
    last stage's copy of a tied word embedding equals the first stage's, whose copy is kept."""
    merged: dict[str, torch.Tensor] = {}
    for path in stage_model_files(directory, meta, tp_rank):
        try:
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - report which file is broken
            raise CheckpointError(f"{path}: cannot read the model state ({type(e).__name__}: {e})") from None
        state = saved.get("model") if isinstance(saved, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: no 'model' state dict")
        for name, t in state.items():
            merged.setdefault(name, t)
    return merged



def config_from_metadata(meta: dict, where: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in meta["config"]["model"].items() if k in known}
    try:
        cfg = ModelConfig(**values)
        cfg.validate()
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{where}: config.model is not a valid model config: {e}") from None
    return cfg



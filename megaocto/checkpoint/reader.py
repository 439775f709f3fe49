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
    if int(meta.get("pp", 1)) != 1:
        raise CheckpointError(f"{directory}: pipeline-parallel checkpoints (pp={meta['pp']}) are not supported")
    tp = int(meta.get("tp", 1))
    for r in range(tp):
        path = os.path.join(directory, ckpt.rank_dir_name(r, 0, 1), ckpt.MODEL_FILE)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing (metadata says tp={tp}); the checkpoint is incomplete")
    return directory, meta, iteration



def config_from_metadata(meta: dict, where: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in meta["config"]["model"].items() if k in known}
    try:
        cfg = ModelConfig(**values)
        cfg.validate()
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{where}: config.model is not a valid model config: {e}") from None
    return cfg



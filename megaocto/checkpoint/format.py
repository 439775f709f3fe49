"""The on-disk checkpoint format: Megatron-compatible directories, JSON metadata, no pickled objects; atomic save/load.

This module knows paths, metadata and how tensors are written and read; it knows nothing of optimizers or
training state (training/loop.py builds the state dict; convert/ and generation/ read and write through here).

    {save}/latest_checkpointed_iteration.txt        "120" (or "release"), replaced atomically
    {save}/iter_0000120/metadata.json               config, versions, iteration, consumed samples, tp/pp/dp, time
    {save}/iter_0000120/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   (the _pp suffix only when pp > 1)

model_optim_rng.pt holds only tensors and plain containers (load with weights_only=True):
    {"checkpoint_version": 3.0, "iteration", "model": state_dict, "optimizer": {...} (optional),
     "opt_param_scheduler": {...}, "rng_state": [get_rng_state(pc)], "data": {"consumed_samples", ...}}

Atomicity: every rank writes into {save}/.tmp_iter_XXXXXXX/ (file written as *.part, fsynced, renamed); after a
barrier, global rank 0 writes metadata.json, renames the temp directory to iter_XXXXXXX, fsyncs {save}, then
replaces the tracker through a temp file + os.replace. A crash at any point leaves the previous iter_* and a
tracker that names a complete checkpoint. Only DP rank 0 writes model files. With several nodes, `save` must be
on a filesystem all ranks share (as for Megatron).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time

import torch
import torch.distributed as dist

from megaocto.config.base import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
MODEL_FILE = "model_optim_rng.pt"
FORMAT = "megaocto-checkpoint"
FORMAT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def model_file(save: str, iteration: int | str, tp_rank: int, pp_rank: int = 0, pp: int = 1) -> str:
    return os.path.join(save, iter_dir_name(iteration), rank_dir_name(tp_rank, pp_rank, pp), MODEL_FILE)


def fsync_dir(path: str) -> None:
    """Persist a directory's entries (renames); some network filesystems refuse fsync on directories."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_file_atomic(path: str, write) -> None:
    """write(f) into path.part, flush+fsync, rename onto path."""
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier(pc) -> None:
    if pc is not None and pc.world_size > 1 and dist.is_initialized():
        dist.barrier()


def read_tracker(load: str) -> int | str | None:
    """The iteration named by {load}/latest_checkpointed_iteration.txt ('release', an int, or None if absent)."""
    path = os.path.join(load, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if text == "release":
        return "release"
    if not text.isdigit():
        raise ConfigError(f"{path}:1: expected an iteration number or 'release', got {text!r}")
    return int(text)


def list_checkpoints(save: str) -> list[int]:
    """Iterations of the complete iter_* directories in `save`, ascending."""
    if not os.path.isdir(save):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(save) if (m := _ITER_RE.match(n)))


def writes_model_files(pc) -> bool:
    """Whether this rank writes a model file in save_checkpoint (DP rank 0 of every TP/PP position)."""
    return pc.dp_rank == 0


def save_checkpoint(save: str, iteration: int, state: dict | None, metadata: dict, pc, *, keep_last: int = 0,
                    fail_after_rank_files=None) -> str:
    """Collective: every rank calls it; returns the final iter directory.

    `state` is this rank's tensors, needed only where `writes_model_files(pc)`; other ranks pass None and so never
    build (or clone) a state they would not write. `fail_after_rank_files` is a test hook called after the rank
    files are written (to simulate a crash).
    """
    if writes_model_files(pc) and state is None:
        raise ValueError("save_checkpoint: this rank writes a model file (DP rank 0) but was given no state")
    final = os.path.join(save, iter_dir_name(iteration))
    tmp = os.path.join(save, "." + iter_dir_name(iteration) + ".tmp")
    if pc.rank == 0:
        os.makedirs(save, exist_ok=True)
        for name in os.listdir(save):  # leftovers of an earlier crashed save
            if name.startswith(".iter_") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(save, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier(pc)
    if writes_model_files(pc):
        rank_dir = os.path.join(tmp, rank_dir_name(pc.tp_rank, pc.pp_rank, pc.pp))
        os.makedirs(rank_dir, exist_ok=True)
        write_file_atomic(os.path.join(rank_dir, MODEL_FILE), lambda f: torch.save(state, f))
        fsync_dir(rank_dir)
    _barrier(pc)
    if fail_after_rank_files is not None:
        fail_after_rank_files()
    if pc.rank == 0:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "iteration": int(iteration),
                "tp": pc.tp, "pp": pc.pp, "dp": pc.dp, "world_size": pc.world_size, "time": time.time(),
                "torch_version": torch.__version__, **metadata}
        write_file_atomic(os.path.join(tmp, METADATA), lambda f: f.write(json.dumps(meta, indent=2).encode()))
        fsync_dir(tmp)
        if os.path.exists(final):  # re-saving the same iteration: swap the old copy aside (removed below)
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        fsync_dir(save)
        write_file_atomic(os.path.join(save, TRACKER), lambda f: f.write(f"{int(iteration)}\n".encode()))
        fsync_dir(save)
        for name in os.listdir(save):  # swapped-aside copies (ours, or left by a crash) are now superseded
            if name.startswith("iter_") and name.endswith(".old"):
                shutil.rmtree(os.path.join(save, name), ignore_errors=True)
        if keep_last > 0:
            for it in list_checkpoints(save)[:-keep_last]:
                if it != int(iteration):
                    shutil.rmtree(os.path.join(save, iter_dir_name(it)), ignore_errors=True)
    _barrier(pc)
    return final


def resolve_dir(load: str, iteration: int | str) -> str:
    """The iter directory; a crash while re-saving the same iteration may have left the complete copy at *.old."""
    directory = os.path.join(load, iter_dir_name(iteration))
    if not os.path.isdir(directory) and os.path.isdir(directory + ".old"):
        return directory + ".old"
    return directory


def read_metadata(load: str, iteration: int | str) -> dict | None:
    path = os.path.join(resolve_dir(load, iteration), METADATA)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid checkpoint metadata JSON: {e.msg}") from None


def _saved_layout(directory: str, meta: dict | None) -> tuple[int, int]:
    if meta is not None and "tp" in meta:
        return int(meta["tp"]), int(meta.get("pp", 1))
    if not os.path.isdir(directory):
        raise ConfigError(f"checkpoint directory missing: {directory} (the tracker names an iteration that is not there)")
    ranks = [m for n in os.listdir(directory) if (m := re.match(r"^mp_rank_(\d+)(?:_(\d+))?$", n))]
    if not ranks:  # Megatron checkpoint without metadata: infer the layout from the rank directories
        raise ConfigError(f"{directory}: no mp_rank_* directories")
    return (max(int(m.group(1)) for m in ranks) + 1,
            max(int(m.group(2)) if m.group(2) else 0 for m in ranks) + 1)


def load_checkpoint(load: str, pc, *, iteration: int | str | None = None) -> tuple[dict, dict | None, int | str] | None:
    """(this rank's state, metadata or None, iteration) of the tracker's checkpoint; None if `load` has none.

    Refuses a checkpoint saved with a different tp/pp (`megaocto convert reshard` changes the layout).
    """
    if iteration is None:
        iteration = read_tracker(load)
        if iteration is None:
            return None
    directory = resolve_dir(load, iteration)
    meta = read_metadata(load, iteration)
    tp, pp = _saved_layout(directory, meta)
    if (tp, pp) != (pc.tp, pc.pp):
        raise ConfigError(
            f"checkpoint {directory} was saved with tp={tp}, pp={pp} but this run uses tp={pc.tp}, pp={pc.pp}; "
            f"run with the same parallel.tp/pp, or reshard its weights: megaocto convert reshard --load {load} "
            f"--tp {pc.tp} --output DIR (then checkpoint.load DIR, checkpoint.finetune true)")
    path = os.path.join(directory, rank_dir_name(pc.tp_rank, pc.pp_rank, pc.pp), MODEL_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint file missing: {path} (incomplete or foreign checkpoint)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, meta, iteration

"""Load a megaocto checkpoint (or a converted ``release`` one) as a model ready for generation.

``load_checkpoint_model(load, pc)`` reads ``{load}/latest_checkpointed_iteration.txt`` (or ``iteration``), the
model config from ``metadata.json`` (``config.model``) and the model state of this TP rank's
``model_optim_rng.pt`` (memory-mapped; the optimizer state in the same file is not read). The checkpoint
must have been saved at the current ``pc.tp`` (reshard it with ``megaocto convert reshard`` otherwise). The model
is built on ``device`` (so ``model.kernels: auto`` resolves for that device) and filled from the checkpoint, in
``dtype`` (default: the dtype the weights were saved in); the caller's RNG state is left as it was.
"""
from __future__ import annotations

import os

import torch

from megaocto.config.base import ConfigError
from megaocto.data.tokenizer import load_tokenizer as _load_tokenizer
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext
from megaocto import checkpoint as ckpt


def load_tokenizer(path: str):
    """The tokenizer at ``path`` (``tokenizer.json``, a sentencepiece ``.model``, or a directory holding one)."""
    return _load_tokenizer(path)


def checkpoint_metadata(load: str, iteration: int | str | None = None) -> tuple[dict, int | str]:
    """``(metadata.json contents, iteration)`` of the checkpoint in ``load`` (``iteration`` default: the
    tracker's); a ConfigError naming the file when the directory, tracker, metadata (with ``config.model``) or a
    rank file is missing. The same checks as ``megaocto convert`` (:func:`megaocto.checkpoint.checkpoint_info`)."""
    _, meta, iteration = ckpt.checkpoint_info(load, iteration)
    return meta, iteration


def load_checkpoint_model(load: str, pc: ParallelContext | None = None, *, dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None, iteration: int | str | None = None):
    """``(model, cfg)``: the checkpoint's model for this TP rank, in eval mode, no grads required.

    Args:
        load: checkpoint directory (``checkpoint.save`` of a run, or a converted checkpoint).
        pc: the ParallelContext (default single process); ``pc.tp`` must equal the tp the checkpoint was saved at.
        dtype: parameter dtype (default: as saved).
        device: default ``pc.device``.
        iteration: an iteration number or ``"release"`` (default: the tracker's).
    """
    pc = ParallelContext.single() if pc is None else pc
    meta, iteration = checkpoint_metadata(load, iteration)
    directory = ckpt.resolve_dir(load, iteration)
    where = os.path.join(directory, ckpt.METADATA)
    saved_tp = int(meta.get("tp", 1))
    if saved_tp != pc.tp:
        raise ConfigError(f"{where}: checkpoint saved with tp={saved_tp} but generation runs with tp={pc.tp}; run "
                          f"with tp={saved_tp} (torchrun --nproc_per_node {saved_tp}) or reshard it first: "
                          f"megaocto convert reshard --load {load} --tp {pc.tp} --output DIR")
    cfg = ckpt.config_from_metadata(meta, where)
    # A pp > 1 checkpoint's stages are merged by name (they hold the unsplit model's names): generation builds the
    # whole layer stack. Memory-mapped: only the model tensors are read (copied into the model below); the
    # optimizer state that shares the files is never paged in.
    state = ckpt.load_model_state(directory, meta, pc.tp_rank)
    device = pc.device if device is None else torch.device(device)
    dtype = ckpt.saved_dtype(state) if dtype is None else dtype
    # Built on its device (the kernel ops are resolved from it at construction); the throwaway random init runs
    # on a forked RNG so the caller's RNG state is untouched.
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        model = build_model(cfg, pc, dtype=dtype, device=device)
    if cfg.lora.enabled:  # a LoRA run's checkpoint: its base (from the recorded reference) + the adapters
        from megaocto.model.lora_checkpoint import load_lora_checkpoint

        if int(meta.get("pp", 1)) != 1:
            raise ConfigError(f"{where}: a LoRA checkpoint saved with pp={meta['pp']} cannot be loaded for generation "
                              f"(its stages' adapter files are not merged); train the LoRA run with parallel.pp 1")
        path = os.path.join(directory, ckpt.rank_dir_name(pc.tp_rank, 0, 1), ckpt.MODEL_FILE)
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # with its lora_base reference
        load_lora_checkpoint(model, saved, load, iteration, pc, path)
        state = None
    try:
        if state is not None:
            model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{ckpt.model_file(load, iteration, pc.tp_rank)}: weights do not fit the model in "
                          f"{where}: {first}") from None
    model.eval()
    model.requires_grad_(False)
    return model, cfg


def load_model_and_tokenizer(load: str, *, tokenizer: str | None = None, iteration=None):
    """``(model, tokenizer, pc)`` for generating from a checkpoint in a command: the process group at the
    checkpoint's tp (torchrun / srun environment, or one process), the tokenizer at ``tokenizer`` or else the
    checkpoint's ``data.tokenizer``. ``iteration``: a number (str or int), "release" or None (the tracker's).
    ConfigError names what is missing."""
    if iteration is not None and iteration != "release":
        iteration = int(iteration)
    meta, iteration = checkpoint_metadata(load, iteration)
    pc = ParallelContext.init(tp=int(meta.get("tp", 1)))
    tok_path = tokenizer or ((meta.get("config") or {}).get("data") or {}).get("tokenizer") or ""
    if not tok_path:
        raise ConfigError(f"{load}: the checkpoint's config has no data.tokenizer; pass --tokenizer PATH")
    tok = load_tokenizer(tok_path)
    model, _ = load_checkpoint_model(load, pc, iteration=iteration)
    return model, tok, pc

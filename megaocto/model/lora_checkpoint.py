"""Checkpoints of LoRA runs (``model.lora.rank > 0``): the adapters only, plus a reference to the base.

A LoRA run's ``model_optim_rng.pt`` holds ``model`` = the adapters' state (this rank's shards; a few MB for a 15B
model), the optimizer state of the adapters, and ``lora_base`` = ``{"path", "iteration", "fingerprint"}``: the
base checkpoint it started from (absolute path and iteration; ``path`` None for a randomly initialised base, which
the seed rebuilds) and a hash of this rank's base weights (:func:`megaocto.model.lora.base_fingerprint`). Loading an
adapter checkpoint loads the base from that reference first and refuses a base whose fingerprint differs.
"""
from __future__ import annotations

import os

from megaocto import checkpoint as ckpt
from megaocto.config.base import ConfigError
from megaocto.model.lora import base_fingerprint, base_state_dict, is_lora_key


def _load_base_weights(model, weights: dict, where: str) -> None:
    own = base_state_dict(model)
    base = {k: v for k, v in weights.items() if not is_lora_key(k)}
    missing, unexpected = sorted(set(own) - set(base)), sorted(set(base) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{where}: base weights do not fit the configured model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); configure the base checkpoint's architecture")
    model.load_state_dict(base, strict=False)


def load_lora_checkpoint(model, state: dict, source: str, iteration, pc, where: str) -> tuple[dict, bool]:
    """Load ``state`` (a base checkpoint, or a LoRA run's adapter checkpoint) into the LoRA ``model``.

    Returns (the base reference to record in this run's checkpoints, whether ``state`` was an adapter checkpoint).
    """
    ref = state.get("lora_base")
    if ref is None:  # a base (full) checkpoint: the start of a LoRA finetune; adapters keep their init
        _load_base_weights(model, state["model"], where)
        adapters = {k: v for k, v in state["model"].items() if is_lora_key(k)}
        if adapters:  # e.g. a merged-adapter export is a base; an unmerged one carries lora_base
            model.load_state_dict(adapters, strict=False)
        return {"path": os.path.abspath(source), "iteration": iteration, "fingerprint": base_fingerprint(model)}, False
    if ref.get("path") is not None:
        gone = not os.path.isdir(ckpt.resolve_dir(ref["path"], ref["iteration"]))
        loaded = None if gone else ckpt.load_checkpoint(ref["path"], pc, iteration=ref["iteration"])
        if loaded is None:
            raise ConfigError(f"{where}: its base checkpoint {ref['path']} (iteration {ref['iteration']}) is gone; "
                              f"restore it there (adapter checkpoints hold only the adapters)")
        _load_base_weights(model, loaded[0]["model"], os.path.join(
            ckpt.resolve_dir(ref["path"], ref["iteration"]), ckpt.rank_dir_name(pc.tp_rank, pc.pp_rank, pc.pp)))
    fp = base_fingerprint(model)
    if fp != ref.get("fingerprint"):
        raise ConfigError(f"{where}: base weights fingerprint {fp} differs from the recorded {ref.get('fingerprint')} "
                          f"(base {ref.get('path') or 'initialised from the seed'}, iteration {ref.get('iteration')}); "
                          f"the base checkpoint changed since these adapters were trained")
    own = {k for k in model.state_dict() if is_lora_key(k)}
    got = set(state["model"])
    if own != got:
        raise ConfigError(f"{where}: adapters do not fit model.lora (missing {sorted(own - got)[:3]}, unexpected "
                          f"{sorted(got - own)[:3]}); configure the rank/targets the adapters were trained with")
    model.load_state_dict(state["model"], strict=False)
    return ref, True

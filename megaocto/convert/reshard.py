"""Reshard a megaocto checkpoint to another tensor- and pipeline-parallel size, streaming.

``reshard(load, output, *, tp, iteration=None, dtype=None, verify=False, progress=True, pp=1) -> float | None``
    Reads the checkpoint (any saved TP and PP: stages merged by name; ``iteration`` default = the tracker's) one
    tensor at a time with
    :func:`megaocto.convert.core.read_megaocto_checkpoint` (TP shards merged from mmap-ed rank files) and writes a
    release checkpoint at ``tp`` with :func:`megaocto.convert.core.write_megaocto_checkpoint`. Peak RAM: one layer
    plus one output rank file — never the model times TP (the Megatron ``checkpoint_util`` OOM, reference §4.2).

    Only model weights are carried (the result is a weights-only *release* checkpoint, read with finetune
    semantics): optimizer moments and RNG states are TP-layout specific. Vocabulary padding rows are kept when the
    padded size does not change, otherwise trimmed to ``vocab_size`` and zero-padded, so tp=2 -> 1 -> 2 of a
    converted checkpoint is bit-exact. ``verify`` prints the max abs logit difference between source and result
    (each run at its own TP: tp > 1 as tp gloo processes loading their own rank files, see
    :func:`megaocto.convert.core.checkpoint_logits_fn`; fp32, one model in memory at a time) and raises
    :class:`megaocto.convert.core.VerifyError` above ``verify_tol`` (default
    :func:`megaocto.convert.core.default_verify_tol`).
"""
from __future__ import annotations

import os

from megaocto.convert import core


def reshard(load: str, output: str, *, tp: int, iteration=None, dtype=None, verify: bool = False,
            progress: bool = True, verify_tol: float | None = None, pp: int = 1) -> float | None:
    cast = core.parse_dtype(dtype)
    directory, meta, it = core.checkpoint_info(load, iteration)
    cfg = core.config_from_metadata(meta, os.path.join(directory, "metadata.json"))
    core.check_tp(cfg, tp)
    core.check_output_free(output)
    _, tensors = core.read_megaocto_checkpoint(load, iteration=it)
    extra = {"converted_from": {"kind": "reshard", "path": os.path.abspath(load), "iteration": it,
                                "tp": int(meta.get("tp", 1)), "pp": int(meta.get("pp", 1)),
                                **{k: v for k, v in (meta.get("converted_from") or {}).items()
                                   if k in ("token_ids", "layout")}}}
    core.write_megaocto_checkpoint(output, cfg, tensors, tp, dtype=cast, metadata_extra=extra, progress=progress,
                                    pp=pp)
    if not verify:
        return None

    # each side runs at its own layout when it is pp = 1 (tp gloo processes for tp > 1); a pp > 1 side is merged
    src_pp = int(meta.get("pp", 1))
    if src_pp == 1:
        src_fn, src_what = core.checkpoint_logits_fn(load, iteration=it)
    else:
        src_fn = core.megaocto_logits_fn(cfg, core.read_megaocto_checkpoint(load, iteration=it)[1])
        src_what = f"megaocto tp={meta.get('tp', 1)} pp={src_pp} (stages merged, one process)"
    if pp == 1:
        dst_fn, dst_what = core.checkpoint_logits_fn(output)
    else:
        dst_fn = core.megaocto_logits_fn(cfg, core.read_megaocto_checkpoint(output)[1])
        dst_what = f"megaocto tp={tp} pp={pp} (stages merged, one process)"
    return core.verify_lazy(lambda: src_fn, lambda: dst_fn, cfg.vocab_size, label=f"{src_what} vs {dst_what}",
                            seq=min(16, cfg.max_positions), tol=verify_tol, cast=cast)

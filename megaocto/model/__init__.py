"""Models: ``build_model(cfg, pc)`` for the bigcode (GPT/StarCoder), glm2 (CodeGeeX2) and llama (CodeLlama,
DeepSeek-Coder) families.

``megaocto.model.flops`` and ``megaocto.model.memory`` need no torch; the family modules are imported lazily.
"""
from __future__ import annotations

RECOMPUTE_MODES = ("none", "full", "selective")


def build_model(cfg, pc, *, dtype=None, device=None, recompute: str = "none", recompute_num_layers: int = 1,
                pp_layers=None, virtual_pp: int = 1):
    """Build the model of ``cfg.family`` sharded for ``pc`` (a ParallelContext).

    Every rank draws the full weights from the default torch RNG and keeps its shard, so one seed gives the same
    model at every TP size. ``recompute``: none | full (checkpoint every ``recompute_num_layers``-layer chunk) |
    selective (core attention only). Forward: ``model(input_ids, *, position_ids=None, segment_ids=None,
    labels=None)`` -> fp32 per-token loss [b, s] with labels, else vocab-parallel logits [b, s, V_pad/tp].

    With ``pc.pp > 1`` it builds this rank's pipeline stage only: the blocks of
    ``megaocto.model.common.stage_layers(cfg.num_layers, pc.pp, pc.pp_rank, pp_layers)`` under the unsplit model's
    parameter names (the embedding on the first stage, final norm + LM head on the last; see the family modules);
    ``model(..., hidden_states=x)`` runs a later stage, and stages before the last return their output activation.
    Build it with the default RNG seeded as for pp = 1 to get the unsplit model's weights. ``virtual_pp > 1``
    (interleaved schedule) gives the stage that many model chunks (``megaocto.model.common.stage_chunks``), run as
    ``model(..., chunk=c)``.
    With ``cfg.lora.rank > 0`` the base is frozen and LoRA adapters are added (:mod:`megaocto.model.lora`).
    """
    import torch

    from megaocto.config.base import ConfigError

    if recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute must be one of {RECOMPUTE_MODES} (got {recompute!r})")
    if recompute_num_layers < 1:
        raise ConfigError(f"recompute_num_layers must be >= 1 (got {recompute_num_layers})")
    cfg.validate(pc.tp, sequence_parallel=getattr(pc, "sequence_parallel", False))
    if cfg.family == "bigcode":
        from megaocto.model.bigcode import BigCodeModel as cls
    elif cfg.family == "llama":
        from megaocto.model.llama import LlamaModel as cls
    else:
        from megaocto.model.glm2 import GLM2Model as cls
    model = cls(cfg, pc, dtype=dtype if dtype is not None else torch.float32, device=device,
                recompute=recompute, recompute_num_layers=recompute_num_layers, pp_layers=pp_layers,
                virtual_pp=virtual_pp)
    if cfg.lora.enabled:  # frozen base + trainable adapters (megaocto/model/lora.py)
        from megaocto.model.lora import inject_lora

        inject_lora(model, cfg.lora, pc)
    return model

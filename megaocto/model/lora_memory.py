"""LoRA parameter counts from a ModelConfig alone (no torch), for ``megaocto model-info`` and the memory estimate.

Mirrors the layout of :mod:`megaocto.model.lora`: on a column-parallel host A ``[r, in]`` is replicated and B
``[out_blocks / tp, r]`` sharded; on a row-parallel host A ``[r, in / tp]`` is sharded and B ``[out, r]``
replicated; on a replicated host (bigcode multi-query ``key_value``, llama ``key_value`` when tp > K/V heads) both
are whole. A shared-A group (bigcode multi-query ``query_key_value``) holds one A.
"""
from __future__ import annotations

from megaocto.config.model import ModelConfig, lora_target_specs


def _hosts(cfg: ModelConfig, tp: int) -> dict[str, tuple[str, int, list[int]]]:
    """{host path: (kind column|row|replicated, in features, full output block sizes)}."""
    h, d, a, g, f = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_size
    swiglu = cfg.activation == "swiglu"
    hosts = {"self_attention.dense": ("row", a * d, [h]),
             "mlp.dense_h_to_4h": ("column", h, [f, f] if swiglu else [f]),
             "mlp.dense_4h_to_h": ("row", f, [h]),
             "self_attention.query": ("column", h, [a * d]),
             "self_attention.query_key_value": ("column", h, [a * d, g * d, g * d])}
    if cfg.family == "bigcode":
        hosts["self_attention.key_value"] = ("replicated", h, [2 * d])
    else:  # llama
        hosts["self_attention.key_value"] = ("column" if cfg.kv_split_over(tp) else "replicated", h, [g * d, g * d])
    return hosts


def lora_params(cfg: ModelConfig, tp: int = 1) -> tuple[int, int]:
    """(total adapter parameters, adapter parameters held by one TP rank); (0, 0) when LoRA is off."""
    if not cfg.lora.enabled:
        return 0, 0
    r = cfg.lora.rank
    hosts = _hosts(cfg, tp)
    total = per_rank = 0
    seen_groups = set()
    for _, (path, b0, b1, group) in lora_target_specs(cfg.lora, cfg.family, cfg.is_mqa).items():
        kind, fan_in, blocks = hosts[path]
        out = sum(blocks[(b0 or 0):(len(blocks) if b1 is None else b1)])
        if not group or group not in seen_groups:
            seen_groups.add(group)
            total += r * fan_in
            per_rank += r * fan_in // (tp if kind == "row" else 1)
        total += out * r
        per_rank += out * r // (tp if kind == "column" else 1)
    return total * cfg.num_layers, per_rank * cfg.num_layers

"""Human-readable model summary for `megaocto model-info` (no torch)."""
from __future__ import annotations

from megaocto.config.model import ModelConfig
from megaocto.model.flops import flops_per_token, num_matmul_params, num_params
from megaocto.model.memory import _stage_params, estimate_memory


def _per_gpu_params(cfg: ModelConfig, tp: int, pp: int) -> str:
    """Parameters one GPU holds at this tp x pp layout (per pipeline stage when pp > 1)."""
    stages = _stage_params(cfg, tp, pp)
    if pp == 1:
        return f"per GPU (tp={tp} pp=1) {stages['only']:,}"
    return f"per GPU (tp={tp} pp={pp}) first stage {stages['first']:,}, last stage {stages['last']:,}"


def model_info_report(cfg: ModelConfig, *, preset: str = "", tp: int = 1, pp: int = 1, dp: int = 1,
                      micro_batch: int = 1, dtype: str = "bf16", recompute: str = "none",
                      recompute_num_layers: int = 1, zero1: bool = False, sequence_parallel: bool = True,
                      flash_attention: bool = True) -> str:
    """Parameters, FLOPs/token and the memory breakdown as a multi-line string."""
    seq = cfg.seq_length
    attn = {1: "multi-query"}.get(cfg.num_query_groups, "multi-head" if cfg.num_query_groups ==
                                  cfg.num_attention_heads else f"grouped ({cfg.num_query_groups} K/V groups)")
    mem = estimate_memory(cfg, tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, seq_len=seq, dtype=dtype, zero1=zero1,
                          recompute=recompute, recompute_num_layers=recompute_num_layers,
                          sequence_parallel=sequence_parallel, flash_attention=flash_attention)
    lines = [
        f"model {preset or cfg.family}: family {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads x {cfg.head_dim}, {attn}, ffn {cfg.ffn_size} ({cfg.activation}), "
        f"vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size(tp)} at tp={tp}), seq {seq}",
        f"parameters:        {num_params(cfg):,} ({num_params(cfg) / 1e9:.3f} B); "
        f"matmul (FLOPs N) {num_matmul_params(cfg):,}; {_per_gpu_params(cfg, tp, pp)}",
        f"FLOPs per token:   {flops_per_token(cfg, seq):.4g} (6N + 12*L*H*Q*T, non-causal); "
        f"causal variant {flops_per_token(cfg, seq, causal=True):.4g}",
        f"memory per GPU (tp={tp} pp={pp} dp={dp} micro_batch={micro_batch} {dtype} recompute={recompute} "
        f"zero1={zero1} sp={sequence_parallel and tp > 1} flash={flash_attention}; heaviest stage: {mem.stage}):",
        f"  params on GPU    {mem.params_per_gpu:,}",
    ]
    if cfg.lora.enabled:
        from megaocto.model.lora_memory import lora_params

        total, per_rank = lora_params(cfg, tp)
        lines.insert(3, f"LoRA:              r={cfg.lora.rank} on {', '.join(cfg.lora.target_modules)}: {total:,} "
                         f"adapter parameters ({100.0 * total / num_params(cfg):.3f}% of the base), {per_rank:,} per "
                         f"TP rank; frozen base counted as weights only")
    for k, v in mem.breakdown().items():
        lines.append(f"  {k:<16} {v:8.2f} GiB")
    return "\n".join(lines)

"""Training memory per GPU, estimated from a ModelConfig and a parallel layout (no torch).

Model states (Megatron mixed precision, ``docs/distrib_optimizer.md``): 16-bit training keeps 16-bit weights,
fp32 gradient accumulation buffers, fp32 master weights and two fp32 Adam moments = 2 + 4 + 4 + 8 = 18 bytes per
parameter; fp32 training keeps 4 + 4 + 8 = 16. With ``zero1`` (distributed optimizer) master weights and Adam
moments are sharded over data parallelism. With LoRA (``model.lora.rank > 0``) the frozen base holds its weights
only and the adapters the full 18 (16) bytes per parameter (:mod:`megaocto.model.lora_memory`); the adapters'
r-wide activations are not counted.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
generalised to grouped/multi-query K/V, SwiGLU and any element size. For the standard case (MHA, 4h GELU MLP,
16-bit, dropout on) one layer stores ``s*b*h*(34 + 5*a*s/h)`` bytes, divided by t where TP (and, with sequence
parallelism, SP) shards it — except the inputs of the two column-parallel GEMMs, which megaocto keeps all-gathered
(``4*s*b*h`` bytes at 16 bits, not divided by t: Korthikanti's SP re-gathers them in backward instead). Flash attention and selective recompute drop the ``a*s^2`` terms; full recompute keeps
only each chunk's input plus one chunk recomputed at a time. The first pipeline stage holds ``min(pp,
num_microbatches)`` microbatches in flight (1F1B). Allocator fragmentation, communication buffers and the CUDA
context are not counted: leave 10-20% headroom.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megaocto.config.model import ModelConfig
from megaocto.model.flops import param_table
from megaocto.model.lora_memory import lora_params

GIB = 1024 ** 3
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class MemoryEstimate:
    params_per_gpu: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    stage: str  # which pipeline stage is the heaviest ("first", "last" or "only")

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def breakdown(self) -> dict[str, float]:
        """{component: GiB}."""
        return {k: v / GIB for k, v in (("weights", self.weights), ("grads", self.grads),
                                         ("optimizer", self.optimizer), ("activations", self.activations),
                                         ("total", self.total))}


def check_pipeline_split(num_layers: int, pp: int) -> None:
    """Raise ValueError unless ``pp`` stages hold the same number of layers (Megatron: num_layers % pp == 0)."""
    if pp < 1 or num_layers % pp:
        ok = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise ValueError(f"pipeline-parallel size pp={pp} does not divide num_layers={num_layers}: every stage must "
                         f"hold the same number of layers; use pp in {ok}")


def _stage_params(cfg: ModelConfig, tp: int, pp: int) -> dict[str, int]:
    """Parameters per GPU on the first and last pipeline stage (pp == 1: one stage holding everything)."""
    layers_per_stage = cfg.num_layers // pp
    per_layer = 0
    first = last = 0
    for s in param_table(cfg, tp):
        n = s.numel_per_rank(tp)
        if s.name.startswith("layers."):
            if s.name.startswith("layers.0."):  # every layer has the same parameters: count one, scale below
                per_layer += n
        elif s.kind in ("embedding", "position"):
            first += n
            if s.kind == "embedding" and cfg.tie_embeddings and pp > 1:
                last += n  # Megatron keeps a copy of the tied embedding on the last stage
        elif s.kind in ("output", "norm"):  # output layer and final norm (per-layer norms are handled above)
            last += n
    body = per_layer * layers_per_stage
    if pp == 1:
        return {"only": first + last + body}
    return {"first": first + body, "last": last + body}


def activation_bytes_per_layer(cfg: ModelConfig, *, tp: int, micro_batch: int, seq_len: int, elem: int,
                               sequence_parallel: bool, flash_attention: bool, selective: bool) -> float:
    """Bytes one transformer layer keeps for backward for one microbatch (Korthikanti et al. table 2)."""
    s, b, h = seq_len, micro_batch, cfg.hidden_size
    a, d, g, f = cfg.num_attention_heads, cfg.head_dim, cfg.num_query_groups, cfg.ffn_size
    rep = 1.0 / tp if sequence_parallel else 1.0  # tensors outside the TP region
    # MQA K/V (and llama's K/V when tp > groups) are computed whole on every TP rank
    if cfg.family == "llama":
        kv_t = tp if cfg.kv_split_over(tp) else 1
    else:
        kv_t = tp if (g > 1 or cfg.family == "glm2") else 1
    sb = s * b
    total = 2 * elem * sb * h * rep  # inputs of the two norms
    # The two column-parallel GEMM inputs (QKV, fc1): megaocto's ColumnParallelLinear all-gathers the sequence-parallel
    # input and F.linear keeps the gathered [s, b, h] tensor for the weight gradient (no re-gather in backward, unlike
    # Korthikanti's SP), so they are full size on every TP rank with or without sequence parallelism.
    total += elem * sb * h  # QKV GEMM input (norm output, gathered)
    total += elem * sb * a * d / tp + 2 * elem * sb * g * d / kv_t  # Q, K, V
    if not (flash_attention or selective):
        total += elem * a * s * s * b / tp  # softmax output
        if cfg.attention_dropout > 0:
            total += (1 + elem) * a * s * s * b / tp  # dropout mask + dropped probabilities
    elif flash_attention and not selective:
        total += 4 * a * s * b / tp  # fp32 log-sum-exp kept by flash attention
    total += elem * sb * a * d / tp  # context = dense input
    total += elem * sb * h  # MLP input (gathered, as the QKV input)
    fc1 = 2 * f if cfg.activation == "swiglu" else f
    total += elem * sb * fc1 / tp + elem * sb * f / tp  # fc1 output, activation output
    if cfg.hidden_dropout > 0:
        total += 2 * sb * h * rep  # two residual dropout masks (1 byte each)
    return total


def estimate_memory(cfg: ModelConfig, *, tp: int = 1, pp: int = 1, dp: int = 1, micro_batch: int = 1,
                    seq_len: int | None = None, dtype: str = "bf16", zero1: bool = False, recompute: str = "none",
                    recompute_num_layers: int = 1, sequence_parallel: bool | None = None,
                    flash_attention: bool = True, num_microbatches: int | None = None) -> MemoryEstimate:
    """Estimated peak training memory of the heaviest GPU (see module doc for what is counted)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)} (got {dtype!r})")
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be none, selective or full (got {recompute!r})")
    for name, v in (("tp", tp), ("pp", pp), ("dp", dp), ("micro_batch", micro_batch),
                    ("recompute_num_layers", recompute_num_layers)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1 (got {v})")
    cfg.validate(tp)
    check_pipeline_split(cfg.num_layers, pp)
    seq_len = seq_len if seq_len is not None else cfg.seq_length
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
    sp = (tp > 1) if sequence_parallel is None else (sequence_parallel and tp > 1)
    if sp and seq_len % tp:
        raise ValueError(f"sequence length {seq_len} is not divisible by tp={tp}, which sequence parallelism "
                         f"requires; use a multiple of {tp} or turn sequence parallelism off "
                         f"(model-info --no-sequence-parallel)")
    elem = _DTYPE_BYTES[dtype]
    weight_b, grad_b, opt_b = (4, 4, 8) if dtype == "fp32" else (elem, 4, 12)
    if zero1:
        opt_b = opt_b / dp

    layers_per_stage = cfg.num_layers // pp
    in_flight = min(pp, num_microbatches if num_microbatches is not None else pp)
    per_layer = activation_bytes_per_layer(cfg, tp=tp, micro_batch=micro_batch, seq_len=seq_len, elem=elem,
                                           sequence_parallel=sp, flash_attention=flash_attention,
                                           selective=(recompute == "selective"))
    layer_input = elem * seq_len * micro_batch * cfg.hidden_size / (tp if sp else 1)
    if recompute == "full":
        n = min(recompute_num_layers, layers_per_stage)
        chunks = math.ceil(layers_per_stage / n)

        def stage_acts(mb: int) -> float:
            return mb * chunks * layer_input + n * per_layer
    else:
        def stage_acts(mb: int) -> float:
            return mb * layers_per_stage * per_layer
    vp = cfg.padded_vocab_size(tp)
    head_acts = layer_input + (4 + elem) * seq_len * micro_batch * vp / tp  # final norm input, logits (+fp32 copy)

    params = _stage_params(cfg, tp, pp)
    candidates = {}
    if pp == 1:
        candidates["only"] = (params["only"], stage_acts(1) + head_acts)
    else:
        candidates["first"] = (params["first"], stage_acts(in_flight))
        candidates["last"] = (params["last"], stage_acts(1) + head_acts)

    def total(item):
        n, acts = item[1]
        return n * (weight_b + grad_b + opt_b) + acts

    if cfg.lora.enabled:  # frozen base: weights only; the adapters carry grads, fp32 masters and AdamW state
        m = lora_params(cfg, tp)[1] * layers_per_stage // cfg.num_layers
        stage, (n, acts) = max(candidates.items(), key=lambda item: item[1][0] * weight_b + item[1][1])
        return MemoryEstimate(params_per_gpu=n + m, weights=(n + m) * weight_b, grads=m * grad_b,
                              optimizer=m * opt_b, activations=acts, stage=stage)
    stage, (n, acts) = max(candidates.items(), key=total)
    return MemoryEstimate(params_per_gpu=n, weights=n * weight_b, grads=n * grad_b, optimizer=n * opt_b,
                          activations=acts, stage=stage)

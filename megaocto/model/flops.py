"""Parameter counts and FLOPs per token, computed from a ModelConfig alone (no torch).

:func:`param_table` lists every parameter the built model has (same names and full shapes as
``build_model(cfg, pc).named_parameters()`` at tp=1) and how it is split over tensor parallelism, so
parameter counts, per-rank memory and the sharding table in docs/models.md all come from one place.

FLOPs convention (PaLM appendix B, as nanoGPT / torchtitan / Megatron's 2024 table; see
reference peers-style-perf.md §B.2)::

    flops_per_token = 6 * N_matmul + 12 * L * H * Q * T

N_matmul is every parameter except the input-embedding lookup and the position embeddings; the output layer (the
tied word embedding for bigcode) is kept because it is a GEMM. H*Q is the query width (heads x head dim), T the
sequence length. The attention term is non-causal (no halving for the causal mask); ``causal=True`` gives the
halved 6*L*H*Q*T variant that llm.c and current Megatron report.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaocto.config.model import ModelConfig


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    partition_dim: int | None  # None = replicated on every TP rank (norms, MQA key_value, positions, row biases,
    #                            llama key_value when tp > K/V heads)
    kind: str  # "embedding" | "position" | "output" | "layer" | "norm"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def numel_per_rank(self, tp: int) -> int:
        return self.numel // tp if self.partition_dim is not None else self.numel


def _layer_specs(cfg: ModelConfig, i: int, tp: int = 1) -> list[ParamSpec]:
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    q_width, kv_width = cfg.num_attention_heads * d, cfg.num_query_groups * d
    p = f"layers.{i}."
    out: list[ParamSpec] = []
    norm_names = ("weight", "bias") if cfg.family == "bigcode" else ("weight",)
    out += [ParamSpec(p + "input_layernorm." + n, (h,), None, "norm") for n in norm_names]
    if cfg.family == "llama":  # query column-parallel; key_value [k | v] split over TP, or replicated above groups
        out.append(ParamSpec(p + "self_attention.query.weight", (q_width, h), 0, "layer"))
        out.append(ParamSpec(p + "self_attention.key_value.weight", (2 * kv_width, h),
                             0 if cfg.kv_split_over(tp) else None, "layer"))
    elif cfg.family == "bigcode" and cfg.is_mqa:
        out.append(ParamSpec(p + "self_attention.query.weight", (q_width, h), 0, "layer"))
        if cfg.add_qkv_bias:
            out.append(ParamSpec(p + "self_attention.query.bias", (q_width,), 0, "layer"))
        out.append(ParamSpec(p + "self_attention.key_value.weight", (2 * d, h), None, "layer"))
        if cfg.add_qkv_bias:
            out.append(ParamSpec(p + "self_attention.key_value.bias", (2 * d,), None, "layer"))
    else:
        out.append(ParamSpec(p + "self_attention.query_key_value.weight", (q_width + 2 * kv_width, h), 0, "layer"))
        if cfg.add_qkv_bias:
            out.append(ParamSpec(p + "self_attention.query_key_value.bias", (q_width + 2 * kv_width,), 0, "layer"))
    out.append(ParamSpec(p + "self_attention.dense.weight", (h, q_width), 1, "layer"))
    if cfg.add_bias_linear:
        out.append(ParamSpec(p + "self_attention.dense.bias", (h,), None, "layer"))
    out += [ParamSpec(p + "post_attention_layernorm." + n, (h,), None, "norm") for n in norm_names]
    fc1 = 2 * f if cfg.activation == "swiglu" else f
    out.append(ParamSpec(p + "mlp.dense_h_to_4h.weight", (fc1, h), 0, "layer"))
    if cfg.add_bias_linear:
        out.append(ParamSpec(p + "mlp.dense_h_to_4h.bias", (fc1,), 0, "layer"))
    out.append(ParamSpec(p + "mlp.dense_4h_to_h.weight", (h, f), 1, "layer"))
    if cfg.add_bias_linear:
        out.append(ParamSpec(p + "mlp.dense_4h_to_h.bias", (h,), None, "layer"))
    return out


def param_table(cfg: ModelConfig, tp: int = 1) -> list[ParamSpec]:
    """Every parameter of the model (full shapes; the vocab is padded for ``tp``)."""
    h, vp = cfg.hidden_size, cfg.padded_vocab_size(tp)
    specs = [ParamSpec("embedding.word_embeddings.weight", (vp, h), 0, "embedding")]
    if cfg.family == "bigcode":
        specs.append(ParamSpec("embedding.position_embeddings.weight", (cfg.max_positions, h), None, "position"))
    for i in range(cfg.num_layers):
        specs += _layer_specs(cfg, i, tp)
    norm_names = ("weight", "bias") if cfg.family == "bigcode" else ("weight",)
    specs += [ParamSpec("final_layernorm." + n, (h,), None, "norm") for n in norm_names]
    if not cfg.tie_embeddings:
        specs.append(ParamSpec("output_layer.weight", (vp, h), 0, "output"))
    return specs


def num_params(cfg: ModelConfig, tp: int = 1) -> int:
    """Exact number of distinct parameters (tied embedding counted once; vocab padded for ``tp``)."""
    return sum(s.numel for s in param_table(cfg, tp))


def num_params_per_rank(cfg: ModelConfig, tp: int = 1) -> int:
    """Parameters held by one TP rank when pp == 1 (sharded tensors divided by tp, replicated ones whole)."""
    return sum(s.numel_per_rank(tp) for s in param_table(cfg, tp))


def num_matmul_params(cfg: ModelConfig) -> int:
    """N for the FLOPs formula: all params minus the input-embedding lookup and position embeddings.

    A tied word embedding is kept (it is the output GEMM); an untied one is dropped in favour of output_layer.
    """
    total = 0
    for s in param_table(cfg):
        if s.kind == "position" or (s.kind == "embedding" and not cfg.tie_embeddings):
            continue
        total += s.numel
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, causal: bool = False) -> float:
    """Training FLOPs per token (forward + backward): 6*N_matmul + 12*L*H*Q*T (non-causal, PaLM / MFU convention).

    ``causal=True`` halves the attention term (6*L*H*Q*T). Activation recompute is not counted (this is MFU, not HFU).
    """
    t = seq_len if seq_len is not None else cfg.seq_length
    attn = (6 if causal else 12) * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * t
    return 6.0 * num_matmul_params(cfg) + float(attn)

"""megaocto ``llama`` <-> Hugging Face ``LlamaForCausalLM`` (CodeLlama, CodeLlama-Python, DeepSeek-Coder).

Key mapping (no transposes: both sides use ``nn.Linear`` ``[out, in]`` weights; ``N`` = layer index; HF's q/k
weights are already in the "halves" rotary layout that megaocto's llama uses, so no head permutation either):

=============================================  ===============================================================
megaocto                                       HF Llama
=============================================  ===============================================================
``embedding.word_embeddings.weight[:V]``       ``model.embed_tokens.weight``
``layers.N.input_layernorm.weight``            ``model.layers.N.input_layernorm.weight``
``layers.N.self_attention.query.weight``       ``model.layers.N.self_attn.q_proj.weight``
``layers.N.self_attention.key_value.weight``   ``cat([model.layers.N.self_attn.k_proj.weight; v_proj.weight])``
(rows ``[k (groups·d) | v (groups·d)]``)
``layers.N.self_attention.dense.weight``       ``model.layers.N.self_attn.o_proj.weight``
``layers.N.post_attention_layernorm.weight``   ``model.layers.N.post_attention_layernorm.weight``
``layers.N.mlp.dense_h_to_4h.weight``          ``cat([model.layers.N.mlp.gate_proj.weight; up_proj.weight])``
(rows ``[gate | up]``)
``layers.N.mlp.dense_4h_to_h.weight``          ``model.layers.N.mlp.down_proj.weight``
``final_layernorm.weight``                     ``model.norm.weight``
``output_layer.weight[:V]``                    ``lm_head.weight``
=============================================  ===============================================================

Config: ``num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads (default:
heads), head_dim (default: hidden/heads), vocab_size, max_position_embeddings, rms_norm_eps, initializer_range``
map to ``num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, kv_channels, vocab_size,
max_position_embeddings, norm_epsilon, init_method_std``. Rotary: ``rope_theta`` (top level, or inside
``rope_parameters`` in transformers >= 5) -> ``rotary_base``; ``rope_scaling`` / ``rope_parameters`` of type
``linear`` -> ``rope_scaling_factor`` (``factor``); ``default`` / absent -> 1.0. Other RoPE types (``dynamic``,
``llama3``, ``yarn``, ...), ``hidden_act`` other than ``silu``, ``tie_word_embeddings``, ``attention_bias`` and
``mlp_bias`` are refused before anything is written. ``rotary_emb.inv_freq`` buffers (old exports) are ignored. bos/eos ids: the HF source's (``converted_from.token_ids``), else those of ``--tokenizer``, else
Llama's 1/2.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from megaocto.config.model import ModelConfig
from megaocto.convert.core import ConversionError

FAMILY = "llama"
ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
# Llama's bos <s> = 1, eos </s> = 2 (CodeLlama); DeepSeek-Coder's own ids come from its config.json.
DEFAULT_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2}


def detect(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config.get("architectures") or [])


def _need(hf: dict, key: str, where: str):
    if key not in hf:
        raise ConversionError(f"{where}: field {key!r} missing")
    return hf[key]


def rope_from_hf(hf: dict, where: str) -> tuple[float, float]:
    """``(rope_theta, linear scaling factor)`` of a Llama ``config.json`` (either transformers' v4 fields
    ``rope_theta`` + ``rope_scaling`` or v5's ``rope_parameters``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, 1.0
    if kind != "linear":
        raise ConversionError(f"{where}: rope scaling type {kind!r} is not supported; megaocto llama implements "
                              f"linear scaling (CodeLlama, DeepSeek-Coder) and none")
    factor = float(scaling.get("factor", 0.0))
    if factor < 1.0:
        raise ConversionError(f"{where}: rope scaling factor {scaling.get('factor')!r} must be >= 1")
    return theta, factor


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig of an HF Llama ``config.json`` dict (``where`` = its path, for errors)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r}; megaocto llama has SwiGLU (silu)")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise ConversionError(f"{where}: {key}=true is not supported (megaocto llama has no biases and an "
                                  f"untied output layer)")
    theta, factor = rope_from_hf(hf, where)
    heads = int(_need(hf, "num_attention_heads", where))
    hidden = int(_need(hf, "hidden_size", where))
    head_dim = int(hf.get("head_dim") or hidden // heads)
    n_pos = int(hf.get("max_position_embeddings", 4096))
    cfg = ModelConfig(
        family=FAMILY, num_layers=int(_need(hf, "num_hidden_layers", where)), hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=None if head_dim * heads == hidden else head_dim,
        ffn_hidden_size=int(_need(hf, "intermediate_size", where)), vocab_size=int(_need(hf, "vocab_size", where)),
        seq_length=min(n_pos, 4096), max_position_embeddings=n_pos, activation="swiglu",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)), hidden_dropout=0.0, add_qkv_bias=False,
        add_bias_linear=False, tie_embeddings=False, rotary_percent=1.0, rotary_base=theta,
        rope_scaling_factor=factor)
    try:
        cfg.validate()
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{where}: unsupported Llama config: {e}") from None
    return cfg


def check_exportable(cfg: ModelConfig, where: str) -> None:
    if cfg.family != FAMILY:
        raise ConversionError(f"{where}: family {cfg.family!r} cannot be exported as {ARCHITECTURE}")


def hf_config(cfg: ModelConfig, *, dtype: torch.dtype, token_ids: dict | None = None):
    """A ``transformers.LlamaConfig`` for ``cfg`` (``token_ids``: bos/eos/pad ids; Llama's 1/2 by default)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling_factor != 1.0:
        rope = {"rope_type": "linear", "factor": cfg.rope_scaling_factor, "rope_theta": cfg.rotary_base}
    ids = {**DEFAULT_TOKEN_IDS, **(token_ids or {})}
    conf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.norm_epsilon, initializer_range=cfg.init_method_std, attention_dropout=cfg.attention_dropout,
        hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False, rope_parameters=rope,
        **ids)
    conf.architectures = [ARCHITECTURE]
    conf.dtype = dtype
    return conf


def token_ids_from_tokenizer(path: str) -> dict:
    """``{bos_token_id, eos_token_id}`` of the megaocto tokenizer at ``path`` (its ``bos`` and EOD)."""
    from megaocto.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(path)
    except TokenizerError as e:
        raise ConversionError(f"--tokenizer: {e}") from None
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eod}


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor an HF Llama checkpoint of ``cfg`` holds, in megaocto order."""
    h, f, V = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, h)}
    for i in range(cfg.num_layers):
        q = f"model.layers.{i}."
        shapes.update({q + "input_layernorm.weight": (h,), q + "self_attn.q_proj.weight": (qd, h),
                       q + "self_attn.k_proj.weight": (kvd, h), q + "self_attn.v_proj.weight": (kvd, h),
                       q + "self_attn.o_proj.weight": (h, qd), q + "post_attention_layernorm.weight": (h,),
                       q + "mlp.gate_proj.weight": (f, h), q + "mlp.up_proj.weight": (f, h),
                       q + "mlp.down_proj.weight": (h, f)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (V, h)})
    return shapes


def ignorable_hf_names(cfg: ModelConfig, names: list[str]) -> set[str]:
    return {n for n in names if n.endswith("rotary_emb.inv_freq")}


def iter_from_hf(cfg: ModelConfig, get) -> Iterator[tuple[str, torch.Tensor]]:
    """(megaocto name, full tensor) in megaocto order from HF Llama tensors (``get(hf_name)``)."""
    yield "embedding.word_embeddings.weight", get("model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        yield p + "input_layernorm.weight", get(q + "input_layernorm.weight")
        yield p + "self_attention.query.weight", get(q + "self_attn.q_proj.weight")
        yield p + "self_attention.key_value.weight", torch.cat([get(q + "self_attn.k_proj.weight"),
                                                                get(q + "self_attn.v_proj.weight")])
        yield p + "self_attention.dense.weight", get(q + "self_attn.o_proj.weight")
        yield p + "post_attention_layernorm.weight", get(q + "post_attention_layernorm.weight")
        yield p + "mlp.dense_h_to_4h.weight", torch.cat([get(q + "mlp.gate_proj.weight"),
                                                         get(q + "mlp.up_proj.weight")])
        yield p + "mlp.dense_4h_to_h.weight", get(q + "mlp.down_proj.weight")
    yield "final_layernorm.weight", get("model.norm.weight")
    yield "output_layer.weight", get("lm_head.weight")


_SIMPLE = {"input_layernorm.weight": "input_layernorm.weight",
           "self_attention.query.weight": "self_attn.q_proj.weight",
           "self_attention.dense.weight": "self_attn.o_proj.weight",
           "post_attention_layernorm.weight": "post_attention_layernorm.weight",
           "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight"}


def iter_to_hf(cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF Llama name, tensor) from megaocto (name, full tensor) pairs; vocab padding dropped."""
    V = cfg.vocab_size
    for name, t in tensors:
        if name == "embedding.word_embeddings.weight":
            yield "model.embed_tokens.weight", t[:V]
        elif name == "output_layer.weight":
            yield "lm_head.weight", t[:V]
        elif name == "final_layernorm.weight":
            yield "model.norm.weight", t
        else:
            _, i, rest = name.split(".", 2)
            q = f"model.layers.{i}."
            if rest == "self_attention.key_value.weight":
                k, v = t.chunk(2)
                yield q + "self_attn.k_proj.weight", k
                yield q + "self_attn.v_proj.weight", v
            elif rest == "mlp.dense_h_to_4h.weight":
                gate, up = t.chunk(2)
                yield q + "mlp.gate_proj.weight", gate
                yield q + "mlp.up_proj.weight", up
            else:
                yield q + _SIMPLE[rest], t

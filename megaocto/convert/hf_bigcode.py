"""megaocto ``bigcode`` <-> Hugging Face ``GPTBigCodeForCausalLM`` (SantaCoder, StarCoder(Base), OctoCoder).

Key mapping (no transposes: both sides use ``nn.Linear`` ``[out, in]`` weights; ``N`` = layer index):

=============================================  ===============================================================
megaocto                                       HF GPTBigCode
=============================================  ===============================================================
``embedding.word_embeddings.weight[:V]``       ``transformer.wte.weight`` (and ``lm_head.weight``, tied)
``embedding.position_embeddings.weight``       ``transformer.wpe.weight``
``layers.N.input_layernorm.{weight,bias}``     ``transformer.h.N.ln_1.*``
MQA: ``layers.N.self_attention.query.*`` ++    ``transformer.h.N.attn.c_attn.*`` = ``cat([q (h rows); k (d); v (d)])``
``layers.N.self_attention.key_value.*``        (our ``key_value`` rows are already ``[K; V]``)
MHA: ``layers.N.self_attention                 ``transformer.h.N.attn.c_attn.*``, rows interleaved *per head*
.query_key_value.*`` rows ``[q | k | v]``       ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (HF views the output as
                                               ``[heads, 3·d]``); we reorder ``[3, heads, d] <-> [heads, 3, d]``
``layers.N.self_attention.dense.*``            ``transformer.h.N.attn.c_proj.*``
``layers.N.post_attention_layernorm.*``        ``transformer.h.N.ln_2.*``
``layers.N.mlp.dense_h_to_4h.*``               ``transformer.h.N.mlp.c_fc.*``
``layers.N.mlp.dense_4h_to_h.*``               ``transformer.h.N.mlp.c_proj.*``
``final_layernorm.*``                          ``transformer.ln_f.*``
``output_layer.weight[:V]`` (untied only)      ``lm_head.weight`` (``tie_word_embeddings=false``)
=============================================  ===============================================================

Config: ``n_layer, n_embd, n_head, n_inner (None = 4h), n_positions`` -> ``num_layers, hidden_size,
num_attention_heads, ffn_hidden_size, max_position_embeddings``; ``multi_query`` -> ``num_query_groups`` 1 or
``n_head``; ``activation_function`` ``gelu_pytorch_tanh`` (also ``gelu_new``/``gelu_fast``, the same tanh
approximation) <-> ``gelu_tanh``, ``gelu`` <-> ``gelu``; ``layer_norm_epsilon`` <-> ``norm_epsilon``;
``attn_pdrop``/``resid_pdrop`` <-> dropouts; ``initializer_range`` <-> ``init_method_std``. The padded vocabulary
rows (TP padding) are dropped on export. Grouped K/V (1 < groups < heads), missing biases or ``kv_channels`` other
than ``hidden/heads`` cannot be expressed in GPTBigCode and are refused before anything is written.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from megaocto.config.model import ModelConfig
from megaocto.convert import core
from megaocto.convert.core import ConversionError

FAMILY = "bigcode"
ARCHITECTURE = "GPTBigCodeForCausalLM"
MODEL_TYPE = "gpt_bigcode"
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
IGNORABLE_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old GPT2-style exports


def detect(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config.get("architectures") or [])


def detect_gpt2_custom(config: dict) -> bool:
    """The original ``bigcode/santacoder`` main-branch layout: remote-code ``GPT2LMHeadCustomModel`` with
    ``model_type: gpt2`` plus a multi-query field (``attention_head_type`` / ``attention_type`` /
    ``multi_query``) and ``n_head``. Its
    weights are GPT-2 style (``Conv1D``, transposed) with separate query / key-value projections, not
    GPTBigCode's, so it is refused with a pointer to the GPTBigCode port."""
    archs = config.get("architectures") or []
    if "GPT2LMHeadCustomModel" in archs:
        return True
    return (config.get("model_type") == "gpt2" and "n_head" in config
            and any(k in config for k in ("attention_head_type", "attention_type", "multi_query")))


def gpt2_custom_error(where: str) -> ConversionError:
    """The error for :func:`detect_gpt2_custom` layouts."""
    return ConversionError(
        f"{where}: this is the original SantaCoder layout (model_type gpt2 / GPT2LMHeadCustomModel, remote code, "
        f"GPT-2 Conv1D weights with a separate multi-query key/value projection), not GPTBigCode; download the "
        f"GPTBigCode port instead, e.g. `bigcode/gpt_bigcode-santacoder` (or the `bigcode/santacoder` revision "
        f"converted to gpt_bigcode), and convert that")


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig of an HF GPTBigCode ``config.json`` dict (``where`` = its path, for errors)."""
    def need(key):
        if key not in hf:
            raise ConversionError(f"{where}: field {key!r} missing")
        return hf[key]

    act = hf.get("activation_function", "gelu_pytorch_tanh")
    if act in _TANH_GELUS:
        activation = "gelu_tanh"
    elif act == "gelu":
        activation = "gelu"
    else:
        raise ConversionError(f"{where}: activation_function={act!r} is not supported (megaocto bigcode has "
                              f"gelu_pytorch_tanh and gelu)")
    if not hf.get("scale_attn_weights", True):
        raise ConversionError(f"{where}: scale_attn_weights=false is not supported (megaocto scales by 1/sqrt(d))")
    if hf.get("add_cross_attention", False):
        raise ConversionError(f"{where}: add_cross_attention=true (encoder-decoder) is not supported")
    n_head, n_embd = int(need("n_head")), int(need("n_embd"))
    n_pos = int(need("n_positions"))
    cfg = ModelConfig(
        family=FAMILY, num_layers=int(need("n_layer")), hidden_size=n_embd, num_attention_heads=n_head,
        num_query_groups=1 if hf.get("multi_query", True) else n_head,
        ffn_hidden_size=hf.get("n_inner"), vocab_size=int(need("vocab_size")), seq_length=n_pos,
        max_position_embeddings=n_pos, activation=activation,
        norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attn_pdrop", 0.0)), hidden_dropout=float(hf.get("resid_pdrop", 0.0)),
        add_qkv_bias=True, add_bias_linear=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    try:
        cfg.validate()
    except Exception as e:  # noqa: BLE001 - a ConfigError naming a megaocto field; point at the HF file
        raise ConversionError(f"{where}: unsupported GPTBigCode config: {e}") from None
    return cfg


def check_exportable(cfg: ModelConfig, where: str) -> None:
    if cfg.family != FAMILY:
        raise ConversionError(f"{where}: family {cfg.family!r} cannot be exported as {ARCHITECTURE}")
    if not (cfg.is_mqa or cfg.num_query_groups == cfg.num_attention_heads):
        raise ConversionError(f"{where}: model.num_query_groups={cfg.num_query_groups} (grouped K/V) has no "
                              f"GPTBigCode equivalent (only 1 = multi-query or num_attention_heads = multi-head)")
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ConversionError(f"{where}: model.kv_channels={cfg.kv_channels} != hidden_size/heads; GPTBigCode "
                              f"derives head_dim from n_embd/n_head")
    if not (cfg.add_qkv_bias and cfg.add_bias_linear):
        raise ConversionError(f"{where}: model.add_qkv_bias/add_bias_linear=false; GPTBigCode always has biases")
    if cfg.activation not in ("gelu_tanh", "gelu"):
        raise ConversionError(f"{where}: model.activation={cfg.activation!r} has no GPTBigCode equivalent")


def hf_config(cfg: ModelConfig, *, dtype: torch.dtype, token_ids: dict | None = None):
    """A ``transformers.GPTBigCodeConfig`` for ``cfg`` (``token_ids``: bos/eos/pad ids; StarCoder's 0 by default)."""
    from transformers import GPTBigCodeConfig

    ids = {"bos_token_id": 0, "eos_token_id": 0, **(token_ids or {})}
    conf = GPTBigCodeConfig(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads, n_inner=cfg.ffn_size,
        activation_function="gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "gelu",
        resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.norm_epsilon, initializer_range=cfg.init_method_std, scale_attn_weights=True,
        use_cache=True, attention_softmax_in_fp32=True, scale_attention_softmax_in_fp32=True,
        multi_query=cfg.is_mqa, tie_word_embeddings=cfg.tie_embeddings, **ids)
    conf.architectures = [ARCHITECTURE]
    conf.dtype = dtype
    return conf


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(cfg.num_layers):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{part}.weight", f"transformer.h.{i}.{part}.bias"]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor :func:`expected_hf_names` lists, from the config alone (``c_attn`` has ``h + 2·d``
    rows for multi-query, ``3·h`` for multi-head)."""
    h, f, V, d = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size, cfg.head_dim
    qkv = h + 2 * d if cfg.is_mqa else 3 * h
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, h),
                                          "transformer.wpe.weight": (cfg.max_positions, h)}
    per_layer = {"ln_1.weight": (h,), "ln_1.bias": (h,), "attn.c_attn.weight": (qkv, h), "attn.c_attn.bias": (qkv,),
                 "attn.c_proj.weight": (h, h), "attn.c_proj.bias": (h,), "ln_2.weight": (h,), "ln_2.bias": (h,),
                 "mlp.c_fc.weight": (f, h), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (h, f),
                 "mlp.c_proj.bias": (h,)}
    for i in range(cfg.num_layers):
        shapes.update({f"transformer.h.{i}.{k}": v for k, v in per_layer.items()})
    shapes["transformer.ln_f.weight"] = shapes["transformer.ln_f.bias"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, h)
    return shapes


def ignorable_hf_names(cfg: ModelConfig, names: list[str]) -> set[str]:
    out = {n for n in names if n.endswith(IGNORABLE_SUFFIXES)}
    if cfg.tie_embeddings:
        out.add("lm_head.weight")  # a tied copy some exports keep
    return out


def per_head_qkv_to_blocks(t: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """Fused QKV rows interleaved per head ``[heads, 3, d]`` (HF GPTBigCode MHA ``c_attn``; Megatron-LM
    ``query_key_value`` of checkpoint_version >= 2) -> megaocto's ``[3, heads, d]`` (``[q | k | v]`` blocks).
    Any trailing dims (the weight's input dim) are kept; the result is a new contiguous tensor."""
    return t.reshape(heads, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def blocks_qkv_to_per_head(t: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """The inverse of :func:`per_head_qkv_to_blocks`: ``[3, heads, d]`` rows -> ``[heads, 3, d]``."""
    return t.reshape(3, heads, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def iter_from_hf(cfg: ModelConfig, get) -> Iterator[tuple[str, torch.Tensor]]:
    """(megaocto name, full tensor) in megaocto order; ``get(hf_name)`` reads one HF tensor."""
    n, d, h = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    yield "embedding.word_embeddings.weight", get("transformer.wte.weight")
    yield "embedding.position_embeddings.weight", get("transformer.wpe.weight")
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            yield p + f"input_layernorm.{kind}", get(q + f"ln_1.{kind}")
        for kind in ("weight", "bias"):
            c_attn = get(q + f"attn.c_attn.{kind}")
            if cfg.is_mqa:
                query, kv = c_attn.split([h, 2 * d])
                yield p + f"self_attention.query.{kind}", query
                yield p + f"self_attention.key_value.{kind}", kv
            else:
                yield p + f"self_attention.query_key_value.{kind}", per_head_qkv_to_blocks(c_attn, n, d)
        for kind in ("weight", "bias"):
            yield p + f"self_attention.dense.{kind}", get(q + f"attn.c_proj.{kind}")
        for kind in ("weight", "bias"):
            yield p + f"post_attention_layernorm.{kind}", get(q + f"ln_2.{kind}")
        for kind in ("weight", "bias"):
            yield p + f"mlp.dense_h_to_4h.{kind}", get(q + f"mlp.c_fc.{kind}")
        for kind in ("weight", "bias"):
            yield p + f"mlp.dense_4h_to_h.{kind}", get(q + f"mlp.c_proj.{kind}")
    for kind in ("weight", "bias"):
        yield f"final_layernorm.{kind}", get(f"transformer.ln_f.{kind}")
    if not cfg.tie_embeddings:
        yield "output_layer.weight", get("lm_head.weight")


def iter_to_hf(cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) from megaocto (name, full tensor) pairs in megaocto order; vocab padding dropped.
    A :class:`megaocto.convert.core.Parts` input stays lazy where the mapping only concatenates or slices rows."""
    n, d, V = cfg.num_attention_heads, cfg.head_dim, cfg.vocab_size
    pending: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        if name == "embedding.word_embeddings.weight":
            yield "transformer.wte.weight", t[:V]
        elif name == "embedding.position_embeddings.weight":
            yield "transformer.wpe.weight", t
        elif name == "output_layer.weight":
            yield "lm_head.weight", t[:V]
        elif name.startswith("final_layernorm."):
            yield "transformer.ln_f." + name.split(".")[-1], t
        else:
            _, i, rest = name.split(".", 2)
            q, kind = f"transformer.h.{i}.", name.rsplit(".", 1)[-1]
            if rest.startswith("self_attention.query."):
                pending[kind] = t
            elif rest.startswith("self_attention.key_value."):
                yield q + f"attn.c_attn.{kind}", core.cat_rows([pending.pop(kind), t])  # lazy for core.Parts
            elif rest.startswith("self_attention.query_key_value."):
                yield q + f"attn.c_attn.{kind}", blocks_qkv_to_per_head(core.materialize(t), n, d)
            else:
                part = {"input_layernorm": "ln_1", "self_attention.dense": "attn.c_proj",
                        "post_attention_layernorm": "ln_2", "mlp.dense_h_to_4h": "mlp.c_fc",
                        "mlp.dense_4h_to_h": "mlp.c_proj"}[rest.rsplit(".", 1)[0]]
                yield q + f"{part}.{kind}", t

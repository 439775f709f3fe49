"""megaocto ``glm2`` (CodeGeeX2 / ChatGLM2) <-> Hugging Face, in two layouts.

1. transformers' native ``GlmForCausalLM`` (``model_type: glm``), both ways (``N`` = layer index):

   ===============================================  ===========================================================
   megaocto                                         transformers Glm
   ===============================================  ===========================================================
   ``embedding.word_embeddings.weight[:V]``         ``model.embed_tokens.weight``
   ``layers.N.input_layernorm.weight``              ``model.layers.N.input_layernorm.weight``
   ``layers.N.self_attention.query_key_value.*``    ``model.layers.N.self_attn.{q,k,v}_proj.*`` (rows split
   rows ``[q (heads·d) | k (groups·d) | v]``         ``[heads·d, groups·d, groups·d]``; bias = QKV bias)
   ``layers.N.self_attention.dense.weight``         ``model.layers.N.self_attn.o_proj.weight``
   ``layers.N.post_attention_layernorm.weight``     ``model.layers.N.post_attention_layernorm.weight``
   ``layers.N.mlp.dense_h_to_4h.weight`` ``[gate;   ``model.layers.N.mlp.gate_up_proj.weight`` (same ``[gate; up]``)
   up]``
   ``layers.N.mlp.dense_4h_to_h.weight``            ``model.layers.N.mlp.down_proj.weight``
   ``final_layernorm.weight``                       ``model.norm.weight``
   ``output_layer.weight[:V]``                      ``lm_head.weight``
   ===============================================  ===========================================================

   Config: ``num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
   head_dim, rms_norm_eps, attention_bias, max_position_embeddings`` and ``rope_parameters.{rope_theta,
   partial_rotary_factor}`` (or the older top-level ``rope_theta`` / ``partial_rotary_factor``) map to
   ``num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, kv_channels, norm_epsilon,
   add_qkv_bias, max_position_embeddings, rotary_base, rotary_percent``. Glm's rotary is GLM's interleaved-pair
   rotation of the first ``partial_rotary_factor·head_dim`` dims, the same as ours (tests/test_model_reference.py).
   Glm has no bias on ``o_proj``/MLP, untied ``lm_head`` and ``silu`` — anything else is refused.

2. Import of the ORIGINAL ChatGLM2-6B / CodeGeeX2-6B layout (``model_type: chatglm``, remote-code
   ``ChatGLMForConditionalGeneration``; weights usually ``pytorch_model-0000i-of-0000N.bin`` + index):

   ===============================================================  ===========================================
   ChatGLM2 / CodeGeeX2                                             megaocto
   ===============================================================  ===========================================
   ``transformer.embedding.word_embeddings.weight``                 ``embedding.word_embeddings.weight``
   ``transformer.rotary_pos_emb.inv_freq``                          (buffer; checked: length = rotary_dim/2)
   ``transformer.encoder.layers.N.input_layernorm.weight``          ``layers.N.input_layernorm.weight``
   ``transformer.encoder.layers.N.self_attention.query_key_value.*``  ``layers.N.self_attention.query_key_value.*``
   (rows ``[q | k | v]`` = ``[heads·d, groups·d, groups·d]``)          (identical layout)
   ``transformer.encoder.layers.N.self_attention.dense.weight``     ``layers.N.self_attention.dense.weight``
   ``transformer.encoder.layers.N.post_attention_layernorm.weight`` ``layers.N.post_attention_layernorm.weight``
   ``transformer.encoder.layers.N.mlp.dense_h_to_4h.weight``        ``layers.N.mlp.dense_h_to_4h.weight``
   (``[gate; up]``, ChatGLM's ``swiglu`` = ``silu(x0) * x1``)
   ``transformer.encoder.layers.N.mlp.dense_4h_to_h.weight``        ``layers.N.mlp.dense_4h_to_h.weight``
   ``transformer.encoder.final_layernorm.weight``                   ``final_layernorm.weight``
   ``transformer.output_layer.weight``                              ``output_layer.weight``
   ===============================================================  ===========================================

   Config: ``num_layers, hidden_size, ffn_hidden_size, kv_channels, num_attention_heads,
   multi_query_attention`` + ``multi_query_group_num`` (groups; heads when MQA is off), ``padded_vocab_size`` (the
   embedding rows; becomes ``vocab_size``), ``layernorm_epsilon``, ``add_qkv_bias``, ``add_bias_linear``,
   ``seq_length``, ``rope_ratio`` (ChatGLM3-style base scaling, base = 10000·rope_ratio). ChatGLM2 rotates the first
   half of each head (``RotaryEmbedding(kv_channels // 2)``) in interleaved pairs: ``rotary_percent = 0.5``.
   ``rmsnorm``, ``post_layer_norm`` and ``original_rope`` must be true and
   ``apply_residual_connection_post_layernorm`` false. Export always goes to the native layout (1.).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from megaocto.config.model import ModelConfig
from megaocto.convert.core import ConversionError

FAMILY = "glm2"
ARCHITECTURE = "GlmForCausalLM"
MODEL_TYPE = "glm"
CHATGLM_ARCHS = ("ChatGLMModel", "ChatGLMForConditionalGeneration", "ChatGLMForCausalLM")


def detect(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config.get("architectures") or [])


def detect_chatglm(config: dict) -> bool:
    return config.get("model_type") == "chatglm" or any(a in CHATGLM_ARCHS for a in config.get("architectures") or [])


def _need(hf: dict, key: str, where: str):
    if key not in hf:
        raise ConversionError(f"{where}: field {key!r} missing")
    return hf[key]


def _validated(cfg: ModelConfig, where: str) -> ModelConfig:
    try:
        cfg.validate()
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{where}: unsupported GLM config: {e}") from None
    return cfg


# ------------------------------------------------------------------------------------------ native Glm
def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig of a native transformers Glm ``config.json`` dict."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r}; megaocto glm2 has SwiGLU (silu)")
    if hf.get("tie_word_embeddings", False):
        raise ConversionError(f"{where}: tie_word_embeddings=true is not supported (megaocto glm2 has an untied "
                              f"output layer)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"{where}: rope_parameters.rope_type={rope_type!r}; only 'default' rotary is supported")
    heads = int(_need(hf, "num_attention_heads", where))
    hidden = int(_need(hf, "hidden_size", where))
    head_dim = hf.get("head_dim") or hidden // heads
    n_pos = int(hf.get("max_position_embeddings", 2048))
    cfg = ModelConfig(
        family=FAMILY, num_layers=int(_need(hf, "num_hidden_layers", where)), hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=None if head_dim * heads == hidden else int(head_dim),
        ffn_hidden_size=int(_need(hf, "intermediate_size", where)), vocab_size=int(_need(hf, "vocab_size", where)),
        seq_length=min(n_pos, 2048), max_position_embeddings=n_pos, activation="swiglu",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)), init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)), hidden_dropout=0.0,
        add_qkv_bias=bool(hf.get("attention_bias", True)), add_bias_linear=False, tie_embeddings=False,
        rotary_percent=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    return _validated(cfg, where)


def check_exportable(cfg: ModelConfig, where: str) -> None:
    if cfg.family != FAMILY:
        raise ConversionError(f"{where}: family {cfg.family!r} cannot be exported as {ARCHITECTURE}")
    if cfg.add_bias_linear:
        raise ConversionError(f"{where}: model.add_bias_linear=true; transformers Glm has no o_proj/MLP bias")


def hf_config(cfg: ModelConfig, *, dtype: torch.dtype, token_ids: dict | None = None):
    """A ``transformers.GlmConfig`` for ``cfg``."""
    from transformers import GlmConfig

    ids = {"pad_token_id": 0, "bos_token_id": None, "eos_token_id": 2, **(token_ids or {})}
    conf = GlmConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.norm_epsilon, attention_bias=cfg.add_qkv_bias, tie_word_embeddings=False,
        attention_dropout=cfg.attention_dropout, initializer_range=cfg.init_method_std,
        rope_parameters={"rope_theta": cfg.rotary_base, "partial_rotary_factor": cfg.rotary_percent,
                         "rope_type": "default"}, **ids)
    conf.architectures = [ARCHITECTURE]
    conf.dtype = dtype
    return conf


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        q = f"model.layers.{i}."
        names.append(q + "input_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj"):
            names.append(q + f"self_attn.{proj}.weight")
            if cfg.add_qkv_bias:
                names.append(q + f"self_attn.{proj}.bias")
        names += [q + "self_attn.o_proj.weight", q + "post_attention_layernorm.weight",
                  q + "mlp.gate_up_proj.weight", q + "mlp.down_proj.weight"]
    return names + ["model.norm.weight", "lm_head.weight"]


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor :func:`expected_hf_names` lists, from the config alone (``q_proj`` heads·d rows,
    ``k_proj``/``v_proj`` groups·d rows, ``gate_up_proj`` 2·ffn rows)."""
    h, f, V = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, h)}
    for i in range(cfg.num_layers):
        q = f"model.layers.{i}."
        shapes[q + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)):
            shapes[q + f"self_attn.{proj}.weight"] = (rows, h)
            if cfg.add_qkv_bias:
                shapes[q + f"self_attn.{proj}.bias"] = (rows,)
        shapes.update({q + "self_attn.o_proj.weight": (h, qd), q + "post_attention_layernorm.weight": (h,),
                       q + "mlp.gate_up_proj.weight": (2 * f, h), q + "mlp.down_proj.weight": (h, f)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (V, h)})
    return shapes


def ignorable_hf_names(cfg: ModelConfig, names: list[str]) -> set[str]:
    return {n for n in names if n.endswith("rotary_emb.inv_freq")}


def _kinds(cfg: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if cfg.add_qkv_bias else ("weight",)


def iter_from_hf(cfg: ModelConfig, get) -> Iterator[tuple[str, torch.Tensor]]:
    """(megaocto name, full tensor) in megaocto order from native Glm tensors (``get(hf_name)``)."""
    yield "embedding.word_embeddings.weight", get("model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        yield p + "input_layernorm.weight", get(q + "input_layernorm.weight")
        for kind in _kinds(cfg):
            yield p + f"self_attention.query_key_value.{kind}", torch.cat(
                [get(q + f"self_attn.{proj}.{kind}") for proj in ("q_proj", "k_proj", "v_proj")])
        yield p + "self_attention.dense.weight", get(q + "self_attn.o_proj.weight")
        yield p + "post_attention_layernorm.weight", get(q + "post_attention_layernorm.weight")
        yield p + "mlp.dense_h_to_4h.weight", get(q + "mlp.gate_up_proj.weight")
        yield p + "mlp.dense_4h_to_h.weight", get(q + "mlp.down_proj.weight")
    yield "final_layernorm.weight", get("model.norm.weight")
    yield "output_layer.weight", get("lm_head.weight")


def iter_to_hf(cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(native Glm name, tensor) from megaocto (name, full tensor) pairs; vocab padding dropped."""
    n, g, d, V = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim, cfg.vocab_size
    simple = {"input_layernorm.weight": "input_layernorm.weight",
              "self_attention.dense.weight": "self_attn.o_proj.weight",
              "post_attention_layernorm.weight": "post_attention_layernorm.weight",
              "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight", "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight"}
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
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[-1]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.split([n * d, g * d, g * d])):
                    yield q + f"self_attn.{proj}.{kind}", part
            else:
                yield q + simple[rest], t


# ------------------------------------------------------------------------------------------ original ChatGLM2
def config_from_chatglm(hf: dict, where: str) -> ModelConfig:
    """ModelConfig of an original ChatGLM2 / CodeGeeX2 ``config.json`` dict."""
    for key, want in (("rmsnorm", True), ("post_layer_norm", True), ("original_rope", True),
                      ("apply_residual_connection_post_layernorm", False)):
        if bool(hf.get(key, want)) != want:
            raise ConversionError(f"{where}: {key}={hf[key]!r} is not supported (megaocto glm2 needs {want})")
    heads = int(_need(hf, "num_attention_heads", where))
    hidden = int(_need(hf, "hidden_size", where))
    kv = int(hf.get("kv_channels") or hidden // heads)
    groups = int(hf.get("multi_query_group_num", 1)) if hf.get("multi_query_attention", False) else heads
    seq = int(hf.get("seq_length", 2048))
    cfg = ModelConfig(
        family=FAMILY, num_layers=int(_need(hf, "num_layers", where)), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=None if kv * heads == hidden else kv,
        ffn_hidden_size=int(_need(hf, "ffn_hidden_size", where)),
        vocab_size=int(hf.get("padded_vocab_size") or _need(hf, "vocab_size", where)),
        seq_length=min(seq, 2048), max_position_embeddings=seq, activation="swiglu",
        norm_epsilon=float(hf.get("layernorm_epsilon", 1e-5)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        hidden_dropout=float(hf.get("hidden_dropout", 0.0)), add_qkv_bias=bool(hf.get("add_qkv_bias", True)),
        add_bias_linear=bool(hf.get("add_bias_linear", False)), tie_embeddings=False, rotary_percent=0.5,
        rotary_base=10000.0 * float(hf.get("rope_ratio", 1.0)))
    return _validated(cfg, where)


def chatglm_names(cfg: ModelConfig) -> list[str]:
    names = ["transformer.embedding.word_embeddings.weight"]
    for i in range(cfg.num_layers):
        q = f"transformer.encoder.layers.{i}."
        names.append(q + "input_layernorm.weight")
        names += [q + f"self_attention.query_key_value.{k}" for k in _kinds(cfg)]
        names.append(q + "self_attention.dense.weight")
        if cfg.add_bias_linear:
            names.append(q + "self_attention.dense.bias")
        names.append(q + "post_attention_layernorm.weight")
        for m in ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            names.append(q + f"{m}.weight")
            if cfg.add_bias_linear:
                names.append(q + f"{m}.bias")
    return names + ["transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"]


def chatglm_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor :func:`chatglm_names` lists, from the config alone (``query_key_value`` has
    ``(heads + 2·groups)·kv_channels`` rows, ``dense_h_to_4h`` 2·ffn)."""
    h, f, V = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    qd = cfg.num_attention_heads * cfg.head_dim
    qkv = qd + 2 * cfg.num_query_groups * cfg.head_dim
    per_layer = {"input_layernorm.weight": (h,), "self_attention.query_key_value.weight": (qkv, h),
                 "self_attention.query_key_value.bias": (qkv,), "self_attention.dense.weight": (h, qd),
                 "self_attention.dense.bias": (h,), "post_attention_layernorm.weight": (h,),
                 "mlp.dense_h_to_4h.weight": (2 * f, h), "mlp.dense_h_to_4h.bias": (2 * f,),
                 "mlp.dense_4h_to_h.weight": (h, f), "mlp.dense_4h_to_h.bias": (h,)}
    shapes = {}
    for name in chatglm_names(cfg):
        if name.startswith("transformer.encoder.layers."):
            shapes[name] = per_layer[name.split(".", 4)[4]]
        elif name == "transformer.encoder.final_layernorm.weight":
            shapes[name] = (h,)
        else:  # word embeddings, output layer
            shapes[name] = (V, h)
    return shapes


CHATGLM_IGNORABLE = {"transformer.rotary_pos_emb.inv_freq"}


def chatglm_to_ours_name(name: str) -> str:
    if name == "transformer.embedding.word_embeddings.weight":
        return "embedding.word_embeddings.weight"
    if name == "transformer.output_layer.weight":
        return "output_layer.weight"
    if name.startswith("transformer.encoder."):
        return name[len("transformer.encoder."):]
    raise ConversionError(f"unexpected ChatGLM2 tensor {name!r}")


def check_chatglm_inv_freq(cfg: ModelConfig, inv_freq: torch.Tensor, where: str) -> None:
    """The stored rotary buffer must match rotary_dim/2 frequencies of base ``cfg.rotary_base``."""
    rot = cfg.rotary_dim
    if inv_freq.numel() != rot // 2:
        raise ConversionError(f"{where}: transformer.rotary_pos_emb.inv_freq has {inv_freq.numel()} entries, "
                              f"expected rotary_dim/2 = {rot // 2} (kv_channels={cfg.head_dim})")
    ref = 1.0 / (cfg.rotary_base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    if not torch.allclose(inv_freq.double(), ref, rtol=1e-2, atol=0):
        raise ConversionError(f"{where}: transformer.rotary_pos_emb.inv_freq does not match base "
                              f"{cfg.rotary_base} (config.json rope_ratio?)")


def iter_from_chatglm(cfg: ModelConfig, get) -> Iterator[tuple[str, torch.Tensor]]:
    """(megaocto name, tensor) in megaocto order from ChatGLM2-layout tensors."""
    for hf_name in chatglm_names(cfg):
        yield chatglm_to_ours_name(hf_name), get(hf_name)


def chatglm_to_native(cfg: ModelConfig, get) -> Iterator[tuple[str, torch.Tensor]]:
    """Native Glm (name, tensor) straight from ChatGLM2-layout tensors (used by --verify as an independent path:
    it splits ``query_key_value`` into q/k/v itself and never goes through megaocto's names)."""
    n, g, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    yield "model.embed_tokens.weight", get("transformer.embedding.word_embeddings.weight")
    for i in range(cfg.num_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        yield dst + "input_layernorm.weight", get(src + "input_layernorm.weight")
        for kind in _kinds(cfg):
            q, k, v = get(src + f"self_attention.query_key_value.{kind}").split([n * d, g * d, g * d])
            yield dst + f"self_attn.q_proj.{kind}", q
            yield dst + f"self_attn.k_proj.{kind}", k
            yield dst + f"self_attn.v_proj.{kind}", v
        yield dst + "self_attn.o_proj.weight", get(src + "self_attention.dense.weight")
        yield dst + "post_attention_layernorm.weight", get(src + "post_attention_layernorm.weight")
        yield dst + "mlp.gate_up_proj.weight", get(src + "mlp.dense_h_to_4h.weight")
        yield dst + "mlp.down_proj.weight", get(src + "mlp.dense_4h_to_h.weight")
    yield "model.norm.weight", get("transformer.encoder.final_layernorm.weight")
    yield "lm_head.weight", get("transformer.output_layer.weight")

"""LoRA adapters <-> Hugging Face PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

megaocto adapters (:mod:`megaocto.model.lora`) are named ``layers.<i>.<host path>.lora.<target>.{A,B}`` and held
unsharded here (``A [r, in]``, ``B [out, r]``, B's rows in megaocto's block order). PEFT names them
``base_model.model.<HF module>.lora_{A,B}.weight`` on the HF twin the converters write (``to-hf``):

* bigcode (GPTBigCode): ``query_key_value`` -> ``attn.c_attn`` (multi-query: one A shared by megaocto's query and
  key_value, B = [B_query; B_key_value]; multi-head: B's rows permuted to HF's per-head [q|k|v]); ``query`` or
  ``key_value`` alone -> ``attn.c_attn`` with zero B rows for the other part; ``dense`` -> ``attn.c_proj``;
  ``fc1`` -> ``mlp.c_fc``; ``fc2`` -> ``mlp.c_proj``.
* glm2 (transformers Glm): ``q``/``k``/``v`` -> ``self_attn.{q,k,v}_proj``; ``query_key_value`` (one A) ->
  all three with the A repeated (the same function); ``dense`` -> ``self_attn.o_proj``; ``up`` ->
  ``mlp.gate_up_proj``; ``down`` -> ``mlp.down_proj``.
* llama: ``q k v o`` -> ``self_attn.{q,k,v,o}_proj``; ``gate up down`` -> ``mlp.{gate,up,down}_proj``.

Every mapping is exact in the forward (the PEFT model's logits equal megaocto's); where PEFT trains one A per HF
module and megaocto shares one (glm2 query_key_value), the trained adapters differ but an exported one is equal.
"""
from __future__ import annotations

import json
import os
import re

import torch

from megaocto.config.model import LoraConfig, ModelConfig, lora_target_specs
from megaocto.convert.core import ConversionError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

_BIGCODE = {"dense": "attn.c_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
_GLM = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "dense": "self_attn.o_proj",
        "up": "mlp.gate_up_proj", "down": "mlp.down_proj"}
_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _layer_prefix(cfg: ModelConfig, i: int) -> str:
    return f"transformer.h.{i}." if cfg.family == "bigcode" else f"model.layers.{i}."


def _adapters(cfg: ModelConfig) -> dict[str, str]:
    """{target (megaocto adapter key): host path} of cfg.lora."""
    specs = lora_target_specs(cfg.lora, cfg.family, cfg.is_mqa)
    return {(group or t): path for t, (path, _, _, group) in specs.items()}


def to_peft(cfg: ModelConfig, full: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(PEFT tensors, PEFT target_modules) from megaocto's unsharded adapter tensors."""
    h, d, n, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    specs = lora_target_specs(cfg.lora, cfg.family, cfg.is_mqa)
    out: dict[str, torch.Tensor] = {}
    modules: list[str] = []

    def put(i, module, a, b):
        key = PREFIX + _layer_prefix(cfg, i) + module
        if key + ".lora_A.weight" in out:
            raise ConversionError(f"two megaocto adapters map onto the one PEFT module {module} (e.g. glm2 "
                                  f"query_key_value together with q/k/v); train with one of them")
        out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = a.contiguous(), b.contiguous()
        if module not in modules:
            modules.append(module)

    for i in range(cfg.num_layers):
        p = f"layers.{i}."

        def get(path, key):
            return full[f"{p}{path}.lora.{key}.A"], full[f"{p}{path}.lora.{key}.B"]

        if cfg.family == "bigcode":
            from megaocto.convert.hf_bigcode import blocks_qkv_to_per_head

            if "query_key_value.q" in specs:
                a, bq = get("self_attention.query", "query_key_value")
                _, bkv = get("self_attention.key_value", "query_key_value")
                put(i, "attn.c_attn", a, torch.cat([bq, bkv]))
            elif "query_key_value" in specs:
                a, b = get("self_attention.query_key_value", "query_key_value")
                put(i, "attn.c_attn", a, blocks_qkv_to_per_head(b, n, d))
            elif "query" in specs and "key_value" in specs:
                raise ConversionError("LoRA adapters on bigcode query and key_value separately (two A's) cannot "
                                      "be written as PEFT's one c_attn adapter; train with target query_key_value "
                                      "(c_attn)")
            elif "query" in specs:
                a, b = get("self_attention.query", "query")
                put(i, "attn.c_attn", a, torch.cat([b, b.new_zeros(2 * d, b.shape[1])]))
            elif "key_value" in specs:
                a, b = get("self_attention.key_value", "key_value")
                put(i, "attn.c_attn", a, torch.cat([b.new_zeros(h, b.shape[1]), b]))
            for t, module in _BIGCODE.items():
                if t in specs:
                    put(i, module, *get(specs[t][0], t))
        elif cfg.family == "glm2":
            if "query_key_value" in specs:
                a, b = get("self_attention.query_key_value", "query_key_value")
                for t, part in zip("qkv", b.split([n * d, g * d, g * d])):
                    put(i, _GLM[t], a, part)
            for t, module in _GLM.items():
                if t in specs:
                    put(i, module, *get(specs[t][0], t))
        else:
            for t, module in _LLAMA.items():
                if t in specs:
                    put(i, module, *get(specs[t][0], t))
    return out, modules


def peft_config(cfg: ModelConfig, modules: list[str], base: str | None) -> dict:
    """The ``adapter_config.json`` dict (PEFT LoraConfig) of ``cfg.lora``."""
    lora = cfg.lora
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": modules, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}


def write_peft_adapter(directory: str, cfg: ModelConfig, full: dict[str, torch.Tensor], *,
                       base: str | None = None, dtype: torch.dtype | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for megaocto's unsharded adapters ``full``."""
    from safetensors.torch import save_file

    tensors, modules = to_peft(cfg, full)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_config(cfg, modules, base), f, indent=2)


# ------------------------------------------------------------------------------------------ import
def read_peft_adapter(directory: str, base_cfg: ModelConfig) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, megaocto's unsharded adapter tensors) of a PEFT adapter folder for a model of ``base_cfg``.

    Raises ConversionError (one line, naming the file) for what megaocto cannot hold: another adapter type,
    rank/alpha patterns, rsLoRA/DoRA, bias training, modules megaocto has no adapter for, or shapes that do not
    fit the base model."""
    from safetensors.torch import load_file

    cpath, wpath = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (cpath, wpath):
        if not os.path.exists(path):
            raise ConversionError(f"{path}: missing; a PEFT LoRA adapter folder holds {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS}")
    with open(cpath) as f:
        conf = json.load(f)
    return from_peft(base_cfg, conf, load_file(wpath), cpath=cpath, wpath=wpath)


def from_peft(base_cfg: ModelConfig, conf: dict, raw: dict[str, torch.Tensor], *, cpath: str = ADAPTER_CONFIG,
              wpath: str = ADAPTER_WEIGHTS) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """:func:`read_peft_adapter` on an adapter config dict and PEFT-named tensors already in memory."""
    if conf.get("peft_type") != "LORA":
        raise ConversionError(f"{cpath}: peft_type {conf.get('peft_type')!r}; only LORA adapters are supported")
    for key, ok in (("rank_pattern", {}), ("alpha_pattern", {}), ("use_rslora", False), ("use_dora", False),
                    ("bias", "none"), ("fan_in_fan_out", False), ("modules_to_save", None)):
        if conf.get(key, ok) not in (ok, None) and conf.get(key) != ok:
            raise ConversionError(f"{cpath}: {key}={conf.get(key)!r} is not supported (megaocto LoRA needs {ok!r})")
    r, alpha = int(conf["r"]), float(conf["lora_alpha"])
    tensors = {re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", k): v for k, v in raw.items()}
    fam = {"bigcode": {**_BIGCODE, "query_key_value": "attn.c_attn"}, "glm2": _GLM, "llama": _LLAMA}[base_cfg.family]
    modules = sorted({m for k in tensors for m in [_module_of(k, base_cfg)]})
    by_module = {v: t for t, v in fam.items()}
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ConversionError(f"{wpath}: adapters on {unknown} have no megaocto {base_cfg.family} target "
                              f"(supported HF modules: {', '.join(sorted(by_module))})")
    targets = [by_module[m] for m in modules]
    lora = LoraConfig(rank=r, alpha=alpha, dropout=float(conf.get("lora_dropout", 0.0)), target_modules=targets)
    cfg = ModelConfig(**{**base_cfg.to_dict(), "lora": lora})
    try:
        cfg.validate()
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise ConversionError(f"{cpath}: {e}") from None
    # Round trip through to_peft's naming to map every tensor back, checking shapes against the base model.
    full: dict[str, torch.Tensor] = {}
    shapes = _expected_megaocto_shapes(cfg)
    h, d, n, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    for i in range(cfg.num_layers):
        for target, path in _adapters(cfg).items():
            module = fam[target] if not (cfg.family == "bigcode" and target == "query_key_value") else "attn.c_attn"
            key = PREFIX + _layer_prefix(cfg, i) + module
            if key + ".lora_A.weight" not in tensors:
                raise ConversionError(f"{wpath}: {key}.lora_A.weight missing (layer {i} of {cfg.num_layers})")
            a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
            if a.shape[0] != r or b.shape[1] != r:
                raise ConversionError(f"{wpath}: {key} has rank {a.shape[0]} but adapter_config.json says r={r}")
            p = f"layers.{i}."
            if cfg.family == "bigcode" and target == "query_key_value":
                if cfg.is_mqa:
                    _check(b, (h + 2 * d, r), key, wpath)
                    full[p + "self_attention.query.lora.query_key_value.A"] = a
                    full[p + "self_attention.query.lora.query_key_value.B"] = b[:h]
                    full[p + "self_attention.key_value.lora.query_key_value.A"] = a
                    full[p + "self_attention.key_value.lora.query_key_value.B"] = b[h:]
                    continue
                from megaocto.convert.hf_bigcode import per_head_qkv_to_blocks

                _check(b, (3 * h, r), key, wpath)
                b = per_head_qkv_to_blocks(b, n, d)
            full[f"{p}{path}.lora.{target}.A"], full[f"{p}{path}.lora.{target}.B"] = a, b
    for k, t in full.items():
        if k in shapes and tuple(t.shape) != shapes[k]:
            raise ConversionError(f"{wpath}: {k} has shape {tuple(t.shape)} but the base model needs {shapes[k]} "
                                  f"(adapter trained for another base model?)")
    _ = g
    return lora, full


def _check(t, shape, key, where):
    if tuple(t.shape) != shape:
        raise ConversionError(f"{where}: {key}.lora_B has shape {tuple(t.shape)} but the base model needs {shape} "
                              f"(adapter trained for another base model?)")


def _module_of(key: str, cfg: ModelConfig) -> str:
    m = re.match(r"^base_model\.model\.(?:transformer\.h|model\.layers)\.\d+\.(.+)\.lora_[AB]\.weight$", key)
    if m is None:
        raise ConversionError(f"unexpected PEFT tensor name {key!r} for a {cfg.family} model")
    return m.group(1)


def _expected_megaocto_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Unsharded shapes of the adapters of ``cfg`` (built on the meta device)."""
    from megaocto.model import build_model
    from megaocto.model.lora import is_lora_key
    from megaocto.parallel.context import ParallelContext

    model = build_model(cfg, ParallelContext.single(), device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if is_lora_key(k)}


# ------------------------------------------------------------------------------------------ checkpoints
def read_adapter_checkpoint(load: str, iteration=None) -> tuple[ModelConfig, dict[str, torch.Tensor], dict, str]:
    """(config, unsharded adapters, base reference, checkpoint dir) of a LoRA run's checkpoint at any TP."""
    from megaocto import checkpoint as ckpt
    from megaocto.convert.core import checkpoint_info, config_from_metadata, param_specs
    from megaocto.model.lora import is_lora_key
    from megaocto.parallel.layers import merge_shards

    directory, meta, _ = checkpoint_info(load, iteration)
    where = os.path.join(directory, ckpt.METADATA)
    cfg = config_from_metadata(meta, where)
    if not cfg.lora.enabled:
        raise ConversionError(f"{where}: not a LoRA checkpoint (model.lora.rank=0); --lora-format/--merge-lora "
                              f"apply to checkpoints of LoRA runs")
    tp = int(meta.get("tp", 1))
    states = [torch.load(os.path.join(directory, ckpt.rank_dir_name(r, 0, 1), ckpt.MODEL_FILE), map_location="cpu",
                         weights_only=True) for r in range(tp)]
    specs = {k: s for k, s in param_specs(cfg, tp).items() if is_lora_key(k)}
    full = {}
    for name, spec in specs.items():
        if name not in states[0]["model"]:
            raise ConversionError(f"{directory}: adapter {name!r} missing (config.model.lora in metadata.json does "
                                  f"not match the saved adapters)")
        parts = [s["model"][name] for s in states]
        full[name] = parts[0] if spec.partition_dim is None or tp == 1 else merge_shards(
            parts, spec.partition_dim, spec.partition_blocks)
    return cfg, full, states[0].get("lora_base") or {}, directory


def export_peft(load: str, output: str, *, iteration=None, dtype=None) -> None:
    """``megaocto convert to-hf --lora-format peft``: a LoRA checkpoint's adapters as a PEFT adapter folder."""
    from megaocto.convert.core import AtomicDir, check_output_free, parse_dtype

    cfg, full, ref, _ = read_adapter_checkpoint(load, iteration)
    check_output_free(output)
    with AtomicDir(output) as tmp:
        write_peft_adapter(tmp, cfg, full, base=ref.get("path"), dtype=parse_dtype(dtype))


def merged_base_tensors(cfg: ModelConfig, base: dict[str, torch.Tensor], full: dict[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
    """The base's unsharded tensors with every adapter folded in (``W[rows] += alpha/r · B A``), in fp32 math."""
    from megaocto.model import build_model
    from megaocto.model.lora import LoraAdapter
    from megaocto.parallel.context import ParallelContext

    model = build_model(cfg, ParallelContext.single(), device="meta")  # tp=1: out_slice = rows of the full weight
    out = dict(base)
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraAdapter):
            continue
        host = name.rsplit(".lora.", 1)[0]
        w = out[host + ".weight"]
        if w.shape[1] != full[name + ".A"].shape[1]:
            raise ConversionError(f"base {host}.weight has shape {tuple(w.shape)}; the adapter {name} needs "
                                  f"{full[name + '.A'].shape[1]} input features (another base model?)")
        s0, s1 = mod.out_slice
        w = w.clone()
        w[s0:s1] += (mod.scale * full[name + ".B"].float() @ full[name + ".A"].float()).to(w.dtype)
        out[host + ".weight"] = w
    return out


def merge_to_hf(load: str, output: str, *, iteration=None, base: str | None = None, **to_hf_kwargs) -> None:
    """``megaocto convert to-hf --merge-lora``: base (from the checkpoint's reference, or ``base``) + merged adapters
    as a full HF model directory."""
    import dataclasses
    import tempfile

    from megaocto.convert.core import check_output_free, read_megaocto_checkpoint, write_megaocto_checkpoint
    from megaocto.convert.hf import to_hf

    cfg, full, ref, directory = read_adapter_checkpoint(load, iteration)
    check_output_free(output)
    base_path, base_it = (base, None) if base else (ref.get("path"), ref.get("iteration"))
    if not base_path:
        raise ConversionError(f"{directory}: the LoRA run's base was initialised from the seed (no base checkpoint "
                              f"recorded); pass --base with a megaocto checkpoint of the base")
    base_cfg, tensors = read_megaocto_checkpoint(base_path, iteration=base_it)
    plain = dataclasses.replace(cfg, lora=LoraConfig())
    shape_fields = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_size")
    diff = [f for f in shape_fields if getattr(base_cfg, f) != getattr(plain, f)]
    if diff:
        raise ConversionError(f"{base_path}: base model does not match the adapters' model ({', '.join(diff)} differ)")
    merged = merged_base_tensors(cfg, dict(tensors), full)
    with tempfile.TemporaryDirectory(prefix="megaocto_merge_") as tmp:
        ck = os.path.join(tmp, "merged")
        write_megaocto_checkpoint(ck, plain, merged, 1, progress=False)
        to_hf(ck, output, **to_hf_kwargs)


def from_hf_with_adapter(hf_dir: str, adapter_dir: str, output: str, *, tp: int = 1, dtype=None,
                         progress: bool = True) -> None:
    """``megaocto convert from-hf --lora DIR``: an HF base plus a PEFT adapter folder -> a megaocto checkpoint with
    ``model.lora`` set and the adapters stored (training with ``checkpoint.load`` continues from them)."""
    import dataclasses
    import itertools

    from megaocto.convert import core
    from megaocto.convert.hf import _source_iter, plan_from_hf

    plan = plan_from_hf(hf_dir, tp)
    lora, full = read_peft_adapter(adapter_dir, plan.cfg)
    cfg = dataclasses.replace(plan.cfg, lora=lora)
    cfg.validate(tp)
    core.check_output_free(output)
    meta = {"converted_from": {"kind": "hf", "layout": plan.layout, "path": os.path.abspath(hf_dir),
                               "token_ids": plan.token_ids, "peft_adapter": os.path.abspath(adapter_dir)}}
    core.write_megaocto_checkpoint(output, cfg, itertools.chain(_source_iter(plan), full.items()), tp,
                                   dtype=core.parse_dtype(dtype), metadata_extra=meta, progress=progress)

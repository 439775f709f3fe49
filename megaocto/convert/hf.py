"""``from_hf`` / ``to_hf``: Hugging Face model directory <-> megaocto checkpoint, any TP, streaming, verified.

``from_hf(hf_dir, output, *, tp=1, dtype=None, verify=False, progress=True) -> float | None``
    ``hf_dir`` is a local directory or a hub id ``owner/name[@revision]`` (:func:`megaocto.convert.io.resolve_hf`:
    huggingface_hub's cache, only the needed files downloaded, a cached snapshot also offline). Detects the layout
    from ``config.json`` — ``gpt_bigcode`` (hf_bigcode.py), native ``glm`` or original ``chatglm`` (hf_glm.py),
    ``llama`` (hf_llama.py) — checks the config, the TP split, every weight's name, shape (against the family's
    ``expected_hf_shapes``) and dtype, and that ``output`` does not exist, all before writing; then streams the
    tensors one layer at a time through :func:`megaocto.convert.core.write_megaocto_checkpoint`. With ``verify``
    returns (and prints) the max abs logit difference between the HF source (transformers; for ChatGLM2 a native
    ``GlmForCausalLM`` built from an independent q/k/v split) and the written checkpoint (merged, tp=1) on a fixed
    random batch, one model in memory at a time; above ``verify_tol`` (default
    :func:`megaocto.convert.core.default_verify_tol`) it raises :class:`megaocto.convert.core.VerifyError`.

``to_hf(load, output, *, dtype=None, tokenizer=None, max_shard_size="5GB", iteration=None, verify=False,
progress=True) -> float | None``
    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or ``model-0000i-of-0000N`` shards +
    ``model.safetensors.index.json`` above ``max_shard_size``) and the tokenizer files, into a temporary directory
    renamed to ``output`` when complete; ``AutoModelForCausalLM.from_pretrained(output)`` loads it offline.
    Vocabulary padding is trimmed to ``vocab_size``. RAM: about one layer (the reader merges TP shards tensor by
    tensor from mmap-ed rank files; the safetensors layout is planned up front from the config and each tensor's
    bytes are written as it arrives, with no shard buffer). ``dtype`` defaults to the dtype of the stored tensors
    (:func:`megaocto.convert.core.checkpoint_dtype`; training checkpoints record none in metadata.json).
"""
from __future__ import annotations

import dataclasses
import os
from types import ModuleType

import torch

from megaocto.config.model import ModelConfig
from megaocto.convert import core, hf_bigcode, hf_glm, hf_llama
from megaocto.convert.core import ConversionError
from megaocto.convert.io import (HFSource, SafetensorsShardWriter, copy_tokenizer, parse_size, resolve_hf,
                                 special_tokens, tokenizer_files)

FAMILIES: dict[str, ModuleType] = {"bigcode": hf_bigcode, "glm2": hf_glm, "llama": hf_llama}


@dataclasses.dataclass
class HFPlan:
    """What a from-hf conversion will do, decided (and checked) before writing."""
    layout: str  # gpt_bigcode | glm | chatglm | llama
    cfg: ModelConfig
    source: HFSource
    token_ids: dict


def plan_from_hf(hf_dir: str, tp: int) -> HFPlan:
    """Open and check an HF directory for conversion at ``tp``; raises ConversionError naming the file/field."""
    src = HFSource(hf_dir)
    conf, where = src.config, src.config_path
    if hf_bigcode.detect_gpt2_custom(conf):
        raise hf_bigcode.gpt2_custom_error(where)
    if hf_bigcode.detect(conf):
        layout, cfg = "gpt_bigcode", hf_bigcode.config_from_hf(conf, where)
        shapes = hf_bigcode.expected_hf_shapes(cfg)
        ignorable = hf_bigcode.ignorable_hf_names(cfg, src.names())
    elif hf_glm.detect(conf):
        layout, cfg = "glm", hf_glm.config_from_hf(conf, where)
        shapes = hf_glm.expected_hf_shapes(cfg)
        ignorable = hf_glm.ignorable_hf_names(cfg, src.names())
    elif hf_llama.detect(conf):
        layout, cfg = "llama", hf_llama.config_from_hf(conf, where)
        shapes = hf_llama.expected_hf_shapes(cfg)
        ignorable = hf_llama.ignorable_hf_names(cfg, src.names())
    elif hf_glm.detect_chatglm(conf):
        layout, cfg = "chatglm", hf_glm.config_from_chatglm(conf, where)
        shapes, ignorable = hf_glm.chatglm_shapes(cfg), hf_glm.CHATGLM_IGNORABLE
    else:
        raise ConversionError(
            f"{where}: unsupported architecture (model_type={conf.get('model_type')!r}, architectures="
            f"{conf.get('architectures')!r}); supported: gpt_bigcode (GPTBigCodeForCausalLM), glm (GlmForCausalLM), "
            f"chatglm (ChatGLM2/CodeGeeX2), llama (LlamaForCausalLM)")
    core.check_tp(cfg, tp)
    src.check(list(shapes), ignorable, where=f"{layout} with {cfg.num_layers} layers")
    _check_shapes(shapes, src)
    if layout == "chatglm" and "transformer.rotary_pos_emb.inv_freq" in src:
        hf_glm.check_chatglm_inv_freq(cfg, src.get("transformer.rotary_pos_emb.inv_freq").float(), where)
    token_ids = {k: conf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in conf}
    return HFPlan(layout, cfg, src, token_ids)


def _check_shapes(shapes: dict[str, tuple[int, ...]], src: HFSource) -> None:
    """Every weight's shape (from the safetensors headers / mmap-ed .bin) against what config.json implies, so a
    config/weights mismatch (e.g. multi_query against MHA weights) fails before writing, naming file and tensor."""
    for name, shape in shapes.items():
        got = tuple(src.info(name)[0])
        if got != tuple(shape):
            raise ConversionError(f"{src._require(name)}: {name} has shape {got} but {src.config_path} implies "
                                  f"{tuple(shape)} (check multi_query / num_key_value_heads / head_dim / sizes)")


def _source_iter(plan: HFPlan):
    get = plan.source.get
    if plan.layout == "gpt_bigcode":
        return hf_bigcode.iter_from_hf(plan.cfg, get)
    if plan.layout == "glm":
        return hf_glm.iter_from_hf(plan.cfg, get)
    if plan.layout == "llama":
        return hf_llama.iter_from_hf(plan.cfg, get)
    return hf_glm.iter_from_chatglm(plan.cfg, get)


def hf_logits_fn(hf_dir: str):
    """ids -> fp32 logits of ``AutoModelForCausalLM.from_pretrained(hf_dir)`` (offline, fp32, eval)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()

    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(ids).logits.float()

    return run


def _chatglm_reference_fn(plan: HFPlan):
    """A native GlmForCausalLM built in memory from ChatGLM2-layout tensors (independent q/k/v split)."""
    from transformers import GlmForCausalLM

    cfg = plan.cfg
    with torch.random.fork_rng(devices=[]):
        model = GlmForCausalLM(hf_glm.hf_config(cfg, dtype=torch.float32)).eval()
    own = model.state_dict()
    filled = set()
    with torch.no_grad():
        for n, t in hf_glm.chatglm_to_native(cfg, plan.source.get):  # tensor by tensor: one fp32 model copy
            own[n].copy_(t)
            filled.add(n)
    missing = sorted(set(own) - filled)
    if missing:
        raise ConversionError(f"verify: the native Glm reference lacks {missing[:4]}")

    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(ids).logits.float()

    return run


def _verify_seq(cfg: ModelConfig) -> int:
    return min(16, cfg.max_positions)


def from_hf(hf_dir: str, output: str, *, tp: int = 1, dtype=None, verify: bool = False,
            progress: bool = True, verify_tol: float | None = None) -> float | None:
    """HF directory -> megaocto release checkpoint at ``tp``; see the module docstring."""
    cast = core.parse_dtype(dtype)
    hf_dir, hub = resolve_hf(hf_dir)
    plan = plan_from_hf(hf_dir, tp)
    if verify and plan.layout == "chatglm" and plan.cfg.add_bias_linear:
        raise ConversionError(f"{plan.source.config_path}: --verify needs add_bias_linear=false (the native Glm "
                              f"reference has no dense/MLP bias)")
    core.check_output_free(output)
    meta = {"converted_from": {"kind": "hf", "layout": plan.layout, "path": os.path.abspath(hf_dir),
                               "token_ids": plan.token_ids, **(hub or {})}}
    core.write_megaocto_checkpoint(output, plan.cfg, _source_iter(plan), tp, dtype=cast, metadata_extra=meta,
                                   progress=progress)
    if not verify:
        return None
    def make_src():
        return _chatglm_reference_fn(plan) if plan.layout == "chatglm" else hf_logits_fn(hf_dir)

    ours, what = core.checkpoint_logits_fn(output)
    return core.verify_lazy(make_src, lambda: ours, plan.cfg.vocab_size, label=f"HF {plan.layout} vs {what}",
                            seq=_verify_seq(plan.cfg), tol=verify_tol, cast=cast)


def to_hf(load: str, output: str, *, dtype=None, tokenizer: str | None = None, max_shard_size: str | int = "5GB",
          iteration=None, verify: bool = False, progress: bool = True, verify_tol: float | None = None) -> float | None:
    """megaocto checkpoint (any TP) -> HF directory; see the module docstring."""
    cast = core.parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    directory, meta, _ = core.checkpoint_info(load, iteration)
    cfg = core.config_from_metadata(meta, os.path.join(directory, "metadata.json"))
    family = FAMILIES[cfg.family]
    family.check_exportable(cfg, os.path.join(directory, "metadata.json"))
    tokenizer = _tokenizer_or_fallback(tokenizer, meta, os.path.join(directory, "metadata.json"))
    tok_files = tokenizer_files(tokenizer) if tokenizer else []
    tok_json = next((f for f in tok_files if f.endswith(".json") and (len(tok_files) == 1 or
                                                                      os.path.basename(f) == "tokenizer.json")), None)
    if tokenizer:
        _check_tokenizer_vocab(tokenizer, cfg)
    core.check_output_free(output)
    out_dtype = cast or core.checkpoint_dtype(directory, meta)
    # ids from the HF source a checkpoint was converted from win; else the exported tokenizer's eos/bos/pad
    token_ids = ((meta.get("converted_from") or {}).get("token_ids")) or {}
    if tokenizer and not token_ids and cfg.family == "llama":  # e.g. trained from scratch with DeepSeek's tokenizer
        token_ids = hf_llama.token_ids_from_tokenizer(tokenizer)
    elif not token_ids and tok_json:
        token_ids = special_tokens(tok_json)[1]
    hf_conf = family.hf_config(cfg, dtype=out_dtype, token_ids=token_ids)
    # lazy: TP-split tensors arrive as views of the mmap-ed rank files (core.Parts) and are written from there
    _, tensors = core.read_megaocto_checkpoint(load, iteration=iteration, lazy=True)
    bar = core.Progress(len(core.units(cfg)), "to-hf", progress)
    plan = hf_plan(cfg, family, out_dtype)
    with core.AtomicDir(output) as tmp:
        writer = SafetensorsShardWriter(tmp, plan, shard_bytes)
        try:
            for unit, group in core.iter_units(tensors):
                nbytes = 0
                for name, t in family.iter_to_hf(cfg, iter(group)):
                    t = core.materialize(t).to(out_dtype) if t.dtype != out_dtype else t
                    writer.add(name, t)
                    nbytes += t.numel() * t.element_size()
                    del t
                del group
                bar.step(unit, nbytes)
        finally:
            writer.abort()
        writer.finish()
        hf_conf.save_pretrained(tmp)
        _write_generation_config(hf_conf, tmp)
        if tok_files:
            copy_tokenizer(tok_files, tmp, model_max_length=cfg.max_positions)
    if not verify:
        return None

    ours, what = core.checkpoint_logits_fn(load, iteration=iteration)
    return core.verify_lazy(lambda: ours, lambda: hf_logits_fn(output), cfg.vocab_size,
                            label=f"{what} vs HF {hf_conf.model_type}", seq=_verify_seq(cfg), tol=verify_tol,
                            cast=cast)


def hf_plan(cfg: ModelConfig, family: ModuleType, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(HF name, dtype, shape)`` of every tensor ``family.iter_to_hf`` yields for ``cfg``, in that order, without
    reading any data: the family mapping runs on meta-device tensors of the megaocto shapes (vocabulary rows are
    trimmed by the mapping, so the padding of the meta shapes does not matter)."""
    # as core.Parts (what to_hf streams): row concatenations and slices stay shape arithmetic, no meta kernels
    meta = ((name, core.Parts([torch.empty(spec.shape, dtype=dtype, device="meta")], 0))
            for name, spec in core.param_specs(cfg).items())
    return [(name, dtype, tuple(t.shape)) for name, t in family.iter_to_hf(cfg, meta)]


def _tokenizer_or_fallback(tokenizer: str | None, meta: dict, where: str) -> str | None:
    """``--tokenizer``, else the checkpoint's ``config.data.tokenizer`` (as ``megaocto generate`` does); a line on
    stderr says which one is exported, or why none is."""
    import sys

    if tokenizer:
        return tokenizer
    saved = ((meta.get("config") or {}).get("data") or {}).get("tokenizer")
    if saved and os.path.exists(saved):
        print(f"[to-hf] tokenizer: {saved} (the checkpoint's data.tokenizer; --tokenizer overrides it)",
              file=sys.stderr, flush=True)
        return saved
    why = (f"the checkpoint's data.tokenizer {saved} does not exist here" if saved
           else f"{where} names no data.tokenizer")
    print(f"[to-hf] no tokenizer exported: no --tokenizer and {why}; pass --tokenizer PATH to include one",
          file=sys.stderr, flush=True)
    return None


def _write_generation_config(hf_conf, directory: str) -> None:
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(hf_conf)
    gen.save_pretrained(directory)


def _check_tokenizer_vocab(path: str, cfg: ModelConfig) -> None:
    """A tokenizer.json with more tokens than the model's vocabulary cannot belong to it."""
    file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    if not file.endswith(".json") or not os.path.isfile(file):
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(file).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - name the file
        raise ConversionError(f"--tokenizer: {file}: cannot load ({e})") from None
    if size > cfg.vocab_size:
        raise ConversionError(f"--tokenizer: {file} has {size} tokens but the model's vocab_size is "
                              f"{cfg.vocab_size}; pass the model's own tokenizer")

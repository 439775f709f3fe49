"""Import bigcode Megatron-LM GPT checkpoints (StarCoder/SantaCoder, MQA or MHA) into a megaocto checkpoint.

Source layout (bigcode-project/Megatron-LM, reference megatron-octopack.md §1.11)::

    {load}/latest_checkpointed_iteration.txt      "1000" or "release" (optional here: the newest iter_* is used)
    {load}/iter_0001000/ or {load}/release/
        mp_rank_{t:02d}/model_optim_rng.pt         pp == 1
        mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt pp > 1 (layer numbers are local to the stage)

Each ``model_optim_rng.pt`` is a pickle with ``args`` (an ``argparse.Namespace`` that also holds Megatron
enums), ``checkpoint_version``, ``iteration`` and ``model['language_model']``::

    embedding.word_embeddings.weight          [V_pad/tp, h]         vocab-parallel (rows)
    embedding.position_embeddings.weight      [max_pos, h]          replicated
    encoder.layers.N.input_layernorm.{weight,bias}                  replicated ("transformer." in old files)
    encoder.layers.N.self_attention.query.{weight,bias}     [np*hn/tp, h]   MQA: column-parallel query
    encoder.layers.N.self_attention.key_value.{weight,bias} [2*hn, h]       MQA: replicated, rows = K then V
    encoder.layers.N.self_attention.query_key_value.{weight,bias} [3*np*hn/tp, h]   MHA, see below
    encoder.layers.N.self_attention.dense.weight    [h, np*hn/tp] (bias [h] replicated)
    encoder.layers.N.post_attention_layernorm.{weight,bias}
    encoder.layers.N.mlp.dense_h_to_4h.{weight,bias} [ffn/tp, h]    column-parallel
    encoder.layers.N.mlp.dense_4h_to_h.weight        [h, ffn/tp]    row-parallel (bias replicated)
    encoder.final_layernorm.{weight,bias}                            last pipeline stage
    output_layer.weight                              [V_pad/tp, h]   only with untied embeddings

MHA ``query_key_value`` row order. Megatron views the projection output of one TP shard as
``[s, b, np/tp, 3*hn]`` and splits the last dim into q, k, v, so for ``checkpoint_version >= 2`` the rows of a
shard are ``[np/tp, 3, hn]``: head 0's q rows, head 0's k rows, head 0's v rows, head 1's q rows, ... Shards hold
consecutive heads, so concatenating the shards gives ``[np, 3, hn]`` over all heads. Older files are fixed up per
shard as Megatron's ``fix_query_key_value_ordering`` does: version 0 stored ``[3, np/tp, hn]``, version 1.0
``[np/tp, hn, 3]``. megaocto's fused ``query_key_value`` is ``[q (np*hn); k (np*hn); v (np*hn)]`` (block order,
see megaocto.parallel.layers), so the import regroups ``[np, 3, hn] -> [3, np, hn]``.

MQA maps one to one (``query`` -> ``query``, ``key_value`` -> ``key_value``, K first then V in both).
``--apply-layernorm-1p`` checkpoints store ``gamma - 1``; the import adds 1. ``word_embeddings_for_head``
(the tied copy on the last pipeline stage) is skipped. Vocab padding rows are dropped when the tokenizer's
vocabulary size is given; otherwise the padded size becomes ``model.vocab_size`` (a note says so).

Memory: rank files are opened with ``torch.load(mmap=True)`` (lazy; legacy non-zip files are read whole), one
pipeline stage at a time, and merged one layer at a time, so anonymous memory holds about one merged layer
(mapped file pages show up in RSS but are reclaimable page cache). ``args`` is read by a restricted unpickler
(:func:`load_megatron_file`): tensors, ``argparse.Namespace``, ``OrderedDict`` and torch dtypes are rebuilt;
every other global (Megatron enums, numpy RNG state) becomes an inert :class:`Opaque` record, so nothing from
the file is executed and ``megatron`` need not be importable.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import pickle
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from megaocto.config.model import ModelConfig
from megaocto.convert.core import (ConversionError, Sharded, check_output_free, check_source_dtype, check_tp,
                                   parse_dtype, write_megaocto_checkpoint)
from megaocto.convert.hf_bigcode import per_head_qkv_to_blocks
from megaocto.checkpoint import TRACKER  # Megatron-LM uses the same tracker file name

MEGATRON_FILE = "model_optim_rng.pt"
_ITER_RE = re.compile(r"^iter_(\d+)$")
_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
HEAD_TYPES = ("multihead", "multiquery")


# ----------------------------------------------------------------------------------------- restricted unpickling
class Opaque:
    """Inert stand-in for a global the restricted unpickler does not rebuild (e.g. a Megatron enum member).

    ``module`` / ``qualname`` name the original class; ``args`` are the constructor arguments from the pickle
    (an enum member pickles as ``Class(value)``, so ``args[0]`` is its value); ``state`` is any BUILD state.
    """

    module = ""
    qualname = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """The first constructor argument (an enum member's value), or None."""
        return self.args[0] if self.args else None

    def __repr__(self) -> str:
        return f"<{self.module}.{self.qualname}{self.args!r}>"


_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; any other global becomes a subclass of :class:`Opaque`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("torch._utils", "torch._tensor") and name.startswith("_rebuild_"):
            return super().find_class(module, name)
        if module == "torch" and (name in _TORCH_DTYPES or name in ("Size", "device")):
            return super().find_class(module, name)
        if module == "torch.nn.parameter" and name == "Parameter":
            return super().find_class(module, name)
        return type(name, (Opaque,), {"module": module, "qualname": name})


def _restricted_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("megaocto_restricted_pickle")
    mod.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    return mod


def load_megatron_file(path: str, *, mmap: bool = True) -> dict:
    """The dict in a Megatron ``model_optim_rng.pt``, read with the restricted unpickler (see module doc).

    ``mmap=True`` maps the tensors lazily (zip-format files, torch >= 1.6 saves); legacy files are read whole.
    """
    module = _restricted_pickle_module()
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=False, pickle_module=module)
            except RuntimeError as e:
                if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                    raise
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:
        raise ConversionError(f"{path}: cannot read this Megatron checkpoint file ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------- locating the files
@dataclass
class MegatronSource:
    """A located bigcode Megatron-LM checkpoint: which files, which layout, and the saved ``args``."""

    directory: str  # the iter_*/release directory
    iteration: int | str
    tp: int
    pp: int
    files: dict[tuple[int, int], str]  # (tp_rank, pp_rank) -> model_optim_rng.pt
    args: argparse.Namespace
    checkpoint_version: float
    head_type: str  # multihead | multiquery
    first_keys: frozenset[str] = frozenset()  # flattened tensor names of the first rank file
    notes: list[str] = field(default_factory=list)

    def stage_files(self, pp_rank: int) -> list[str]:
        return [self.files[(t, pp_rank)] for t in range(self.tp)]


def locate_iteration(load: str, iteration: int | str | None = None) -> tuple[str, int | str]:
    """(iteration directory, iteration) of a Megatron save directory.

    ``iteration`` picks one explicitly; otherwise the tracker file names it, else the newest ``iter_*``, else
    ``release``. ``load`` may also be an ``iter_*``/``release`` directory itself (it holds ``mp_rank_*``).
    """
    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: no such directory (expected a Megatron save directory with "
                              f"{TRACKER} and iter_*/ or release/)")
    names = os.listdir(load)
    if iteration is None and any(_RANK_RE.match(n) for n in names):
        base = os.path.basename(os.path.normpath(load))
        m = _ITER_RE.match(base)
        return load, (int(m.group(1)) if m else "release" if base == "release" else base)
    if iteration is None:
        tracker = os.path.join(load, TRACKER)
        if os.path.exists(tracker):
            text = open(tracker, encoding="utf-8").read().strip()
            if text == "release":
                iteration = "release"
            elif text.isdigit():
                iteration = int(text)
            else:
                raise ConversionError(f"{tracker}:1: expected an iteration number or 'release', got {text!r}")
        else:
            iters = sorted(int(m.group(1)) for n in names if (m := _ITER_RE.match(n)))
            if iters:
                iteration = iters[-1]
            elif "release" in names:
                iteration = "release"
            else:
                raise ConversionError(f"--load {load}: no Megatron checkpoint there (no {TRACKER}, no iter_*/ and no "
                                      f"release/ directory)")
    if isinstance(iteration, str) and iteration != "release":
        if not iteration.isdigit():
            raise ConversionError(f"--iteration must be a number or 'release' (got {iteration!r})")
        iteration = int(iteration)
    directory = os.path.join(load, "release" if iteration == "release" else f"iter_{int(iteration):07d}")
    if not os.path.isdir(directory):
        have = sorted(n for n in names if _ITER_RE.match(n) or n == "release")
        raise ConversionError(f"{directory}: missing (iteration {iteration!r}); {load} has: "
                              f"{', '.join(have) or 'none'}")
    return directory, iteration


def _scan_ranks(directory: str) -> dict[tuple[int, int], str]:
    found: dict[tuple[int, int], str] = {}
    for n in sorted(os.listdir(directory)):
        m = _RANK_RE.match(n)
        if m:
            found[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(directory, n, MEGATRON_FILE)
    if not found:
        raise ConversionError(f"{directory}: no mp_rank_XX/ (or mp_rank_XX_YYY/) directories, so no Megatron model "
                              f"files to import")
    return found


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _language_model(state: dict, path: str) -> dict:
    """``model['language_model']``, with clear errors for non-GPT models and virtual pipeline files."""
    if "model" not in state:
        if "model0" in state:
            raise ConversionError(f"{path}: virtual pipeline stages (model0, model1, ...) are not supported; merge the "
                                  f"checkpoint to a plain layout with Megatron's tools/checkpoint_util.py first")
        raise ConversionError(f"{path}: no 'model' entry (keys: {sorted(state)[:8]}); not a Megatron checkpoint")
    model = state["model"]
    if not isinstance(model, dict) or "language_model" not in model:
        hint = ""
        if isinstance(model, dict) and any(k.startswith(("layers.", "embedding.")) for k in model):
            hint = " (this looks like a megaocto checkpoint, which needs no conversion)"
        keys = sorted(model)[:8] if isinstance(model, dict) else type(model).__name__
        raise ConversionError(f"{path}: model has no 'language_model' (keys: {keys}); "
                              f"not a Megatron GPT checkpoint{hint}")
    foreign = sorted(set(model) & {"lm_head", "binary_head", "pooler"})
    lm = model["language_model"]
    foreign += sorted(set(lm) & {"pooler", "decoder"})
    if foreign:
        raise ConversionError(f"{path}: has {foreign}, which GPT models do not have (a BERT/T5 checkpoint?); "
                              f"only Megatron GPT models can be imported")
    return lm


def _flat_language_model(lm: dict, path: str) -> dict[str, torch.Tensor]:
    """Flatten ``language_model`` into ``embedding.*``, ``layers.N.*``, ``final_layernorm.*``, ``output_layer.*``
    (accepting the old ``transformer`` name for ``encoder`` and ``attention`` for ``self_attention``)."""
    flat: dict[str, torch.Tensor] = {}
    for section, sub in lm.items():
        if not isinstance(sub, dict):
            raise ConversionError(f"{path}: language_model.{section} is a {type(sub).__name__}, expected a dict")
        if section in ("encoder", "transformer"):
            for k, v in sub.items():
                flat[re.sub(r"^(layers\.\d+\.)attention\.", r"\1self_attention.", k)] = v
        elif section in ("embedding", "output_layer"):
            for k, v in sub.items():
                if isinstance(v, dict):  # Megatron saves embedding = {word_embeddings: {weight}, ...}
                    for kk, vv in v.items():
                        flat[f"{section}.{k}.{kk}"] = vv
                else:
                    flat[f"{section}.{k}"] = v
        else:
            raise ConversionError(f"{path}: unknown language_model section {section!r}; only GPT layouts with "
                                  f"embedding/encoder/output_layer are supported")
    return flat


def _stage_state(path: str, *, mmap: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    state = load_megatron_file(path, mmap=mmap)
    flat = _flat_language_model(_language_model(state, path), path)
    model = state["model"]
    if "word_embeddings_for_head" in model:  # tied copy on the last stage when pp > 1
        flat["word_embeddings_for_head.weight"] = model["word_embeddings_for_head"]["weight"]
    return state, flat


def open_source(load: str, iteration: int | str | None = None) -> MegatronSource:
    """Locate the checkpoint, read ``args`` from its first rank file, check that every rank file is present."""
    directory, iteration = locate_iteration(load, iteration)
    found = _scan_ranks(directory)
    first = found[min(found)]
    if not os.path.exists(first):
        raise ConversionError(f"{first}: missing (the rank directory has no {MEGATRON_FILE})")
    state = load_megatron_file(first)
    args = state.get("args")
    if not isinstance(args, argparse.Namespace):
        raise ConversionError(f"{first}: no 'args' namespace in the checkpoint; the converter needs Megatron's saved "
                              f"arguments (num_layers, hidden_size, ...) to import it")
    tp = int(_get(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(_get(args, "pipeline_model_parallel_size", 1) or 1)
    if _get(args, "virtual_pipeline_model_parallel_size"):
        raise ConversionError(f"{first}: saved with a virtual pipeline (interleaved schedule), which is not supported; "
                              f"merge it to pp=1 with Megatron's tools/checkpoint_util.py first")
    expected = {(t, p) for t in range(tp) for p in range(pp)}
    names = {key: os.path.basename(os.path.dirname(f)) for key, f in found.items()}
    if pp == 1 and any(p > 0 or "_" in names[(t, p)][len("mp_rank_00"):] for t, p in found):
        raise ConversionError(f"{directory}: args say pipeline_model_parallel_size=1 but the directory has "
                              f"pipeline-stage rank directories ({sorted(names.values())[:4]})")
    missing = sorted(expected - set(found))
    extra = sorted(set(found) - expected)
    if extra:
        raise ConversionError(f"{directory}: rank directories {[names[k] for k in extra]} do not fit the saved layout "
                              f"tp={tp}, pp={pp} (args.tensor/pipeline_model_parallel_size)")
    absent = [found[k] for k in sorted(found) if not os.path.exists(found[k])]
    if missing or absent:
        def rank_name(t: int, p: int) -> str:
            return f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
        listed = [rank_name(*k) for k in missing] + [os.path.relpath(a, directory) for a in absent]
        raise ConversionError(f"{directory}: missing rank files for tp={tp}, pp={pp}: {', '.join(listed)} "
                              f"(incomplete copy of the checkpoint?)")
    version = float(state.get("checkpoint_version", 0) or 0)
    lm_flat = _flat_language_model(_language_model(state, first), first)
    notes: list[str] = []
    head_type = _get(args, "attention_head_type")
    if head_type is None:  # mtf branch default / pre-MQA checkpoints: infer from the weights
        mqa = any(k.endswith(".self_attention.key_value.weight") for k in lm_flat)
        head_type = "multiquery" if mqa else "multihead"
        notes.append(f"args.attention_head_type not set; the weights say {head_type}")
    if head_type not in HEAD_TYPES:
        raise ConversionError(f"{first}: unknown args.attention_head_type {head_type!r}; supported: {HEAD_TYPES}")
    if version < 2.0:
        notes.append(f"checkpoint_version {version}: query_key_value rows re-ordered as Megatron does for old files")
    return MegatronSource(directory=directory, iteration=iteration, tp=tp, pp=pp, files=dict(sorted(found.items())),
                          args=args, checkpoint_version=version, head_type=head_type,
                          first_keys=frozenset(lm_flat), notes=notes)


# ----------------------------------------------------------------------------------------- config
def _enum_value(v: Any) -> Any:
    if isinstance(v, Opaque):
        return v.value
    return getattr(v, "name", v)


def model_config_from_args(src: MegatronSource, *, vocab_size: int | None = None) -> ModelConfig:
    """The megaocto ModelConfig of the checkpoint (validated for tp=1), with clear errors for what megaocto's
    bigcode model cannot represent."""
    a, where = src.args, f"{src.files[min(src.files)]}: args"
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if not isinstance(_get(a, name), int):
            raise ConversionError(f"{where}.{name} is missing or not an integer ({_get(a, name)!r})")
    unsupported = [(flag, why) for flag, why in (
        ("swiglu", "SwiGLU MLP"), ("squared_relu", "squared-ReLU MLP"), ("glu_activation", "GLU MLP"),
        ("apply_residual_connection_post_layernorm", "post-LN residual"), ("num_experts", "mixture of experts"),
        ("use_rotary_position_embeddings", "rotary positions")) if _get(a, flag)]
    pos = _enum_value(_get(a, "position_embedding_type"))
    if pos is not None and pos not in (2, "absolute", "learned_absolute"):
        unsupported.append(("position_embedding_type", f"non-learned positions ({pos!r})"))
    if unsupported:
        raise ConversionError(f"{where}: {', '.join(f'{why} (args.{f})' for f, why in unsupported)} not supported by "
                              f"megaocto's bigcode model; only GPT with learned absolute positions and a GELU MLP "
                              f"imports")
    h, heads = a.hidden_size, a.num_attention_heads
    kv = _get(a, "kv_channels") or h // heads
    padded = _get(a, "padded_vocab_size")
    if not isinstance(padded, int):
        raise ConversionError(f"{where}.padded_vocab_size is missing; cannot size the embedding")
    if vocab_size is not None and not 0 < vocab_size <= padded:
        raise ConversionError(f"--vocab-size {vocab_size} must be in [1, padded_vocab_size={padded}] of the checkpoint")
    max_pos = _get(a, "max_position_embeddings") or _get(a, "seq_length")
    if not isinstance(max_pos, int):
        raise ConversionError(f"{where}.max_position_embeddings is missing")
    seq = _get(a, "seq_length") or max_pos
    # Biases: read off the weights when the first file has layers (Megatron versions differ in whether the fused
    # MHA projection follows --disable-bias-linear; MQA query/key_value always have one), else from args.
    keys = src.first_keys
    linear_bias = not _get(a, "disable_bias_linear", False) and _get(a, "add_bias_linear", True) is not False
    qkv_bias = linear_bias or src.head_type == "multiquery"
    if any(k.startswith("layers.") for k in keys):
        linear_bias = any(k.endswith(".self_attention.dense.bias") for k in keys)
        qkv_bias = any(k.endswith((".self_attention.query.bias", ".self_attention.query_key_value.bias"))
                       for k in keys)
    if _get(a, "openai_gelu") or _get(a, "bias_gelu_fusion", True):
        activation = "gelu_tanh"  # fused bias-GELU and openai_gelu are both the tanh approximation
    else:
        activation = "gelu"  # the unfused path is F.gelu (erf)
    cfg = ModelConfig(
        family="bigcode", num_layers=a.num_layers, hidden_size=h, num_attention_heads=heads,
        num_query_groups=1 if src.head_type == "multiquery" else heads,
        kv_channels=None if kv * heads == h else kv,
        ffn_hidden_size=_get(a, "ffn_hidden_size") or 4 * h,
        vocab_size=vocab_size if vocab_size is not None else padded,
        make_vocab_size_divisible_by=int(_get(a, "make_vocab_size_divisible_by", 128) or 128),
        seq_length=min(int(seq), int(max_pos)), max_position_embeddings=int(max_pos), activation=activation,
        norm_epsilon=float(_get(a, "layernorm_epsilon", 1e-5) or 1e-5),
        init_method_std=float(_get(a, "init_method_std", 0.02) or 0.02),
        attention_dropout=float(_get(a, "attention_dropout", 0.1) or 0.0),
        hidden_dropout=float(_get(a, "hidden_dropout", 0.1) or 0.0),
        add_qkv_bias=qkv_bias, add_bias_linear=linear_bias,
        tie_embeddings=not _get(a, "untie_embeddings_and_output_weights", False))
    cfg.validate(1)
    return cfg


# ----------------------------------------------------------------------------------------- per-tensor rules
# How each Megatron tensor is split over TP: "rows"/"cols" = concatenate the shards along dim 0/1, "rep" =
# replicated (rank 0's copy), "qkv" = fused MHA projection (rows, per-head interleaved; see module doc).
_LAYER_RULES = {  # in megaocto's state_dict order
    "input_layernorm.weight": "rep", "input_layernorm.bias": "rep",
    "self_attention.query.weight": "rows", "self_attention.query.bias": "rows",
    "self_attention.key_value.weight": "rep", "self_attention.key_value.bias": "rep",
    "self_attention.query_key_value.weight": "qkv", "self_attention.query_key_value.bias": "qkv",
    "self_attention.dense.weight": "cols", "self_attention.dense.bias": "rep",
    "post_attention_layernorm.weight": "rep", "post_attention_layernorm.bias": "rep",
    "mlp.dense_h_to_4h.weight": "rows", "mlp.dense_h_to_4h.bias": "rows",
    "mlp.dense_4h_to_h.weight": "cols", "mlp.dense_4h_to_h.bias": "rep",
}
_TOP_RULES = {
    "embedding.word_embeddings.weight": "rows", "embedding.position_embeddings.weight": "rep",
    "final_layernorm.weight": "rep", "final_layernorm.bias": "rep", "output_layer.weight": "rows",
    "word_embeddings_for_head.weight": "skip",
}


def expected_layer_shapes(cfg: ModelConfig, tp: int, head_type: str) -> dict[str, tuple[int, ...]]:
    """Per-rank shapes of one Megatron layer's tensors (the keys a layer must have)."""
    h, d, heads, ffn = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.ffn_size
    s: dict[str, tuple[int, ...]] = {f"{ln}.{p}": (h,) for ln in ("input_layernorm", "post_attention_layernorm")
                                     for p in ("weight", "bias")}
    if head_type == "multiquery":
        s.update({"self_attention.query.weight": (heads * d // tp, h), "self_attention.key_value.weight": (2 * d, h)})
        if cfg.add_qkv_bias:
            s.update({"self_attention.query.bias": (heads * d // tp,), "self_attention.key_value.bias": (2 * d,)})
    else:
        s["self_attention.query_key_value.weight"] = (3 * heads * d // tp, h)
        if cfg.add_qkv_bias:
            s["self_attention.query_key_value.bias"] = (3 * heads * d // tp,)
    s["self_attention.dense.weight"] = (h, heads * d // tp)
    s["mlp.dense_h_to_4h.weight"] = (ffn // tp, h)
    s["mlp.dense_4h_to_h.weight"] = (h, ffn // tp)
    if cfg.add_bias_linear:
        s.update({"self_attention.dense.bias": (h,), "mlp.dense_h_to_4h.bias": (ffn // tp,),
                  "mlp.dense_4h_to_h.bias": (h,)})
    return s


def _fix_qkv_version(t: torch.Tensor, heads_local: int, d: int, version: float) -> torch.Tensor:
    """One shard's fused QKV rows in the ``[np/tp, 3, hn]`` order of checkpoint_version >= 2."""
    if version >= 2.0:
        return t
    rest = t.shape[1:]
    if version == 0:  # [3, np, hn]
        return t.view(3, heads_local, d, *rest).transpose(0, 1).reshape(t.shape)
    return t.view(heads_local, d, 3, *rest).transpose(1, 2).reshape(t.shape)  # 1.0: [np, hn, 3]


def merge_shards_megatron(rule: str, shards: list[torch.Tensor], *, heads: int, head_dim: int,
                          version: float) -> torch.Tensor:
    """The full tensor in Megatron's own (version >= 2) layout from the TP shards of one tensor."""
    if rule == "rep":
        return shards[0]
    if rule == "rows":
        return torch.cat(shards, dim=0) if len(shards) > 1 else shards[0]
    if rule == "cols":
        return torch.cat(shards, dim=1) if len(shards) > 1 else shards[0]
    if rule == "qkv":
        local = heads // len(shards)
        fixed = [_fix_qkv_version(s, local, head_dim, version) for s in shards]
        return torch.cat(fixed, dim=0) if len(fixed) > 1 else fixed[0]
    raise ValueError(f"unknown merge rule {rule!r}")


# ----------------------------------------------------------------------------------------- validation + streaming
def _check_stage(src: MegatronSource, cfg: ModelConfig, p: int, flats: list[dict[str, torch.Tensor]],
                 padded: int) -> int:
    """Check one pipeline stage's keys and per-rank shapes; returns its number of layers."""
    layer_shapes = expected_layer_shapes(cfg, src.tp, src.head_type)
    files = src.stage_files(p)
    layer_ids = sorted({int(k.split(".")[1]) for k in flats[0] if k.startswith("layers.")})
    if layer_ids != list(range(len(layer_ids))):
        raise ConversionError(f"{files[0]}: layer numbers {layer_ids[:6]}... are not 0..n-1")
    top = {"embedding.word_embeddings.weight": (padded // src.tp, cfg.hidden_size),
           "embedding.position_embeddings.weight": (cfg.max_positions, cfg.hidden_size),
           "final_layernorm.weight": (cfg.hidden_size,), "final_layernorm.bias": (cfg.hidden_size,),
           "output_layer.weight": (padded // src.tp, cfg.hidden_size),
           "word_embeddings_for_head.weight": (padded // src.tp, cfg.hidden_size)}
    first, last = p == 0, p == src.pp - 1
    want = set()
    if first:
        want |= {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight"}
    if last:
        want |= {"final_layernorm.weight", "final_layernorm.bias"}
        if not cfg.tie_embeddings:
            want.add("output_layer.weight")
    for t, (path, flat) in enumerate(zip(files, flats)):
        expected = {k: v for k, v in top.items() if k in want}
        for i in layer_ids:
            expected.update({f"layers.{i}.{k}": v for k, v in layer_shapes.items()})
        optional = {"word_embeddings_for_head.weight"} if last and src.pp > 1 else set()
        missing = sorted(set(expected) - set(flat))
        unknown = sorted(set(flat) - set(expected) - optional)
        if "embedding.position_embeddings.weight" in missing and first:
            raise ConversionError(f"{path}: no embedding.position_embeddings (rotary/alibi positions?); only learned "
                                  f"absolute positions are supported")
        if missing or unknown:
            raise ConversionError(f"{path}: tensors do not match a Megatron GPT {src.head_type} layer layout "
                                  f"(args.attention_head_type={src.head_type}); missing {missing[:6]}, unexpected "
                                  f"{unknown[:6]}")
        for k, shape in expected.items():
            check_source_dtype(flat[k].dtype, f"{path}: {k}")
            got = tuple(flat[k].shape)
            if got != shape:
                raise ConversionError(f"{path}: {k} has shape {got}, expected {shape} from args (hidden_size="
                                      f"{cfg.hidden_size}, heads={cfg.num_attention_heads}, "
                                      f"kv_channels={cfg.head_dim}, ffn={cfg.ffn_size}, padded_vocab={padded}, "
                                      f"tp={src.tp})")
    return len(layer_ids)


def validate_source(src: MegatronSource, cfg: ModelConfig) -> None:
    """Read every rank file (lazily) and check keys, shapes and the layer count before anything is written."""
    padded = int(src.args.padded_vocab_size)
    if padded % src.tp:
        raise ConversionError(f"args.padded_vocab_size={padded} is not divisible by "
                              f"tensor_model_parallel_size={src.tp}")
    total = 0
    for p in range(src.pp):
        flats = [_stage_state(f)[1] for f in src.stage_files(p)]
        total += _check_stage(src, cfg, p, flats, padded)
        del flats
    if total != cfg.num_layers:
        raise ConversionError(f"{src.directory}: the rank files hold {total} layers but "
                              f"args.num_layers={cfg.num_layers}")


def iter_megatron_full(src: MegatronSource, cfg: ModelConfig, *, keep_sharded: bool = False
                       ) -> Iterator[tuple[str, torch.Tensor | Sharded]]:
    """(name, full tensor) in Megatron's own naming and (version >= 2) layout, merged over TP, global layer
    numbers, streaming: one pipeline stage's files open (mmap) at a time, one tensor merged at a time.
    ``keep_sharded=True`` yields plain row / column split tensors (rules ``rows`` / ``cols``, tp > 1) unmerged, as
    :class:`megaocto.convert.core.Sharded` (the mmap-ed shards themselves), so a same-TP import copies them once."""
    offset = 0
    for p in range(src.pp):
        flats = [_stage_state(f)[1] for f in src.stage_files(p)]
        layer_ids = sorted({int(k.split(".")[1]) for k in flats[0] if k.startswith("layers.")})
        top = [k for k in _TOP_RULES if k in flats[0]]
        ordered = [k for k in top if k.startswith("embedding.")]
        ordered += [f"layers.{i}.{k}" for i in layer_ids for k in _LAYER_RULES if f"layers.{i}.{k}" in flats[0]]
        ordered += [k for k in top if not k.startswith("embedding.")]
        for key in ordered:
            if key.startswith("layers."):
                _, i, suffix = key.split(".", 2)
                rule, name = _LAYER_RULES[suffix], f"layers.{int(i) + offset}.{suffix}"
            else:
                rule, name = _TOP_RULES[key], key
            if rule == "skip":
                continue
            shards = [f[key] for f in flats]
            if keep_sharded and rule in ("rows", "cols") and len(shards) > 1:
                yield name, Sharded(tuple(shards), 0 if rule == "rows" else 1)
                continue
            full = merge_shards_megatron(rule, shards, heads=cfg.num_attention_heads,
                                         head_dim=cfg.head_dim, version=src.checkpoint_version)
            yield name, full
        offset += len(layer_ids)
        del flats


def to_megaocto(name: str, full: torch.Tensor, cfg: ModelConfig, *, layernorm_1p: bool) -> tuple[str, torch.Tensor]:
    """Map one full Megatron tensor to megaocto's name and layout (same names except the fused MHA QKV)."""
    if name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
        # Megatron's per-head [np, 3, hn] rows -> megaocto's [q; k; v] blocks (the same regrouping as HF MHA c_attn)
        full = per_head_qkv_to_blocks(full, cfg.num_attention_heads, cfg.head_dim)
    elif name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        full = full[:cfg.vocab_size]
    elif layernorm_1p and "layernorm.weight" in name:
        full = full + 1
    return name, full


def iter_megaocto_tensors(src: MegatronSource, cfg: ModelConfig, *, keep_sharded: bool = False
                          ) -> Iterator[tuple[str, torch.Tensor | Sharded]]:
    """(megaocto name, full tensor) for :func:`write_megaocto_checkpoint`, streaming (as
    :func:`iter_megatron_full`). ``keep_sharded=True`` (use it when the output TP equals the source's) leaves plain
    row / column split tensors as :class:`megaocto.convert.core.Sharded` where megaocto's layout is the same
    (everything but vocabulary rows that must be trimmed), so the writer passes the shards through."""
    one_p = bool(_get(src.args, "apply_layernorm_1p", False))
    for name, full in iter_megatron_full(src, cfg, keep_sharded=keep_sharded):
        if isinstance(full, Sharded):
            rows = sum(t.shape[0] for t in full.shards) if full.dim == 0 else None
            if name not in ("embedding.word_embeddings.weight", "output_layer.weight") or rows == cfg.vocab_size:
                yield name, full
                continue
            full = full.full()
        yield to_megaocto(name, full, cfg, layernorm_1p=one_p)


# ----------------------------------------------------------------------------------------- reference forward
@torch.no_grad()
def megatron_reference_logits(tensors: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig, ids: torch.Tensor, *,
                              layernorm_1p: bool = False) -> torch.Tensor:
    """Logits ``[b, s, V_pad]`` of Megatron's GPT forward (eval, fp32) computed directly on Megatron-layout
    full tensors as :func:`iter_megatron_full` yields them (one layer held at a time). Independent of megaocto's
    model code: the MHA projection output is viewed ``[b, s, np, 3·hn]`` and split into q, k, v as Megatron does.
    """
    b, s = ids.shape
    d, heads = cfg.head_dim, cfg.num_attention_heads
    gelu: Callable[[torch.Tensor], torch.Tensor] = (
        (lambda x: F.gelu(x, approximate="tanh")) if cfg.activation == "gelu_tanh" else F.gelu)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    state: dict[str, Any] = {"x": None, "wte": None, "pos": None, "out": None}
    layer: dict[str, torch.Tensor] = {}
    current = [-1]

    def ln(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        w = w.float() + (1.0 if layernorm_1p else 0.0)
        return F.layer_norm(x, (x.shape[-1],), w, bias.float(), cfg.norm_epsilon)

    def lin(x: torch.Tensor, prefix: str) -> torch.Tensor:
        bias = layer.get(prefix + ".bias")
        return F.linear(x, layer[prefix + ".weight"].float(), None if bias is None else bias.float())

    def run_layer() -> None:
        x = state["x"]
        hdn = ln(x, layer["input_layernorm.weight"], layer["input_layernorm.bias"])
        if "self_attention.query.weight" in layer:
            q = lin(hdn, "self_attention.query").view(b, s, heads, d)
            k, v = lin(hdn, "self_attention.key_value").split(d, dim=-1)
            k, v = k.unsqueeze(2).expand(b, s, heads, d), v.unsqueeze(2).expand(b, s, heads, d)
        else:
            q, k, v = lin(hdn, "self_attention.query_key_value").view(b, s, heads, 3 * d).split(d, dim=-1)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        ctx = torch.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, heads * d)
        x = x + lin(ctx, "self_attention.dense")
        hdn = ln(x, layer["post_attention_layernorm.weight"], layer["post_attention_layernorm.bias"])
        state["x"] = x + lin(gelu(lin(hdn, "mlp.dense_h_to_4h")), "mlp.dense_4h_to_h")
        layer.clear()

    final: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        if name == "embedding.word_embeddings.weight":
            state["wte"] = t
        elif name == "embedding.position_embeddings.weight":
            state["pos"] = t
        elif name.startswith("layers."):
            _, i, suffix = name.split(".", 2)
            if int(i) != current[0]:
                if state["x"] is None:
                    pos = torch.arange(s).expand(b, s)
                    state["x"] = F.embedding(ids, state["wte"]).float() + F.embedding(pos, state["pos"]).float()
                if layer:
                    run_layer()
                current[0] = int(i)
            layer[suffix] = t
        elif name.startswith("final_layernorm."):
            final[name.split(".")[1]] = t
        elif name == "output_layer.weight":
            state["out"] = t
    if layer:
        run_layer()
    x = ln(state["x"], final["weight"], final["bias"])
    head = state["out"] if state["out"] is not None else state["wte"]
    return F.linear(x, head.float())


# ----------------------------------------------------------------------------------------- entry point
@dataclass
class MegatronImportResult:
    output: str
    cfg: ModelConfig
    source: MegatronSource
    max_abs_logit_diff: float | None = None


def _log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(f"from-megatron: {msg}", file=sys.stderr, flush=True)


def convert_megatron(load: str, output: str, *, tp: int | None = None, iteration: int | str | None = None,
                     verify: bool = False, vocab_size: int | None = None, dtype: torch.dtype | str | None = None,
                     progress: bool = True, verify_tol: float | None = None) -> MegatronImportResult:
    """Import a bigcode Megatron-LM GPT checkpoint at ``load`` into a megaocto checkpoint at ``output``.

    ``tp`` = output tensor-parallel size (None keeps the source's); ``iteration`` picks an ``iter_*`` (int) or
    ``"release"`` (default: the tracker's); ``vocab_size`` = the tokenizer's vocabulary, to drop the padding rows
    (default: keep ``padded_vocab_size``); ``dtype`` = output dtype (default: the source's). Everything is
    checked (rank files, args, every tensor's name and shape) before anything is written; the writer puts the
    result in a temporary directory and renames it when complete. ``verify`` reruns the merged Megatron tensors
    through an independent reference forward and the written checkpoint through megaocto's model on
    the fixed random batch and reports the max absolute logit difference (fp32; the megaocto checkpoint runs at its
    own TP, as tp gloo processes each loading its rank file, about one model in total; the reference one layer at a
    time); above ``verify_tol`` (default:
    :func:`megaocto.convert.core.default_verify_tol`) it raises :class:`megaocto.convert.core.VerifyError` (the
    output stays written). ``progress=False`` also silences the ``from-megatron:`` notes on stderr.
    """
    parse_dtype(dtype)
    check_output_free(output)
    src = open_source(load, iteration)
    cfg = model_config_from_args(src, vocab_size=vocab_size)
    out_tp = src.tp if tp is None else int(tp)
    check_tp(cfg, out_tp)
    validate_source(src, cfg)
    for note in src.notes:
        _log(note, progress)
    _log(f"{src.directory}: {cfg.num_layers} layers, h={cfg.hidden_size}, {src.head_type}, tp={src.tp} pp={src.pp} "
         f"-> tp={out_tp}", progress)
    if vocab_size is None:
        _log(f"vocab_size not given: keeping the padded vocabulary ({cfg.vocab_size} rows) as model.vocab_size; "
             f"pass --vocab-size (the tokenizer's) to drop the padding rows", progress)
    a = src.args
    extra = {"converted_from": {"kind": "megatron", "format": "megatron-lm", "path": os.path.abspath(src.directory),
                        "iteration": src.iteration, "tp": src.tp, "pp": src.pp,
                        "checkpoint_version": src.checkpoint_version,
                        "attention_head_type": src.head_type,
                        "padded_vocab_size": int(a.padded_vocab_size),
                        "tokenizer_type": _get(a, "tokenizer_type"),
                        "tokenizer_file": _get(a, "tokenizer_file"), "vocab_file": _get(a, "vocab_file")}}
    write_megaocto_checkpoint(output, cfg, iter_megaocto_tensors(src, cfg, keep_sharded=out_tp == src.tp), out_tp,
                              dtype=dtype,
                              metadata_extra=extra, progress=progress)
    result = MegatronImportResult(output=output, cfg=cfg, source=src)
    if verify:
        result.max_abs_logit_diff = _verify(src, cfg, output, tol=verify_tol, dtype=parse_dtype(dtype))
    return result


def _verify(src: MegatronSource, cfg: ModelConfig, output: str, *, tol: float | None,
            dtype: torch.dtype | None) -> float:
    from megaocto.convert.core import checkpoint_logits_fn, verify_logits

    one_p = bool(_get(src.args, "apply_layernorm_1p", False))

    def megatron_fn(ids: torch.Tensor) -> torch.Tensor:
        return megatron_reference_logits(iter_megatron_full(src, cfg), cfg, ids, layernorm_1p=one_p)

    ours, what = checkpoint_logits_fn(output)
    return verify_logits(megatron_fn, ours, cfg.vocab_size, label=f"Megatron reference vs {what}",
                         seq=min(16, cfg.seq_length), tol=tol, cast=dtype)

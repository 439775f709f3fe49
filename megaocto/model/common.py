"""Pieces both model families share: norms, dropout placement, position ids, recompute, the loss head.

Norms and the loss head run the ops of :func:`kernel_ops` (``model.kernels``: torch | triton | auto, dispatched
by megaocto.kernels.registry). With the torch ops, norms use apex's fused kernels
(``apex.normalization.fused_layer_norm``) when the input is on CUDA and apex's compiled extension
(``fused_layer_norm_cuda``) imports; apex is imported lazily on the first CUDA norm, never at module load, and CPU
runs never try it. A python-only apex install (built without its C++/CUDA extensions) imports but
lacks the extension, so the probe imports the extension itself and falls back to torch with one logged line.
The Triton norms replace apex.
"""
from __future__ import annotations

import importlib
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megaocto.kernels.registry import KernelOps, ops_for
from megaocto.parallel.layers import check_id_range
from megaocto.parallel.mappings import copy_to_tp, gather_from_sp


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """In-place N(0, std) initialiser (Megatron init_method_normal)."""
    def init(t: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(t, mean=0.0, std=std)
    return init


def scaled_init(std: float, num_layers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, std / sqrt(2 * num_layers)) for output projections (Megatron scaled_init_method_normal)."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


log = logging.getLogger(__name__)

_apex_norm_module = None  # None: not tried yet; False: unavailable
_APEX_NORM_FNS = {"layer": "fused_layer_norm_affine", "rms": "fused_rms_norm_affine"}
# apex's compiled norm kernels: a top-level extension module that apex.normalization.fused_layer_norm imports
# lazily, inside the first forward. Probing only `apex` would accept a python-only install that crashes there.
APEX_NORM_EXTENSION = "fused_layer_norm_cuda"


def _apex_norms():
    """``apex.normalization.fused_layer_norm`` or None (probed once, lazily): usable only when both the python
    module and its compiled extension ``fused_layer_norm_cuda`` import. When apex is installed without the
    extension (or built for another torch/CUDA), one line is logged and the torch norms are used."""
    global _apex_norm_module
    if _apex_norm_module is None:
        try:
            module = importlib.import_module("apex.normalization.fused_layer_norm")
        except Exception:  # not installed (the common case: nothing to say), or broken
            _apex_norm_module = False
            return None
        try:
            importlib.import_module(APEX_NORM_EXTENSION)
        except Exception as e:  # python-only install, or an extension built for another torch/CUDA
            log.warning(f"apex is installed but its compiled extension {APEX_NORM_EXTENSION} does not import "
                        f"({type(e).__name__}: {e}); using the torch norms (rebuild apex with its C++/CUDA extensions "
                        "to use its fused norms)")
            _apex_norm_module = False
            return None
        _apex_norm_module = module
    return _apex_norm_module or None


def _apex_norm_fn(x: torch.Tensor, kind: str):
    """apex's fused ``kind`` ("layer" / "rms") norm function for input ``x``, or None to use the torch path.

    Only CUDA inputs ask for apex (the import is not even attempted on CPU). Signatures:
    ``fused_layer_norm_affine(x, weight, bias, normalized_shape, eps)``,
    ``fused_rms_norm_affine(x, weight, normalized_shape, eps)``.
    """
    if not x.is_cuda:
        return None
    mod = _apex_norms()
    return getattr(mod, _APEX_NORM_FNS[kind], None) if mod is not None else None


def kernel_ops(cfg, pc, device=None) -> KernelOps:
    """The fused-kernel ops for ``cfg.kernels`` on ``device`` (default ``pc.device``); cached by the registry.

    Resolved once at construction: a model built on CPU with ``kernels: auto`` keeps the torch ops if moved to CUDA
    later (build it on its device, as ``megaocto train`` does).
    """
    return ops_for(getattr(cfg, "kernels", "auto"), device if device is not None else getattr(pc, "device", None))


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) over the last dim through ``ops.layer_norm`` (default: the torch ops,
    i.e. ``F.layer_norm``); with the torch ops it runs apex's fused kernel on CUDA when apex imports."""

    def __init__(self, normalized_shape, eps: float = 1e-5, *, ops: KernelOps | None = None, **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"megaocto LayerNorm normalises the last dim only (got {self.normalized_shape})")
        self.ops = ops if ops is not None else ops_for("torch")
        self._apex_ok = self.ops.impls.get("layer_norm", "torch") == "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = _apex_norm_fn(x, "layer") if self._apex_ok else None
        if fn is not None:
            return fn(x, self.weight, self.bias, self.normalized_shape, self.eps)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (ChatGLM2 / CodeGeeX2) through ``ops.rms_norm``;
    with the torch ops, apex's fused kernel on CUDA when apex imports."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, dtype=None, device=None, ops: KernelOps | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.ops = ops if ops is not None else ops_for("torch")
        self._apex_ok = self.ops.impls.get("rms_norm", "torch") == "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = _apex_norm_fn(x, "rms") if self._apex_ok else None
        if fn is not None:
            return fn(x, self.weight, self.weight.shape, self.eps)
        return self.ops.rms_norm(x, self.weight, self.eps)


def tag_sequence_parallel(params, pc) -> None:
    """Mark params whose grads are partial over the sequence shards (all-reduced over TP by grads.py)."""
    if pc.sequence_parallel:
        for p in params:
            p.sequence_parallel = True


def dropout(x: torch.Tensor, p: float, training: bool, pc, *, sharded: bool) -> torch.Tensor:
    """Dropout; activations that differ across TP ranks (``sharded``) draw from the per-TP-rank RNG stream."""
    if p == 0.0 or not training:
        return x
    if sharded:
        with pc.rng.fork():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)


def check_input_ids(input_ids: torch.Tensor, cfg, pc) -> None:
    """Reject inputs the model would otherwise mis-handle, with messages naming the config to fix.

    * sequence parallelism splits the sequence over TP ranks, so its length must be a multiple of tp;
    * token ids must lie in ``[0, model.vocab_size)``: the embedding has padded rows up to the TP-padded size, so
      ids in ``[vocab_size, padded)`` would silently read untrained rows (usually a tokenizer/model vocab
      mismatch). On CPU one ``aminmax``; on CUDA an async device assert (no host sync); every TP rank sees
      the same ids, so all agree.
    """
    s = input_ids.shape[-1]
    if pc.sequence_parallel and s % pc.tp:
        raise ValueError(f"input sequence length {s} is not divisible by tp={pc.tp}, which "
                         f"parallel.sequence_parallel requires; pad batches to a multiple of {pc.tp} "
                         f"(model.seq_length) or set parallel.sequence_parallel=false")
    check_id_range(input_ids, cfg.vocab_size, ValueError,
                   f"input_ids must lie in [0, model.vocab_size={cfg.vocab_size}): a negative id means an "
                   f"ignore/padding label (-100?) reached input_ids; an id >= vocab_size means the tokenizer's "
                   f"vocabulary does not match the model's (set model.vocab_size to the tokenizer vocab size or "
                   f"re-tokenize the data with the model's tokenizer)")


def begin_kv_cache_step(kv_cache, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                        segment_ids: torch.Tensor | None, pc) -> torch.Tensor:
    """Start a cached forward step (see megaocto.generation.kv_cache) and return its position ids.

    Cached decoding runs without sequence parallelism (one new token cannot be split over TP ranks) and without
    packing; ``megaocto.generation.generate`` switches sequence parallelism off for the duration of a call.
    """
    if pc.sequence_parallel:
        raise ValueError("forward with kv_cache needs parallel.sequence_parallel off (a decode step has one token "
                         "per row); megaocto.generation.generate switches it off while generating")
    if segment_ids is not None:
        raise ValueError("forward with kv_cache does not take segment_ids: left padding is described by the "
                         "cache's pad_lengths")
    if kv_cache.batch_size != input_ids.shape[0]:
        raise ValueError(f"kv_cache holds {kv_cache.batch_size} rows but input_ids has {input_ids.shape[0]}")
    kv_cache.begin(input_ids.shape[1])
    return kv_cache.position_ids() if position_ids is None else position_ids


def default_position_ids(input_ids: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """0, 1, 2, ... per row, restarting at every segment boundary when ``segment_ids`` is given."""
    b, s = input_ids.shape
    idx = torch.arange(s, device=input_ids.device).expand(b, s)
    if segment_ids is None:
        return idx
    starts = torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def checkpoint(fn: Callable, pc, *args, replay_rng: bool = True):
    """torch.utils.checkpoint (non-reentrant, RNG preserved) that also replays the TP RNG tracker.

    The default RNG is restored by torch; the tracker streams used for sharded dropout are snapshotted here and
    put back during recompute, so recomputed dropout masks equal the original ones. ``replay_rng=False`` skips
    all RNG bookkeeping (no dropout in ``fn``).
    """
    if not replay_rng:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    snapshot = pc.rng.get_states()
    calls = []

    def run(*a):
        if not calls:
            calls.append(1)
            return fn(*a)
        current = pc.rng.get_states()
        pc.rng.set_states(snapshot)
        try:
            return fn(*a)
        finally:
            pc.rng.set_states(current)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


def lm_head_input(x: torch.Tensor, pc) -> torch.Tensor:
    """Final hidden states -> full-sequence input of a vocab-parallel output GEMM.

    Forward: all-gather the sequence shards (sequence parallel) or identity. Backward: each rank's grad is partial
    (its vocab shard only), so it is reduce-scattered / all-reduced over TP.
    """
    if pc.sequence_parallel:
        return gather_from_sp(x, pc, dim=1, grad_is_partial=True)
    return copy_to_tp(x, pc)


def linear_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pc, ops: KernelOps,
                vocab_size: int) -> torch.Tensor:
    """fp32 per-token loss ``[b, s]`` of the vocab-parallel output GEMM ``x -> F.linear(x, weight)`` (weight
    ``[V/tp, h]``) through ``ops.linear_cross_entropy``: ``x`` is the final hidden state (sequence shard under
    sequence parallelism), gathered by :func:`lm_head_input`. The Triton op never holds the full fp32 logits.
    """
    return ops.linear_cross_entropy(lm_head_input(x, pc), weight, labels, pc, vocab_size=vocab_size)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, pc, recompute: str, chunk: int, *, dropout_on: bool,
               kv_cache=None, **kwargs) -> torch.Tensor:
    """Apply the blocks; with ``recompute == "full"`` each ``chunk``-layer group is checkpointed as one unit.

    ``kv_cache`` (a :class:`megaocto.generation.kv_cache.KVCache` between ``begin`` and ``commit``): block ``i``
    gets ``kv_cache=kv_cache.layer(i)`` and nothing is recomputed (inference).
    """
    if isinstance(layers, nn.ModuleDict):  # a pipeline stage's blocks, keyed by their global layer index
        layers = list(layers.values())
    if kv_cache is not None:
        for i, layer in enumerate(layers):
            x = layer(x, kv_cache=kv_cache.layer(i), **kwargs)
        return x
    if recompute != "full" or not torch.is_grad_enabled():
        for layer in layers:
            x = layer(x, **kwargs)
        return x

    def make(group):
        def run(h):
            for layer in group:
                h = layer(h, **kwargs)
            return h
        return run

    for start in range(0, len(layers), chunk):
        x = checkpoint(make(layers[start:start + chunk]), pc, x, replay_rng=dropout_on)
    return x


# ---------------------------------------------------------------------------------------------- pipeline stages
def stage_layers(num_layers: int, pp: int = 1, pp_rank: int = 0, pp_layers=None) -> range:
    """The global indices of the blocks on pipeline stage ``pp_rank`` of ``pp``: the one place that decides the split.

    ``pp_layers`` (parallel.pp_layers): blocks per stage, e.g. ``[3, 5, 5, 3]``; empty or None splits evenly, which
    needs ``num_layers`` divisible by ``pp`` (as Megatron).
    """
    from megaocto.config.base import ConfigError

    if pp_layers:
        counts = [int(n) for n in pp_layers]
        if len(counts) != pp or sum(counts) != num_layers or min(counts) < 1:
            raise ConfigError(f"parallel.pp_layers={list(pp_layers)} must give one count >= 1 per pipeline stage "
                              f"(pp={pp}) summing to model.num_layers={num_layers}")
    else:
        if num_layers % pp or num_layers < pp:
            raise ConfigError(f"model.num_layers={num_layers} does not split evenly over parallel.pp={pp} stages; "
                              f"choose a pp that divides it or give the blocks per stage in parallel.pp_layers "
                              f"(e.g. {[num_layers // pp + (1 if i < num_layers % pp else 0) for i in range(pp)]})")
        counts = [num_layers // pp] * pp
    start = sum(counts[:pp_rank])
    return range(start, start + counts[pp_rank])


def stage_chunks(num_layers: int, pp: int = 1, pp_rank: int = 0, pp_layers=None, virtual: int = 1) -> list[range]:
    """The blocks of each model chunk on stage ``pp_rank`` with ``virtual`` interleaved chunks per stage
    (parallel.virtual_pp): the layers are cut into pp·virtual virtual stages by :func:`stage_layers` (``pp_layers``
    then has pp·virtual counts) and chunk c of stage r is virtual stage c·pp + r, as Megatron's interleaving."""
    if virtual < 1:
        from megaocto.config.base import ConfigError

        raise ConfigError(f"parallel.virtual_pp must be >= 1 (got {virtual})")
    return [stage_layers(num_layers, pp * virtual, c * pp + pp_rank, pp_layers) for c in range(virtual)]


def chunk_blocks(layers: nn.Module, ranges: list[range], chunk: int):
    """The blocks of model chunk ``chunk`` (``layers`` itself when the stage has one chunk)."""
    if len(ranges) == 1:
        return layers
    return [layers[str(i)] for i in ranges[chunk]]


def build_stage_layers(make_block: Callable[[], nn.Module], layers: range | list[range]) -> nn.Module:
    """The blocks of ``layers`` (global indices; a list of ranges for interleaved chunks), built by ``make_block()``
    in layer order.

    The blocks before ``layers.start`` are built and dropped, so the default RNG draws the same weights as in the
    unsplit model (one seed gives one model at every pp; peak memory one extra block). A stage starting at block 0
    gets an ``nn.ModuleList``; later stages an ``nn.ModuleDict`` keyed by the global index, so parameter names
    (``layers.7.mlp...``) are those of the unsplit model and checkpoints map 1:1.
    """
    ranges = [layers] if isinstance(layers, range) else list(layers)
    kept = {}
    for i in range(max(r.stop for r in ranges)):
        block = make_block()
        if any(i in r for r in ranges):
            kept[i] = block
        del block
    if len(ranges) == 1 and ranges[0].start == 0:
        return nn.ModuleList(kept.values())
    return nn.ModuleDict({str(i): b for i, b in kept.items()})


def stage_input(hidden_states, pc) -> None:
    """Checks the activation a non-first pipeline stage receives in place of the embedding."""
    if hidden_states is None:
        raise ValueError(f"pipeline stage {pc.pp_rank} of {pc.pp} needs hidden_states (the previous stage's output)")

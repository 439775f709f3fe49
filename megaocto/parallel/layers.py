"""Tensor-parallel Linear / Embedding layers (Megatron's Column / Row / VocabParallel).

Each is a subclass of the torch layer with the same parameter names (``weight``, ``bias``); with tp == 1
the forward is exactly ``F.linear`` / ``F.embedding``. Every rank draws the FULL weight from the default
torch RNG and keeps its shard, so a seed gives the same model at every TP size.

Sharded parameters carry tags read by grads.py, checkpointing and converters:
``tensor_parallel = True``, ``partition_dim`` (0 rows, 1 columns) and ``partition_blocks`` (full sizes of
the fused blocks along ``partition_dim``, e.g. (q, k, v); None = one block). :func:`shard_tensor`,
:func:`merge_shards` and :func:`gather_full_tensor` map between full weights and shards using these tags.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaocto.config.base import ConfigError
from megaocto.parallel.mappings import (copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                                        reduce_scatter_to_sp, scatter_to_tp)

if TYPE_CHECKING:
    from megaocto.parallel.context import ParallelContext

InitMethod = Callable[[torch.Tensor], None]


def normal_init(std: float = 0.02) -> InitMethod:
    """``init_method`` drawing N(0, std²) (Megatron's init_method_normal)."""
    return lambda t: nn.init.normal_(t, mean=0.0, std=std)


def scaled_normal_init(std: float, num_layers: int) -> InitMethod:
    """N(0, (std / sqrt(2·num_layers))²) for output projections (Megatron's scaled_init_method_normal)."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


def pad_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Round the vocabulary up to a multiple of ``multiple * tp`` (Megatron --make-vocab-size-divisible-by)."""
    step = multiple * tp
    return -(-vocab_size // step) * step


# ---------------------------------------------------------------------------- full <-> shard
def _blocks(size: int, blocks: Sequence[int] | None) -> list[int]:
    return [size] if blocks is None else list(blocks)


def shard_tensor(full: torch.Tensor, tp: int, tp_rank: int, dim: int,
                 blocks: Sequence[int] | None = None) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of ``full``: each block along ``dim`` split in ``tp`` and concatenated."""
    sizes = _blocks(full.shape[dim], blocks)
    if sum(sizes) != full.shape[dim]:
        raise ValueError(f"blocks {sizes} do not add up to size {full.shape[dim]} of dim {dim}")
    parts = []
    for block in full.split(sizes, dim=dim):
        if block.shape[dim] % tp:
            raise ValueError(f"block of size {block.shape[dim]} along dim {dim} is not divisible by tp={tp}")
        parts.append(block.chunk(tp, dim=dim)[tp_rank])
    return torch.cat(parts, dim=dim).contiguous()


def merge_shards(shards: Sequence[torch.Tensor], dim: int, blocks: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from all TP ranks' shards (in rank order)."""
    tp = len(shards)
    full_sizes = _blocks(shards[0].shape[dim] * tp, blocks)
    local_sizes = [s // tp for s in full_sizes]
    per_rank = [s.split(local_sizes, dim=dim) for s in shards]
    return torch.cat([per_rank[r][b] for b in range(len(local_sizes)) for r in range(tp)], dim=dim)


def _tag(p: torch.Tensor, dim: int, blocks: Sequence[int] | None = None) -> None:
    p.tensor_parallel = True
    p.partition_dim = dim
    p.partition_blocks = None if blocks is None or len(blocks) == 1 else tuple(blocks)


def is_tensor_parallel(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_parallel", False))


def shard_for_param(p: torch.Tensor, full: torch.Tensor, pc: "ParallelContext") -> torch.Tensor:
    """This rank's shard of ``full`` laid out like parameter ``p`` (``full`` itself if ``p`` is replicated)."""
    if not is_tensor_parallel(p) or pc.tp == 1:
        return full
    return shard_tensor(full, pc.tp, pc.tp_rank, p.partition_dim, p.partition_blocks)


def gather_full_tensor(p: torch.Tensor, pc: "ParallelContext") -> torch.Tensor:
    """The unsharded tensor of a TP parameter, gathered over the TP group (grads: :func:`gather_full_like`).

    Collective over the TP group: every TP rank must call it. Replicated tensors are returned detached.
    """
    return gather_full_like(p.detach(), p, pc)


def gather_full_like(t: torch.Tensor, p: torch.Tensor, pc: "ParallelContext") -> torch.Tensor:
    """Gather ``t`` (shaped like parameter ``p``, e.g. ``p.grad``) into the unsharded layout of ``p``."""
    if not is_tensor_parallel(p) or pc.tp == 1:
        return t
    t = t.contiguous()
    shards = [torch.empty_like(t) for _ in range(pc.tp)]
    dist.all_gather(shards, t, group=pc.tp_group)
    return merge_shards(shards, p.partition_dim, p.partition_blocks)


def gather_full_state_dict(module: nn.Module, pc: "ParallelContext") -> dict[str, torch.Tensor]:
    """Unsharded ``state_dict`` of a TP module tree (collective over TP; identical on every TP rank)."""
    return {k: gather_full_tensor(v, pc) for k, v in module.state_dict(keep_vars=True).items()}


@torch.no_grad()
def load_full_state_dict(module: nn.Module, full: dict[str, torch.Tensor], pc: "ParallelContext") -> None:
    """Copy an unsharded state dict into a TP module tree, each rank keeping its shard (strict keys)."""
    own = module.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(full)), sorted(set(full) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:5]} ({len(missing)}), "
                       f"unexpected {unexpected[:5]} ({len(unexpected)})")
    for k, t in own.items():
        src = shard_for_param(t, full[k], pc)
        if src.shape != t.shape:
            raise ValueError(f"{k}: shard of shape {tuple(src.shape)} from full {tuple(full[k].shape)} "
                             f"does not match parameter {tuple(t.shape)}")
        t.copy_(src)


@torch.no_grad()
def _init_sharded(param: torch.Tensor, full_shape: tuple[int, ...], init: InitMethod, pc: "ParallelContext",
                  dim: int, blocks: Sequence[int] | None) -> None:
    if param.device.type == "meta":
        return
    full = torch.empty(full_shape, dtype=torch.float32, device=param.device)
    init(full)
    param.copy_(shard_tensor(full, pc.tp, pc.tp_rank, dim, blocks) if pc.tp > 1 else full)


def _default_init(init_method: InitMethod | None) -> InitMethod:
    return init_method if init_method is not None else normal_init(0.02)


# ---------------------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Linear):
    """``Y = X Wᵀ + b`` with W split by output rows: local weight ``[out/tp, in]``.

    ``out_features`` may be a list of block sizes for a fused projection ([q, k, v], [gate, up]); each block
    is split evenly over TP and the local output is the concatenation of the local block shards. With
    ``pc.sequence_parallel`` the input is ``[b, s/tp, in]`` and is all-gathered along dim 1.
    ``gather_output`` returns the full output (blocks back in their unsharded order).
    ``skip_bias_add=True`` leaves the bias out of the GEMM and returns ``(output, bias)`` (bias None when the layer
    has none) so a following fused kernel can add it (e.g. bias + GELU); it cannot be combined with
    ``gather_output``.
    """

    def __init__(self, in_features: int, out_features: int | Sequence[int], pc: "ParallelContext", *,
                 bias: bool = True, gather_output: bool = False, init_method: InitMethod | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 skip_bias_add: bool = False):
        nn.Module.__init__(self)
        sizes = [out_features] if isinstance(out_features, int) else [int(s) for s in out_features]
        bad = [s for s in sizes if s <= 0 or s % pc.tp]
        if bad:
            raise ConfigError(f"ColumnParallelLinear output sizes {sizes} must be positive and divisible by "
                              f"tp={pc.tp}; adjust head counts / ffn size or the TP size")
        self.pc = pc
        self.in_features = in_features
        self.out_features = sum(sizes)  # full (unsharded) output size, like Megatron
        self.output_sizes = tuple(sizes)
        self.local_output_sizes = tuple(s // pc.tp for s in sizes)
        if skip_bias_add and gather_output:
            raise ConfigError("ColumnParallelLinear: skip_bias_add returns the local (sharded) output and bias; "
                              "it cannot be combined with gather_output")
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.init_method = _default_init(init_method)
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(sum(self.local_output_sizes), in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(self.local_output_sizes), **kw))
        else:
            self.register_parameter("bias", None)
        for p in (self.weight, self.bias):
            if p is not None:
                _tag(p, 0, self.output_sizes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_sharded(self.weight, (self.out_features, self.in_features), self.init_method, self.pc, 0,
                      self.output_sizes)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def shard_full_tensor(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the unsharded ``weight`` / ``bias``."""
        return shard_for_param(getattr(self, name), full, self.pc)

    def forward(self, x: torch.Tensor):
        pc = self.pc
        if self.skip_bias_add:
            if pc.tp > 1:
                x = gather_from_sp(x, pc, dim=1, grad_is_partial=True) if pc.sequence_parallel else copy_to_tp(x, pc)
            return F.linear(x, self.weight), self.bias
        if pc.tp == 1:
            return F.linear(x, self.weight, self.bias)
        x = gather_from_sp(x, pc, dim=1, grad_is_partial=True) if pc.sequence_parallel else copy_to_tp(x, pc)
        y = F.linear(x, self.weight, self.bias)
        if not self.gather_output:
            return y
        y = gather_from_tp(y, pc, dim=-1)
        if len(self.output_sizes) == 1:
            return y
        per_rank = [r.split(self.local_output_sizes, dim=-1) for r in y.chunk(pc.tp, dim=-1)]
        return torch.cat([per_rank[r][b] for b in range(len(self.output_sizes)) for r in range(pc.tp)], dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={list(self.output_sizes)}, tp={self.pc.tp}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Linear):
    """``Y = X Wᵀ + b`` with W split by input columns: local weight ``[out, in/tp]``.

    The input is the TP-sharded activation (``input_is_parallel``) or is split here. The output is
    all-reduced, or reduce-scattered along dim 1 to ``[b, s/tp, out]`` with sequence parallel; the bias
    (replicated; tagged ``sequence_parallel`` in that mode) is added after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, pc: "ParallelContext", *, bias: bool = True,
                 input_is_parallel: bool = True, init_method: InitMethod | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        nn.Module.__init__(self)
        if in_features % pc.tp:
            raise ConfigError(f"RowParallelLinear in_features={in_features} is not divisible by tp={pc.tp}")
        self.pc = pc
        self.in_features = in_features  # full (unsharded)
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel
        self.init_method = _default_init(init_method)
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(out_features, in_features // pc.tp, **kw))
        _tag(self.weight, 1)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
            if pc.sequence_parallel:
                self.bias.sequence_parallel = True
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_sharded(self.weight, (self.out_features, self.in_features), self.init_method, self.pc, 1, None)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def shard_full_tensor(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return shard_for_param(getattr(self, name), full, self.pc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pc = self.pc
        if pc.tp == 1:
            return F.linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = scatter_to_tp(x, pc, dim=-1)
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y, pc, dim=1) if pc.sequence_parallel else reduce_from_tp(y, pc)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp={self.pc.tp}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")


def check_id_range(ids: torch.Tensor, upper: int, exc: type[Exception], message: str) -> None:
    """Raise ``exc(message)`` unless all ``ids`` lie in ``[0, upper)``.

    On CUDA this is an asynchronous device-side assert (no host sync on the hot path; a violation surfaces as a
    CUDA error carrying ``message``); elsewhere one ``aminmax`` and a precise error naming the offending id.
    """
    if ids.numel() == 0:
        return
    if ids.is_cuda:
        torch._assert_async(((ids >= 0) & (ids < upper)).all(), message)
        return
    lo, hi = (int(t) for t in torch.aminmax(ids))
    if lo < 0 or hi >= upper:
        raise exc(f"{message}; found id {lo if lo < 0 else hi}")


class VocabParallelEmbedding(nn.Embedding):
    """Embedding with rows (vocabulary) split over TP; output all-reduced to the full ``[b, s, h]``.

    ``num_embeddings`` is the full (padded, see :func:`pad_vocab_size`) vocabulary; this rank holds rows
    ``[vocab_start, vocab_end)``. Token ids outside the local range contribute zeros before the all-reduce; ids
    outside ``[0, num_embeddings)`` raise IndexError on every rank (as ``F.embedding`` does at tp == 1).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, pc: "ParallelContext", *,
                 init_method: InitMethod | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        nn.Module.__init__(self)
        if num_embeddings % pc.tp:
            raise ConfigError(f"VocabParallelEmbedding num_embeddings={num_embeddings} is not divisible by "
                              f"tp={pc.tp}; pad it with megaocto.parallel.layers.pad_vocab_size")
        self.pc = pc
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        per = num_embeddings // pc.tp
        self.vocab_start, self.vocab_end = pc.tp_rank * per, (pc.tp_rank + 1) * per
        self.init_method = _default_init(init_method)
        self.weight = nn.Parameter(torch.empty(per, embedding_dim, dtype=dtype, device=device))
        _tag(self.weight, 0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_sharded(self.weight, (self.num_embeddings, self.embedding_dim), self.init_method, self.pc, 0, None)

    def shard_full_tensor(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return shard_for_param(getattr(self, name), full, self.pc)

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise IndexError unless every id is in ``[0, num_embeddings)``.

        At tp > 1 an out-of-range id would otherwise fall outside every rank's rows and become a zero vector.
        Every TP rank holds the same ids, so the ranks agree without communication.
        """
        check_id_range(ids, self.num_embeddings, IndexError,
                       f"token id out of range for VocabParallelEmbedding with {self.num_embeddings} rows "
                       f"(ids must be in [0, {self.num_embeddings}))")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pc = self.pc
        self.check_ids(ids)
        if pc.tp == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, pc)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.pc.tp}, rows=[{self.vocab_start}, {self.vocab_end})"

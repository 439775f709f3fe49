"""Autograd-aware TP collectives (Megatron's mappings), all identity when tp == 1.

| function                | forward                      | backward                                     |
|-------------------------|------------------------------|----------------------------------------------|
| copy_to_tp              | identity                     | all-reduce                                   |
| reduce_from_tp          | all-reduce                   | identity                                     |
| scatter_to_tp(dim=-1)   | keep my chunk of ``dim``     | all-gather along ``dim``                     |
| gather_from_tp(dim=-1)  | all-gather along ``dim``     | keep my chunk                                |
| scatter_to_sp(dim=1)    | keep my chunk of the seq     | all-gather along seq                         |
| gather_from_sp(dim=1)   | all-gather along seq         | reduce-scatter (grad_is_partial) or split    |
| reduce_scatter_to_sp    | reduce-scatter along seq     | all-gather along seq                         |

With tp == 1 every function returns its input object unchanged (no autograd node).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megaocto.parallel.context import ParallelContext

# torch >= 2.13 deprecates the *_into_tensor / *_tensor names in favour of *_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _check_divisible(x: torch.Tensor, dim: int, tp: int, what: str) -> None:
    if x.shape[dim] % tp:
        raise ValueError(f"{what}: size {x.shape[dim]} of dim {dim} (shape {tuple(x.shape)}) "
                         f"is not divisible by tp={tp}")


def all_reduce(x: torch.Tensor, pc: "ParallelContext", op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Out-of-place all-reduce over the TP group."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=pc.tp_group)
    return out


def split(x: torch.Tensor, pc: "ParallelContext", dim: int) -> torch.Tensor:
    """This TP rank's contiguous chunk of ``x`` along ``dim``."""
    _check_divisible(x, dim, pc.tp, "split over tensor parallel ranks")
    return x.chunk(pc.tp, dim=dim)[pc.tp_rank].contiguous()


def all_gather(x: torch.Tensor, pc: "ParallelContext", dim: int) -> torch.Tensor:
    """Concatenate every TP rank's ``x`` along ``dim`` (rank order)."""
    dim = dim % x.dim()
    x = x.contiguous()
    if dim == 0:
        out = x.new_empty((x.shape[0] * pc.tp, *x.shape[1:]))
        _all_gather_single(out, x, group=pc.tp_group)
        return out
    parts = [torch.empty_like(x) for _ in range(pc.tp)]
    dist.all_gather(parts, x, group=pc.tp_group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, pc: "ParallelContext", dim: int) -> torch.Tensor:
    """Sum ``x`` over TP ranks and keep this rank's chunk along ``dim``."""
    dim = dim % x.dim()
    _check_divisible(x, dim, pc.tp, "reduce-scatter over tensor parallel ranks")
    xt = x.movedim(dim, 0).contiguous()
    out = xt.new_empty((xt.shape[0] // pc.tp, *xt.shape[1:]))
    _reduce_scatter_single(out, xt, group=pc.tp_group)
    return out.movedim(0, dim).contiguous() if dim else out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pc):
        ctx.pc = pc
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.pc), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pc):
        return all_reduce(x, pc)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pc, dim):
        ctx.pc, ctx.dim = pc, dim
        return split(x, pc, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.pc, ctx.dim), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pc, dim):
        ctx.pc, ctx.dim = pc, dim
        return all_gather(x, pc, dim)

    @staticmethod
    def backward(ctx, g):
        return split(g, ctx.pc, ctx.dim), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pc, dim, grad_is_partial):
        ctx.pc, ctx.dim, ctx.partial = pc, dim, grad_is_partial
        return all_gather(x, pc, dim)

    @staticmethod
    def backward(ctx, g):
        gx = reduce_scatter(g, ctx.pc, ctx.dim) if ctx.partial else split(g, ctx.pc, ctx.dim)
        return gx, None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pc, dim):
        ctx.pc, ctx.dim = pc, dim
        return reduce_scatter(x, pc, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.pc, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, pc: "ParallelContext") -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce of the grad."""
    return x if pc.tp == 1 else _CopyToTP.apply(x, pc)


def reduce_from_tp(x: torch.Tensor, pc: "ParallelContext") -> torch.Tensor:
    """Leave a TP region with partial sums: all-reduce forward, identity backward."""
    return x if pc.tp == 1 else _ReduceFromTP.apply(x, pc)


def scatter_to_tp(x: torch.Tensor, pc: "ParallelContext", dim: int = -1) -> torch.Tensor:
    """Keep this rank's chunk of ``dim`` (default: hidden); backward all-gathers."""
    return x if pc.tp == 1 else _ScatterToTP.apply(x, pc, dim)


def gather_from_tp(x: torch.Tensor, pc: "ParallelContext", dim: int = -1) -> torch.Tensor:
    """All-gather shards along ``dim`` (default: hidden); backward keeps this rank's chunk."""
    return x if pc.tp == 1 else _GatherFromTP.apply(x, pc, dim)


def scatter_to_sp(x: torch.Tensor, pc: "ParallelContext", dim: int = 1) -> torch.Tensor:
    """Full sequence -> this rank's sequence chunk ``[b, s/tp, h]``; backward all-gathers."""
    return x if pc.tp == 1 else _ScatterToTP.apply(x, pc, dim)


def gather_from_sp(x: torch.Tensor, pc: "ParallelContext", dim: int = 1,
                   grad_is_partial: bool = True) -> torch.Tensor:
    """Sequence chunk -> full sequence. Backward reduce-scatters when each rank's grad of the full
    output is a partial sum (the input of a ColumnParallel matmul), else just splits."""
    return x if pc.tp == 1 else _GatherFromSP.apply(x, pc, dim, grad_is_partial)


def reduce_scatter_to_sp(x: torch.Tensor, pc: "ParallelContext", dim: int = 1) -> torch.Tensor:
    """Partial sums over the full sequence -> summed sequence chunk; backward all-gathers."""
    return x if pc.tp == 1 else _ReduceScatterToSP.apply(x, pc, dim)

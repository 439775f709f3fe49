"""Gradient reductions that depend on TP/PP layout: sequence-parallel grads and global grad-norm clipping.

Grads are read from ``p.main_grad`` when present (fp32 accumulation buffers), else ``p.grad``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from megaocto.parallel.context import ParallelContext


def _grad(p: torch.Tensor) -> torch.Tensor | None:
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def allreduce_sequence_parallel_grads(module: nn.Module, pc: "ParallelContext") -> int:
    """All-reduce over TP the grads of params tagged ``sequence_parallel`` (norms, row-parallel biases).

    With sequence parallelism each TP rank sees only its chunk of the sequence, so these replicated params
    get partial grads. One flattened all-reduce per dtype. Returns the number of tensors reduced.
    """
    if pc.tp == 1:
        return 0
    grads = [g for p in module.parameters()
             if getattr(p, "sequence_parallel", False) and (g := _grad(p)) is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, group=pc.tp_group)
        for g, new in zip(group, flat.split([g.numel() for g in group])):
            g.copy_(new.view_as(g))
    return len(grads)


def _counted_here(p: torch.Tensor, pc: "ParallelContext") -> bool:
    """Each grad element is counted once: TP shards everywhere, replicated params on tp_rank 0 only,
    and params tagged ``shared`` (e.g. the tied embedding copy on the last PP stage) nowhere."""
    if getattr(p, "shared", False):
        return False
    return bool(getattr(p, "tensor_parallel", False)) or pc.tp_rank == 0


def grad_norm(params: Iterable[torch.Tensor], pc: "ParallelContext", norm_type: float = 2.0, *,
              dp_sharded: bool = False) -> torch.Tensor:
    """Global grad norm over the model-parallel (TP × PP) group; fp32 0-dim tensor, inf/nan propagate.

    ``dp_sharded``: the tensors are this DP rank's disjoint shards of the grads (the distributed optimizer's
    master shards), so the partial norms are also reduced over the DP group."""
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    grads = [g for p in params if (g := _grad(p)) is not None and _counted_here(p, pc)]
    device = grads[0].device if grads else pc.device
    if norm_type == math.inf:
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            total = torch.maximum(total, g.detach().abs().max().float())
        op = dist.ReduceOp.MAX
    elif norm_type == 2.0:
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            total = total + g.detach().float().square().sum()
        op = dist.ReduceOp.SUM
    else:
        raise ValueError(f"norm_type must be 2.0 or inf (got {norm_type})")
    groups = ((pc.tp, pc.tp_group), (pc.pp, pc.pp_group)) + (((pc.dp, pc.dp_group),) if dp_sharded else ())
    for size, group in groups:
        if size > 1:
            dist.all_reduce(total, op=op, group=group)
    return total if norm_type == math.inf else total.sqrt()


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, pc: "ParallelContext",
                    norm_type: float = 2.0, *, dp_sharded: bool = False) -> torch.Tensor:
    """Scale grads in place so their global norm is at most ``max_norm``; returns the norm before clipping.

    Like ``torch.nn.utils.clip_grad_norm_`` but the norm covers every TP shard and PP stage once (DP replicas
    hold identical grads and are not reduced). A non-finite norm is returned as is so the caller can skip
    the step; grads are left untouched in that case.
    """
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    total = grad_norm(params, pc, norm_type, dp_sharded=dp_sharded)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
    for p in params:
        if (g := _grad(p)) is not None:
            g.detach().mul_(coef.to(g.device))
    return total

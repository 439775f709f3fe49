"""Output projection fused with vocab-parallel cross-entropy, chunked over tokens (Liger-style).

Contract
--------
``linear_cross_entropy(x, weight, labels, pc, *, vocab_size, ignore_index=-100, chunk_size=None)`` (the signature of
``triton_linear_cross_entropy``, ``chunked_linear_cross_entropy`` and ``reference_linear_cross_entropy``)

- ``x``: ``[b, s, h]`` or ``[n, h]`` (fp32 / bf16 / fp16); ``weight``: this rank's vocab shard ``[V_pad/tp, h]``,
  same dtype and device as ``x``; ``labels``: ``x.shape[:-1]``, global token ids (any integer dtype), each
  ``ignore_index`` or in ``[0, vocab_size)``; anything else raises ValueError (on CUDA: an asynchronous device
  assert with the same message), the rule of :func:`megaocto.kernels.registry.check_labels` that every
  implementation, the registry's torch op included, applies.
- Returns the fp32 per-token loss ``x.shape[:-1]``, equal to
  ``vocab_parallel_cross_entropy(F.linear(x, weight), labels, pc, vocab_size=vocab_size,
  ignore_index=ignore_index)`` (reduction "none"): the softmax runs over the ``vocab_size`` real columns only
  (padded columns of the last shard are excluded), ``labels == ignore_index`` gives loss 0 and no gradient, all
  softmax math is fp32. The gradient is correct for any upstream gradient (e.g. loss-mask weighting).
- Backward gives ``dx`` (this rank's partial: the model's ``lm_head_input`` all-reduces it over TP exactly as
  for ``F.linear``) and ``dweight`` (this rank's shard), in the input dtypes.

What is fused / how
-------------------
Tokens are processed in chunks of ``chunk_size`` rows, so at most one ``[chunk, V_pad/tp]`` logits buffer (in
``x.dtype``) exists at a time and the full ``[tokens, V]`` fp32 logits, softmax or gradient never do:

- forward, per chunk: ``logits = x_c @ W^T`` (torch matmul in ``x.dtype``; fp32 accumulation inside the GEMM),
  then one row kernel computes the local row max, the local Σexp (relative to that max, online softmax) and the
  target logit (0 on ranks that do not own the target) as fp32 ``[chunk]`` vectors. After the last chunk, TP
  needs only two all-reduces over ``[tokens]``-sized fp32 vectors for the whole batch (MAX of the row max, SUM
  of [rescaled Σexp, target logit]) instead of two per chunk. The only state kept for backward is the global
  ``lse = max + log Σexp`` (``[tokens]`` fp32) besides ``x``/``weight``/``labels`` that autograd holds anyway.
- backward (recompute): per chunk the logits are recomputed, the row kernel overwrites them in place with
  ``g·(softmax − onehot)`` (``g`` = upstream grad, 0 at ignored positions; padded columns get 0), then
  ``dx_c = dlogits @ W`` and ``dW += dlogits^T @ x_c``. No communication in backward (``lse`` is already global).

Why recompute instead of Liger's "gradient in forward": Liger folds the gradient into the forward pass and
rescales it by the (scalar) upstream gradient in backward. That is exact only for a scalar upstream gradient
(reduction mean/sum); here the loss is per token and is weighted afterwards (loss mask, packing), and
``dW = Σ_i g_i·dlogits_i^T x_i`` cannot be rescaled after the fact. Costs of the recompute:

- compute: 4 GEMMs of ``2·tokens·V/tp·h`` FLOPs (forward 1, backward 3) instead of 3 for the unfused path,
  i.e. +33 % on the output layer only; the row kernels read/write each chunk 1–2 times (memory bound).
- memory: peak extra is one ``[chunk, V/tp]`` buffer in ``x.dtype`` plus, for 16-bit weights, an fp32
  ``[V/tp, h]`` accumulator for ``dW`` during backward (and one ``[V/tp, h]`` product per chunk), instead of
  ``[tokens, V/tp]`` logits in ``x.dtype`` + an fp32 copy (softmax / grad) kept from forward to backward.
  Default ``chunk_size``: ``ceil(tokens / ceil(V/tp / h))`` (so the chunk logits are about as large as ``x``).

Implementations (same autograd.Function, different row kernels)
---------------------------------------------------------------
- ``triton_linear_cross_entropy``: Triton row kernels (registered as ``("linear_cross_entropy", "triton")``);
  on CPU they run under ``TRITON_INTERPRET=1`` (tests).
- ``chunked_linear_cross_entropy``: the same chunked algorithm with torch row ops (any device, no Triton);
  not registered (the registry's torch op is the unfused reference, bit-identical to the model's own path).
- ``reference_linear_cross_entropy``: unfused ``F.linear`` + ``vocab_parallel_cross_entropy``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

from megaocto.kernels.registry import check_labels, check_launch, register
from megaocto.parallel.cross_entropy import vocab_parallel_cross_entropy

if TYPE_CHECKING:
    from megaocto.parallel.context import ParallelContext

_MAX_BLOCK = 4096  # columns per loop step of a row kernel (power of two)


# ----------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _row_stats_kernel(logits_ptr, stride_row, target_ptr, max_ptr, sumexp_ptr, tlogit_ptr, n_valid,
                      BLOCK: tl.constexpr):
    """One program per row: local max, Σexp(logit − max) over the first ``n_valid`` columns, target logit.

    target < 0: the target is not on this rank (or ignored) -> target logit 0. A target in a padded column
    (>= n_valid; rejected earlier by check_labels) would get -inf, as in vocab_parallel_cross_entropy.
    A row with no valid column: max -inf, Σexp 0.
    """
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max
    s = tl.zeros([BLOCK], dtype=tl.float32)  # per-lane Σexp relative to that lane's max
    for start in range(0, n_valid, BLOCK):
        cols = start + offs
        v = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, v)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes still empty: avoid exp(-inf - -inf) = nan
        s = s * tl.exp(m - ref) + tl.exp(v - ref)
        m = m_new
    row_max = tl.max(m, axis=0)
    ref_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(s * tl.exp(m - ref_max), axis=0)
    tl.store(max_ptr + row, row_max)
    tl.store(sumexp_ptr + row, total)

    t = tl.load(target_ptr + row)
    here = t >= 0
    tv = tl.load(base + tl.where(here, t, 0), mask=here, other=0.0).to(tl.float32)
    tv = tl.where(here & (t >= n_valid), float("-inf"), tv)
    tl.store(tlogit_ptr + row, tv)


@triton.jit
def _row_grad_kernel(logits_ptr, stride_row, target_ptr, lse_ptr, scale_ptr, n_cols, n_valid,
                     BLOCK: tl.constexpr):
    """One program per row, in place: ``logits <- scale·(exp(logits − lse) − onehot(target))``.

    Padded columns (>= n_valid) have softmax 0. ``scale`` is the upstream gradient (0 for ignored rows).
    """
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    t = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(scale_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        inside = cols < n_cols
        v = tl.load(base + cols, mask=inside & (cols < n_valid), other=float("-inf")).to(tl.float32)
        p = tl.exp(v - lse)
        p = tl.where(cols == t, p - 1.0, p) * g
        tl.store(base + cols, p.to(logits_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------------- row ops
class RowOps(Protocol):
    """The two per-chunk row operations the chunked algorithm needs (Triton or torch)."""

    def stats(self, logits: torch.Tensor, local_t: torch.Tensor, n_valid: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 ``[rows]``: local max, Σexp(logit − local max), target logit (see ``_row_stats_kernel``)."""
        ...

    def grad_(self, logits: torch.Tensor, local_t: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
              n_valid: int) -> None:
        """Overwrite ``logits`` in place with ``scale·(softmax − onehot)`` (see ``_row_grad_kernel``)."""
        ...


def _block(n_cols: int) -> int:
    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1))))


class TritonRowOps:
    """Row ops as Triton kernels (one program per row)."""

    def stats(self, logits, local_t, n_valid):
        rows = logits.shape[0]
        out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
        if rows:
            _row_stats_kernel[(rows,)](logits, logits.stride(0), local_t, out[0], out[1], out[2], n_valid,
                                       BLOCK=_block(n_valid), num_warps=8)
        return out[0], out[1], out[2]

    def grad_(self, logits, local_t, lse, scale, n_valid):
        rows, n_cols = logits.shape
        if rows:
            _row_grad_kernel[(rows,)](logits, logits.stride(0), local_t, lse, scale, n_cols, n_valid,
                                      BLOCK=_block(n_cols), num_warps=8)


class TorchRowOps:
    """Row ops in plain torch (fp32 copy of one chunk at a time)."""

    def stats(self, logits, local_t, n_valid):
        v = logits.float()
        v[:, n_valid:] = float("-inf")
        row_max = v.max(dim=-1).values
        ref = row_max.masked_fill(row_max == float("-inf"), 0.0)
        sumexp = (v - ref.unsqueeze(-1)).exp_().sum(-1)
        here = local_t >= 0
        tlogit = v.gather(-1, local_t.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~here, 0.0)
        return row_max, sumexp, tlogit

    def grad_(self, logits, local_t, lse, scale, n_valid):
        p = (logits.float() - lse.unsqueeze(-1)).exp_()
        p[:, n_valid:] = 0.0
        here = local_t >= 0
        rows = torch.arange(p.shape[0], device=p.device)[here]
        p[rows, local_t[here]] -= 1.0
        p.mul_(scale.unsqueeze(-1))
        logits.copy_(p)


# ------------------------------------------------------------------------------------------- autograd.Function
def default_chunk_size(n_tokens: int, v_local: int, hidden: int) -> int:
    """Tokens per chunk so that one ``[chunk, v_local]`` logits buffer is about the size of ``x [tokens, h]``."""
    return max(1, math.ceil(n_tokens / max(1, math.ceil(v_local / hidden))))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, labels, pc, vocab_size, ignore_index, chunk, ops):
        n, v_local = x2d.shape[0], weight.shape[0]
        start = pc.tp_rank * v_local
        n_valid = max(0, min(v_local, vocab_size - start))
        ignored = labels == ignore_index
        outside = ignored | (labels < start) | (labels >= start + v_local)
        local_t = torch.where(outside, torch.full_like(labels, -1), labels - start).contiguous()

        stats = torch.empty(3, n, dtype=torch.float32, device=x2d.device)  # local max, Σexp, target logit
        buf = torch.empty(min(chunk, n), v_local, dtype=x2d.dtype, device=x2d.device)
        wt = weight.t()
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = torch.mm(x2d[s:e], wt, out=buf[: e - s])
            stats[:, s:e] = torch.stack(ops.stats(logits, local_t[s:e], n_valid))
        del buf
        row_max = stats[0].clone()
        if pc.tp > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=pc.tp_group)
        local_max = stats[0]
        shift = (local_max - row_max).masked_fill(local_max == float("-inf"), float("-inf"))
        stats[1].mul_(shift.exp())  # Σexp relative to the global max (0 on rows with no local column)
        summed = stats[1:]
        if pc.tp > 1:
            dist.all_reduce(summed, group=pc.tp_group)
        lse = row_max + summed[0].log()
        loss = (lse - summed[1]).masked_fill(ignored, 0.0)

        ctx.save_for_backward(x2d, weight, local_t, ignored, lse)
        ctx.n_valid, ctx.chunk, ctx.ops = n_valid, chunk, ops
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x2d, weight, local_t, ignored, lse = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return (None,) * 8
        n, v_local = x2d.shape[0], weight.shape[0]
        chunk = ctx.chunk
        scale = grad_loss.float().masked_fill(ignored, 0.0).contiguous()
        dx = torch.empty_like(x2d) if need_dx else None
        dw_acc = None
        if need_dw:
            dw_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        buf = torch.empty(min(chunk, n), v_local, dtype=x2d.dtype, device=x2d.device)
        wt = weight.t()
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            xc = x2d[s:e]
            dlogits = torch.mm(xc, wt, out=buf[: e - s])
            ctx.ops.grad_(dlogits, local_t[s:e], lse[s:e], scale[s:e], ctx.n_valid)
            if dx is not None:
                torch.mm(dlogits, weight, out=dx[s:e])
            if dw_acc is not None:
                if weight.dtype == torch.float32:
                    dw_acc.addmm_(dlogits.t(), xc)
                else:  # one rounding per chunk product, fp32 sum over chunks
                    dw_acc += dlogits.t() @ xc
        dw = None if dw_acc is None else dw_acc.to(weight.dtype)
        return dx, dw, None, None, None, None, None, None


def _check_args(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pc: "ParallelContext",
                vocab_size: int, ignore_index: int, chunk_size: int | None) -> None:
    if x.dim() < 2:
        raise ValueError(f"linear_cross_entropy: x must be [b, s, h] or [n, h] (got {tuple(x.shape)})")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} must be [V/tp, h={x.shape[-1]}]")
    if labels.shape != x.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must have x's leading shape "
                         f"{tuple(x.shape[:-1])}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"linear_cross_entropy: x ({x.dtype}, {x.device}) and weight ({weight.dtype}, "
                         f"{weight.device}) must share dtype and device")
    v_pad = weight.shape[0] * pc.tp
    if not 0 < vocab_size <= v_pad:
        raise ValueError(f"linear_cross_entropy: vocab_size={vocab_size} must be in (0, {v_pad}] "
                         f"(the padded vocabulary = weight rows x tp)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1 (got {chunk_size})")
    check_labels(labels, vocab_size, ignore_index, "linear_cross_entropy")


def _chunked(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pc: "ParallelContext", *,
             vocab_size: int, ignore_index: int, chunk_size: int | None, ops: RowOps) -> torch.Tensor:
    _check_args(x, weight, labels, pc, vocab_size, ignore_index, chunk_size)
    h = x.shape[-1]
    x2d = x.reshape(-1, h).contiguous()
    flat = labels.reshape(-1).long()
    n = x2d.shape[0]
    chunk = chunk_size or default_chunk_size(n, weight.shape[0], h)
    loss = _LinearCrossEntropy.apply(x2d, weight, flat, pc, vocab_size, ignore_index, chunk, ops)
    return loss.view(labels.shape)


_TRITON_OPS = TritonRowOps()
_TORCH_OPS = TorchRowOps()


def triton_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                pc: "ParallelContext", *, vocab_size: int, ignore_index: int = -100,
                                chunk_size: int | None = None) -> torch.Tensor:
    """Chunked fused linear + vocab-parallel CE with Triton row kernels (module docstring has the contract)."""
    check_launch("linear_cross_entropy", x, weight, labels)
    return _chunked(x, weight, labels, pc, vocab_size=vocab_size, ignore_index=ignore_index,
                    chunk_size=chunk_size, ops=_TRITON_OPS)


def chunked_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 pc: "ParallelContext", *, vocab_size: int, ignore_index: int = -100,
                                 chunk_size: int | None = None) -> torch.Tensor:
    """The same chunked algorithm with torch row ops: any device, no Triton (module docstring has the contract)."""
    return _chunked(x, weight, labels, pc, vocab_size=vocab_size, ignore_index=ignore_index,
                    chunk_size=chunk_size, ops=_TORCH_OPS)


def reference_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   pc: "ParallelContext", *, vocab_size: int, ignore_index: int = -100,
                                   chunk_size: int | None = None) -> torch.Tensor:
    """Unfused: full ``[tokens, V/tp]`` logits, then ``vocab_parallel_cross_entropy`` (``chunk_size`` unused)."""
    _check_args(x, weight, labels, pc, vocab_size, ignore_index, chunk_size)
    return vocab_parallel_cross_entropy(F.linear(x, weight), labels, pc, vocab_size=vocab_size,
                                        ignore_index=ignore_index)


register("linear_cross_entropy", "triton", triton_linear_cross_entropy)

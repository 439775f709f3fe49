"""Fused LayerNorm (forward + backward) in Triton.

Contract
--------
``layer_norm(x, weight, bias, eps) -> y``

* ``x``: ``[..., n]`` fp32 / bf16 / fp16 (last dim contiguous after a reshape; other layouts are copied);
  ``weight``, ``bias``: ``[n]`` or None, any float dtype. ``y`` has ``x``'s shape and dtype.
* ``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dim, biased variance (``F.layer_norm``).
* Numerics: everything in fp32 registers (x is up-cast on load); one rounding to ``x.dtype`` on store. The
  forward saves ``mean`` and ``rstd`` (fp32, one per row) for the backward.
* Fused: the forward is one kernel (statistics, normalisation, affine); the backward is one kernel computing
  ``dx`` and, per program, fp32 partial sums of ``dweight = Σ dy·x̂`` and ``dbias = Σ dy`` over its rows; the
  few partial rows are summed in torch. ``dweight``/``dbias`` are therefore sums over *this rank's* rows only —
  with sequence parallelism they are partial over TP exactly like the torch path, and the existing
  ``sequence_parallel`` parameter tag (grads.py all-reduce) applies unchanged.
* Whole rows live in registers: ``n`` up to 64K columns (``BLOCK_N = next_pow2(n)``).

``reference_layer_norm`` is the plain-torch statement of the same math (fp32, written out) used by the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaocto.kernels.registry import as_rows, check_launch, reduction_programs, register, row_tiling


@triton.jit
def _layer_norm_fwd_kernel(X, Y, W, B, Mean, Rstd, stride_x, stride_y, n_rows, n_cols, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(X, DY, DX, W, Mean, Rstd, DW, DB, stride_x, stride_dy, stride_dx, n_rows, n_cols,
                           rows_per_program, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy
        if HAS_W:
            wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / n_cols
        c2 = tl.sum(wdy, axis=1) / n_cols
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    if HAS_W:
        tl.store(DW + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(DB + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """Launch the forward: ``(y, mean, rstd)``; ``mean``/``rstd`` are fp32 ``[rows]``."""
    dev = check_launch("layer_norm", x, weight, bias)
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"layer_norm: {name} must have shape ({n},) to match x's last dim (got {tuple(t.shape)})")
    x2 = as_rows(x)
    rows = x2.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=dev)
    mean = torch.empty(rows, dtype=torch.float32, device=dev)
    rstd = torch.empty(rows, dtype=torch.float32, device=dev)
    block_m, block_n, warps = row_tiling(rows, n, dev)
    if rows:
        _layer_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
            x2, y, weight, bias, mean, rstd, x2.stride(0), y.stride(0), rows, n, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y.view(x.shape), mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, has_bias: bool,
                   mean: torch.Tensor, rstd: torch.Tensor):
    """Launch the backward: ``(dx, dweight or None, dbias or None)`` (dweight/dbias fp32-summed, param dtype)."""
    dev = check_launch("layer_norm backward", dy, x, weight)
    n = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)
    rows = x2.shape[0]
    dx = torch.empty((rows, n), dtype=x.dtype, device=dev)
    block_m, block_n, warps = row_tiling(rows, n, dev)
    programs, per_program = reduction_programs(rows, block_m, dev)
    dw = torch.zeros((programs, n), dtype=torch.float32, device=dev) if weight is not None else None
    db = torch.zeros((programs, n), dtype=torch.float32, device=dev) if has_bias else None
    if rows:
        _layer_norm_bwd_kernel[(programs,)](
            x2, dy2, dx, weight, mean, rstd, dw, db, x2.stride(0), dy2.stride(0), dx.stride(0), rows, n, per_program,
            HAS_W=weight is not None, HAS_B=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dx.view(x.shape), (None if dw is None else dw.sum(0)), (None if db is None else db.sum(0))


class LayerNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton LayerNorm: ``apply(x, weight, bias, eps)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(dy, x, weight, ctx.has_bias, mean, rstd)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(ctx.bias_dtype)
        return dx, dw, db, None


def triton_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """Triton LayerNorm over the last dim (see the module contract)."""
    return LayerNormFunction.apply(x, weight, bias, float(eps))


def reference_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    """Plain-torch LayerNorm written out in fp32 (the statement the kernel is tested against)."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


register("layer_norm", "triton", triton_layer_norm)

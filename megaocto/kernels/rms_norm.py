"""Fused RMSNorm (forward + backward) in Triton (ChatGLM2 / CodeGeeX2's norm).

Contract
--------
``rms_norm(x, weight, eps) -> y``

* ``x``: ``[..., n]`` fp32 / bf16 / fp16 (last dim contiguous after a reshape; other layouts are copied);
  ``weight``: ``[n]``, any float dtype. ``y`` has ``x``'s shape and dtype.
* ``y = weight · x / sqrt(mean(x²) + eps)`` over the last dim — the same formula and rounding points as the torch
  op (fp32 math, one cast to ``x.dtype`` at the end).
* Numerics: fp32 registers; the forward saves ``rstd`` (fp32 per row) for the backward.
* Fused: forward = one kernel; backward = one kernel for ``dx = rstd·(w·dy − x̂·mean(x̂·w·dy))`` plus per-program
  fp32 partial sums of ``dweight = Σ dy·x̂`` (summed in torch). ``dweight`` covers this rank's rows only, so
  under sequence parallelism it is partial over TP exactly like the torch path (the ``sequence_parallel`` tag and
  grads.py's all-reduce apply unchanged).
* Whole rows live in registers: ``n`` up to 64K columns.

``reference_rms_norm`` is the plain-torch statement of the same math used by the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaocto.kernels.registry import as_rows, check_launch, reduction_programs, register, row_tiling


@triton.jit
def _rms_norm_fwd_kernel(X, Y, W, Rstd, stride_x, stride_y, n_rows, n_cols, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = w[None, :] * (x * rstd[:, None])
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(X, DY, DX, W, Rstd, DW, stride_x, stride_dy, stride_dx, n_rows, n_cols, rows_per_program,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / n_cols
        dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
    tl.store(DW + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Launch the forward: ``(y, rstd)``; ``rstd`` is fp32 ``[rows]``."""
    dev = check_launch("rms_norm", x, weight)
    n = x.shape[-1]
    if tuple(weight.shape) != (n,):
        raise ValueError(f"rms_norm: weight must have shape ({n},) to match x's last dim (got {tuple(weight.shape)})")
    x2 = as_rows(x)
    rows = x2.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=dev)
    rstd = torch.empty(rows, dtype=torch.float32, device=dev)
    block_m, block_n, warps = row_tiling(rows, n, dev)
    if rows:
        _rms_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
            x2, y, weight, rstd, x2.stride(0), y.stride(0), rows, n, eps,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y.view(x.shape), rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Launch the backward: ``(dx, dweight)``; dweight is fp32-summed, returned in fp32."""
    dev = check_launch("rms_norm backward", dy, x, weight)
    n = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)
    rows = x2.shape[0]
    dx = torch.empty((rows, n), dtype=x.dtype, device=dev)
    block_m, block_n, warps = row_tiling(rows, n, dev)
    programs, per_program = reduction_programs(rows, block_m, dev)
    dw = torch.zeros((programs, n), dtype=torch.float32, device=dev)
    if rows:
        _rms_norm_bwd_kernel[(programs,)](
            x2, dy2, dx, weight, rstd, dw, x2.stride(0), dy2.stride(0), dx.stride(0), rows, n, per_program,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dx.view(x.shape), dw.sum(0)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RMSNorm: ``apply(x, weight, eps)``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, weight, rstd)
        return dx, dw.to(weight.dtype), None


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim (see the module contract)."""
    return RMSNormFunction.apply(x, weight, float(eps))


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch RMSNorm in fp32: ``weight · x / sqrt(mean(x²) + eps)``, cast to ``x.dtype``."""
    xf = x.float()
    return (weight.float() * (xf / torch.sqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)


register("rms_norm", "triton", triton_rms_norm)

"""Fused bias + tanh-GELU (forward + backward) in Triton (Megatron's ``bias_gelu``, the GPT/BigCode MLP).

Contract
--------
``bias_gelu(x, bias_or_None) -> y``

* ``x``: ``[..., n]`` fp32 / bf16 / fp16 (last dim contiguous after a reshape; other layouts are copied); ``bias``:
  ``[n]`` or None. ``y`` has ``x``'s shape and dtype.
* ``y = gelu_tanh(z)``, ``z = x + bias``, ``gelu_tanh(z) = ½·z·(1 + tanh(√(2/π)·(z + 0.044715·z³)))``
  (``F.gelu(approximate="tanh")``).
* Numerics: ``z`` and the activation are computed in fp32 (the bias add is not rounded to ``x.dtype`` first,
  unlike the unfused ``x + bias`` in bf16); one rounding on store. The forward saves ``x`` (not ``z``, not ``y``);
  the backward recomputes ``z`` and ``tanh``.
* Fused: forward = bias add + GELU in one pass (the producing ColumnParallelLinear runs with
  ``skip_bias_add=True``); backward = one kernel writing ``dx = dy · gelu'(z)`` and per-program fp32 partial sums
  of ``dbias = Σ_rows dx`` (summed in torch; ``dbias`` in the bias dtype).

``reference_bias_gelu`` is the plain-torch fp32 statement of the same math used by the tests.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megaocto.kernels.registry import as_rows, check_launch, elementwise_tiling, reduction_programs, register

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_COEF = 0.044715


@triton.jit
def _tanh(u):
    # tanh(u) = sign(u)·(1 − e)/(1 + e) with e = exp(−2|u|) ∈ (0, 1]: no overflow for any u (Triton has no
    # portable tanh; libdevice's is CUDA-only and absent from the interpreter).
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, stride_x, stride_y, n_rows, n_cols, HAS_BIAS: tl.constexpr,
                          K: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    r64 = rows[:, None].to(tl.int64)
    z = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    t = _tanh(K * (z + C * z * z * z))
    tl.store(Y + r64 * stride_y + cols[None, :], (0.5 * z * (1.0 + t)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(X, B, DY, DX, DB, stride_x, stride_dy, stride_dx, n_rows, n_cols, rows_per_program,
                          HAS_BIAS: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < last)[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        z = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z = z + b[None, :]
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = _tanh(K * (z + C * z * z * z))
        grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * K * (1.0 + 3.0 * C * z * z)
        dx = dy * grad
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        db_acc += dx
    if HAS_BIAS:
        tl.store(DB + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _check(x: torch.Tensor, bias: torch.Tensor | None) -> torch.device:
    dev = check_launch("bias_gelu", x, bias)
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias must have shape ({x.shape[-1]},) to match x's last dim "
                         f"(got {tuple(bias.shape)})")
    return dev


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Launch the forward kernel."""
    dev = _check(x, bias)
    x2 = as_rows(x)
    rows, n = x2.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=dev)
    block_m, block_n, warps = elementwise_tiling(rows, n, dev)
    if rows and n:
        _bias_gelu_fwd_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, block_n))](
            x2, bias, y, x2.stride(0), y.stride(0), rows, n, HAS_BIAS=bias is not None, K=_SQRT_2_OVER_PI, C=_COEF,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y.view(x.shape)


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None):
    """Launch the backward kernel: ``(dx, dbias fp32 or None)``."""
    dev = _check(x, bias)
    x2, dy2 = as_rows(x), as_rows(dy)
    rows, n = x2.shape
    dx = torch.empty((rows, n), dtype=x.dtype, device=dev)
    block_m, block_n, warps = elementwise_tiling(rows, n, dev)
    programs, per_program = reduction_programs(rows, block_m, dev, triton.cdiv(n, block_n))
    db = torch.zeros((programs, n), dtype=torch.float32, device=dev) if bias is not None else None
    if rows and n:
        _bias_gelu_bwd_kernel[(programs, triton.cdiv(n, block_n))](
            x2, bias, dy2, dx, db, x2.stride(0), dy2.stride(0), dx.stride(0), rows, n, per_program,
            HAS_BIAS=bias is not None, K=_SQRT_2_OVER_PI, C=_COEF, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps)
    return dx.view(x.shape), (None if db is None else db.sum(0))


class BiasGeluFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x, bias_or_None)``."""

    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return bias_gelu_fwd(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db = bias_gelu_bwd(dy, x, bias)
        return dx, (None if db is None else db.to(bias.dtype))


def triton_bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Triton fused ``gelu_tanh(x + bias)`` (see the module contract)."""
    return BiasGeluFunction.apply(x, bias)


def reference_bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain-torch fp32 ``gelu_tanh(x + bias)`` written out, cast to ``x.dtype``."""
    z = x.float() if bias is None else x.float() + bias.float()
    return (0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + _COEF * z.pow(3))))).to(x.dtype)


register("bias_gelu", "triton", triton_bias_gelu)

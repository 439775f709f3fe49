"""Fused SwiGLU (forward + backward) in Triton, on the fused ``[gate | up]`` layout of the GLM2 MLP.

Contract
--------
``swiglu(x) -> y``

* ``x``: ``[..., 2f]`` fp32 / bf16 / fp16 whose last dim is ``[gate (f) | up (f)]`` — the local output of the
  column-parallel ``dense_h_to_4h`` (each TP rank holds ``[gate shard | up shard]``); last dim contiguous after a
  reshape (other layouts are copied). ``y``: ``[..., f]`` in ``x.dtype``.
* ``y = silu(gate) · up``, ``silu(g) = g · sigmoid(g)``.
* Numerics: fp32 registers, one rounding on store (the unfused torch path rounds ``silu(gate)`` to ``x.dtype``
  before the product). The forward saves ``x`` only; the backward recomputes the sigmoid.
* Fused: forward = one pass reading gate and up; backward = one kernel writing ``dx = [dgate | dup]`` with
  ``dgate = dy·up·σ(g)·(1 + g·(1 − σ(g)))`` and ``dup = dy·silu(g)`` into one ``[..., 2f]`` buffer (no
  concatenation).

``reference_swiglu`` is the plain-torch fp32 statement used by the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megaocto.kernels.registry import as_rows, check_launch, elementwise_tiling, register


@triton.jit
def _swiglu_fwd_kernel(X, Y, stride_x, stride_y, n_rows, f, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < f)[None, :]
    x_row = X + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
    g = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + f, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(X, DY, DX, stride_x, stride_dy, stride_dx, n_rows, f,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < f)[None, :]
    r64 = rows[:, None].to(tl.int64)
    x_row = X + r64 * stride_x + cols[None, :]
    g = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + f, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
    dx_row = DX + r64 * stride_dx + cols[None, :]
    tl.store(dx_row, dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_row + f, (dy * silu).to(DX.dtype.element_ty), mask=mask)


def _split(x: torch.Tensor) -> int:
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim of x must be [gate | up], an even size (got {x.shape[-1]})")
    return x.shape[-1] // 2


def swiglu_fwd(x: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: ``[..., 2f] -> [..., f]``."""
    dev = check_launch("swiglu", x)
    f = _split(x)
    x2 = as_rows(x)
    rows = x2.shape[0]
    y = torch.empty((rows, f), dtype=x.dtype, device=dev)
    block_m, block_n, warps = elementwise_tiling(rows, f, dev)
    if rows and f:
        _swiglu_fwd_kernel[(triton.cdiv(rows, block_m), triton.cdiv(f, block_n))](
            x2, y, x2.stride(0), y.stride(0), rows, f, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y.view(*x.shape[:-1], f)


def swiglu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel: ``dx = [dgate | dup]`` shaped like ``x``."""
    dev = check_launch("swiglu backward", dy, x)
    f = _split(x)
    x2, dy2 = as_rows(x), as_rows(dy)
    rows = x2.shape[0]
    dx = torch.empty((rows, 2 * f), dtype=x.dtype, device=dev)
    block_m, block_n, warps = elementwise_tiling(rows, f, dev)
    if rows and f:
        _swiglu_bwd_kernel[(triton.cdiv(rows, block_m), triton.cdiv(f, block_n))](
            x2, dy2, dx, x2.stride(0), dy2.stride(0), dx.stride(0), rows, f, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps)
    return dx.view(x.shape)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x)`` with ``x = [gate | up]``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return swiglu_fwd(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return swiglu_bwd(dy, x)


def triton_swiglu(x: torch.Tensor) -> torch.Tensor:
    """Triton fused ``silu(gate) * up`` for ``x = [gate | up]`` (see the module contract)."""
    return SwiGLUFunction.apply(x)


def reference_swiglu(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch fp32 ``silu(gate) * up``, cast to ``x.dtype``."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


register("swiglu", "triton", triton_swiglu)

"""Rotary position embedding (forward + backward) in Triton: GLM interleaved pairs and GPT-NeoX halves, partial.

Contract
--------
``rotary(x, cos, sin, *, interleaved) -> y``

* ``x``: ``[b, h, s, d]`` fp32 / bf16 / fp16, any strides (e.g. the transposed view of a fused QKV projection; it
  is read in place, never copied). ``cos``, ``sin``: fp32, broadcastable to ``[b, h, s, r]`` (usually
  ``[b, 1, s, r]``); ``2r <= d`` dims are rotated, the last ``d - 2r`` pass through unchanged (partial rotary,
  e.g. CodeGeeX2 rotates 64 of 128). ``y``: a new contiguous ``[b, h, s, d]`` tensor in ``x.dtype``.
* Pair ``j`` (``0 <= j < r``) is ``(x[2j], x[2j+1])`` when ``interleaved`` (GLM / ChatGLM2) or ``(x[j], x[j+r])``
  otherwise (GPT-NeoX / LLaMA halves); it becomes ``(x0·cos_j − x1·sin_j, x1·cos_j + x0·sin_j)``.
* Numerics: fp32 math, one rounding to ``x.dtype`` on store (as the torch op).
* Fused: one kernel rotates and copies the pass-through dims (no slicing, ``cat`` or fp32 temporaries); the
  backward is the same kernel rotating the incoming gradient by the opposite angle (``sin → −sin``); ``cos``/``sin``
  get no gradient.

``reference_rotary`` is the plain-torch statement used by the tests (complex multiplication, independent of the
registry's torch op).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaocto.kernels.registry import check_launch, next_power_of_2, register, row_tiling


@triton.jit
def _rotary_kernel(X, COS, SIN, Y, n_rows, h, s, sxb, sxh, sxs, sxd, scb, sch, scs, ssb, ssh, sss, r, d,
                   SIGN: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_PASS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    bi = rows64 // (h * s)
    hi = (rows64 // s) % h
    si = rows64 % s
    x_base = X + (bi * sxb + hi * sxh + si * sxs)[:, None]
    y_base = Y + (rows64 * d)[:, None]  # Y is contiguous [b, h, s, d]
    j = tl.arange(0, BLOCK_R)
    mask = row_ok[:, None] & (j < r)[None, :]
    if INTERLEAVED:
        i0 = 2 * j
        i1 = 2 * j + 1
    else:
        i0 = j
        i1 = j + r
    c = tl.load(COS + (bi * scb + hi * sch + si * scs)[:, None] + j[None, :], mask=mask, other=0.0).to(tl.float32)
    sn = tl.load(SIN + (bi * ssb + hi * ssh + si * sss)[:, None] + j[None, :], mask=mask, other=0.0).to(tl.float32)
    sn = sn * SIGN
    x0 = tl.load(x_base + i0[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_base + i1[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_base + i0[None, :], (x0 * c - x1 * sn).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_base + i1[None, :], (x1 * c + x0 * sn).to(Y.dtype.element_ty), mask=mask)
    if HAS_PASS:
        p = 2 * r + tl.arange(0, BLOCK_P)
        pmask = row_ok[:, None] & (p < d)[None, :]
        rest = tl.load(x_base + p[None, :] * sxd, mask=pmask, other=0.0)
        tl.store(y_base + p[None, :], rest.to(Y.dtype.element_ty), mask=pmask)


def _cos_strides(t: torch.Tensor, shape: tuple[int, int, int, int], name: str) -> tuple[int, int, int]:
    if t.dim() > 4 or t.shape[-1] != shape[-1]:
        raise ValueError(f"rotary: {name} must be broadcastable to [b, h, s, r] = {list(shape)} "
                         f"(got {tuple(t.shape)})")
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        e = t.expand(shape)
    except RuntimeError:
        raise ValueError(f"rotary: {name} must be broadcastable to [b, h, s, r] = {list(shape)} "
                         f"(got {tuple(t.shape)})") from None
    return e.stride(0), e.stride(1), e.stride(2)


def rotary_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool,
                 inverse: bool = False) -> torch.Tensor:
    """Launch the kernel: rotate ``x`` by the angles of ``cos``/``sin`` (``inverse``: by the opposite angles)."""
    dev = check_launch("rotary", x, cos, sin)
    if x.dim() != 4:
        raise ValueError(f"rotary: x must be [b, h, s, d] (got {tuple(x.shape)})")
    b, h, s, d = x.shape
    r = cos.shape[-1]
    if sin.shape[-1] != r or not 0 < 2 * r <= d:
        raise ValueError(f"rotary: cos/sin last dims ({r}, {sin.shape[-1]}) must be equal and rotate 2·r <= "
                         f"head_dim={d} dims")
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    cs = _cos_strides(cos, (b, h, s, r), "cos")
    ss = _cos_strides(sin, (b, h, s, r), "sin")
    y = torch.empty((b, h, s, d), dtype=x.dtype, device=dev)
    rows = b * h * s
    block_m, _, warps = row_tiling(rows, d, dev)
    if rows:
        _rotary_kernel[(triton.cdiv(rows, block_m),)](
            x, cos, sin, y, rows, h, s, *x.stride(), *cs, *ss, r, d,
            SIGN=-1.0 if inverse else 1.0, INTERLEAVED=bool(interleaved), HAS_PASS=2 * r < d,
            BLOCK_M=block_m, BLOCK_R=next_power_of_2(r), BLOCK_P=next_power_of_2(max(d - 2 * r, 1)),
            num_warps=warps)
    return y


class RotaryFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x, cos, sin, interleaved)``; the backward rotates by the opposite angle."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return rotary_apply(x, cos, sin, interleaved=interleaved)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotary_apply(dy, cos, sin, interleaved=ctx.interleaved, inverse=True), None, None, None


def triton_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Triton rotary embedding of ``x [b, h, s, d]`` (see the module contract)."""
    return RotaryFunction.apply(x, cos, sin, bool(interleaved))


def reference_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Plain-torch rotary as a complex multiplication ``(x0 + i·x1)·(cos + i·sin)`` in fp32."""
    r = cos.shape[-1]
    xr = x[..., :2 * r].float()
    if interleaved:
        pairs = xr.unflatten(-1, (r, 2))
        z = torch.view_as_complex(pairs.contiguous()) * torch.complex(cos.float(), sin.float())
        rotated = torch.view_as_real(z).flatten(-2)
    else:
        z = torch.complex(xr[..., :r], xr[..., r:]) * torch.complex(cos.float(), sin.float())
        rotated = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., 2 * r:]], dim=-1)


register("rotary", "triton", triton_rotary)

"""Triton scaled masked softmax (forward + backward) and the unfused attention path built on it.

Contract::

    scaled_masked_softmax(x [..., sq, sk], scale=1.0, *, causal=False, segment_ids=None) -> y (x.dtype)

* ``y = softmax(scale * x)`` over the last dim, with masked positions excluded (their ``y`` is exactly 0).
  Masks: ``causal`` keeps column ``j <= i`` for row ``i`` (top-left aligned, as SDPA's ``is_causal``);
  ``segment_ids`` ``[b, s]`` (needs ``x`` = ``[b, h, s, s]``) keeps ``j`` with the same segment id as ``i`` —
  together the block-diagonal causal mask of :func:`megaocto.kernels.attention.segment_mask`. A row with no kept
  column (impossible for those masks on square inputs) comes out all zeros, never NaN.
* Math in fp32 (max-subtracted ``exp``), output in ``x.dtype``; the backward
  ``dx = scale * y * (dy - sum(dy * y))`` is also fp32 inside. Rows of any length: a row that fits one tile
  (``BLOCK_N`` = next power of two of ``sk``, up to 8192 columns on CUDA) is read once; longer rows are streamed
  in ``BLOCK_N`` chunks with an online max/sum pass and a write pass. Several rows share a program when rows are
  short.
* x must be on CUDA, or on CPU under ``TRITON_INTERPRET=1``; any float dtype (fp16, bf16, fp32).

:func:`unfused_attention` is the explicit non-flash attention path: ``q @ k^T`` with torch (MQA/GQA by a
broadcast view, K/V never expanded), this softmax, optional dropout on the probabilities (torch), ``@ v``. It is
registered as attention backend ``"triton_softmax"`` with priority -20 (never chosen automatically; force it with
``attention(..., backend="triton_softmax")``). Unlike the flash kernel it supports ``dropout_p > 0`` but it
materialises the ``[b, hq, s, s]`` scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megaocto.kernels.registry import interpreter_enabled
from megaocto.kernels.attention import register_backend, segment_mask

_MAX_BLOCK_N = 8192  # widest single tile on CUDA; longer rows are streamed


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _keep(rows, cols, seg_q, SEG, seg_base, n_rows, n_cols, sq, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: inside the matrix and not masked."""
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= (rows % sq)[:, None])
    if HAS_SEG:
        seg_k = tl.load(SEG + seg_base[:, None] + cols[None, :], mask=ok, other=-2)
        ok = ok & (seg_q[:, None] == seg_k)
    return ok


@triton.jit
def _softmax_fwd_kernel(X, Y, SEG, n_rows, n_cols, sq, rows_per_batch, stride_x, stride_y, scale,
                        CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, SINGLE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    seg_base = (rows64 // rows_per_batch) * n_cols  # segment_ids row of this batch element ([b, s], s == n_cols)
    seg_q = tl.zeros([BLOCK_M], tl.int32)
    if HAS_SEG:
        seg_q = tl.load(SEG + seg_base + rows64 % sq, mask=r_ok, other=-1)
    x_row = X + rows64[:, None] * stride_x
    y_row = Y + rows64[:, None] * stride_y
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        ok = _keep(rows, cols, seg_q, SEG, seg_base, n_rows, n_cols, sq, CAUSAL, HAS_SEG)
        x = tl.load(x_row + cols[None, :], mask=ok, other=0.0).to(tl.float32) * scale
        x = tl.where(ok, x, float("-inf"))
        m = tl.max(x, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.where(ok, tl.exp(x - m[:, None]), 0.0)
        s = tl.sum(e, 1)
        s = tl.where(s == 0.0, 1.0, s)
        tl.store(y_row + cols[None, :], (e / s[:, None]).to(Y.dtype.element_ty),
                 mask=r_ok[:, None] & (cols < n_cols)[None, :])
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):  # pass 1: online max and sum
            cols = start + tl.arange(0, BLOCK_N)
            ok = _keep(rows, cols, seg_q, SEG, seg_base, n_rows, n_cols, sq, CAUSAL, HAS_SEG)
            x = tl.load(x_row + cols[None, :], mask=ok, other=0.0).to(tl.float32) * scale
            x = tl.where(ok, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.where(ok, tl.exp(x - m_safe[:, None]), 0.0), 1)
            m = m_new
        m = tl.where(m == float("-inf"), 0.0, m)
        s = tl.where(s == 0.0, 1.0, s)
        for start in range(0, n_cols, BLOCK_N):  # pass 2: normalised write
            cols = start + tl.arange(0, BLOCK_N)
            ok = _keep(rows, cols, seg_q, SEG, seg_base, n_rows, n_cols, sq, CAUSAL, HAS_SEG)
            x = tl.load(x_row + cols[None, :], mask=ok, other=0.0).to(tl.float32) * scale
            y = tl.where(ok, tl.exp(x - m[:, None]) / s[:, None], 0.0)
            tl.store(y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=r_ok[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _softmax_bwd_kernel(Y, DY, DX, n_rows, n_cols, stride_y, stride_dy, stride_dx, scale,
                        SINGLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    y_row = Y + rows64[:, None] * stride_y
    dy_row = DY + rows64[:, None] * stride_dy
    dx_row = DX + rows64[:, None] * stride_dx
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = r_ok[:, None] & (cols < n_cols)[None, :]
        y = tl.load(y_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, 1)
        tl.store(dx_row + cols[None, :], (scale * y * (dy - dot[:, None])).to(DX.dtype.element_ty), mask=mask)
    else:
        dot = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = r_ok[:, None] & (cols < n_cols)[None, :]
            y = tl.load(y_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(y * dy, 1)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = r_ok[:, None] & (cols < n_cols)[None, :]
            y = tl.load(y_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + cols[None, :], (scale * y * (dy - dot[:, None])).to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _tiling(n_rows: int, n_cols: int, device: torch.device, block_n: int | None) -> tuple[int, int, int, bool]:
    """``(BLOCK_M, BLOCK_N, num_warps, single_pass)`` for rows of ``n_cols``."""
    full = triton.next_power_of_2(max(n_cols, 1))
    cap = block_n or (_MAX_BLOCK_N if device.type == "cuda" else 65536)
    bn = min(full, triton.next_power_of_2(cap))
    tile = 4096 if device.type == "cuda" else 65536  # the interpreter pays per program, not per element
    bm = max(1, min(triton.next_power_of_2(max(n_rows, 1)), tile // bn, 64))
    warps = 4 if bm * bn <= 2048 else 8 if bm * bn <= 8192 else 16
    return bm, bn, warps, bn >= n_cols


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: torch.Tensor, causal: bool, segment_ids: torch.Tensor | None) -> None:
    if not (x.is_cuda or (x.device.type == "cpu" and interpreter_enabled())):
        raise RuntimeError(f"megaocto/kernels/softmax.py: Triton softmax got a {x.device.type} tensor; it runs on "
                           f"CUDA, or on CPU only under TRITON_INTERPRET=1")
    if not x.is_floating_point():
        raise TypeError(f"scaled_masked_softmax expects a float tensor, got {x.dtype}")
    if (causal or segment_ids is not None) and x.dim() < 2:
        raise ValueError(f"a masked softmax needs x [..., sq, sk], got {tuple(x.shape)}")
    if segment_ids is not None:
        if x.dim() != 4 or x.shape[-1] != x.shape[-2] or tuple(segment_ids.shape) != (x.shape[0], x.shape[-1]):
            raise ValueError(f"segment_ids [b, s] needs x [b, h, s, s]; got x {tuple(x.shape)}, "
                             f"segment_ids {tuple(segment_ids.shape)}")


class ScaledMaskedSoftmax(torch.autograd.Function):
    """Autograd wrapper: saves the output ``y`` (input dtype) for the backward."""

    @staticmethod
    def forward(ctx, x, scale: float, causal: bool, segment_ids, block_n):
        rows = _rows(x)
        n_rows, n_cols = rows.shape
        y = torch.empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
        sq = x.shape[-2] if x.dim() >= 2 else 1
        rows_per_batch = n_rows // x.shape[0] if segment_ids is not None else 1
        seg = (segment_ids.to(device=x.device, dtype=torch.int32).contiguous() if segment_ids is not None
               else torch.empty(1, dtype=torch.int32, device=x.device))
        bm, bn, warps, single = _tiling(n_rows, n_cols, x.device, block_n)
        if n_rows:
            _softmax_fwd_kernel[(triton.cdiv(n_rows, bm),)](
                rows, y, seg, n_rows, n_cols, sq, rows_per_batch, rows.stride(0), y.stride(0), scale,
                CAUSAL=causal, HAS_SEG=segment_ids is not None, SINGLE=single, BLOCK_M=bm, BLOCK_N=bn,
                num_warps=warps)
        ctx.save_for_backward(y)
        ctx.scale, ctx.block_n, ctx.shape = scale, block_n, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dy_rows = _rows(dy)
        n_rows, n_cols = y.shape
        dx = torch.empty_like(y)
        bm, bn, warps, single = _tiling(n_rows, n_cols, y.device, ctx.block_n)
        if n_rows:
            _softmax_bwd_kernel[(triton.cdiv(n_rows, bm),)](
                y, dy_rows, dx, n_rows, n_cols, y.stride(0), dy_rows.stride(0), dx.stride(0), ctx.scale,
                SINGLE=single, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        return dx.view(ctx.shape), None, None, None, None


def scaled_masked_softmax(x: torch.Tensor, scale: float = 1.0, *, causal: bool = False,
                          segment_ids: torch.Tensor | None = None, block_n: int | None = None) -> torch.Tensor:
    """Triton ``softmax(scale * x)`` with the causal and/or packed-segment mask (see module docstring).

    ``block_n`` caps the column tile (a power of two); rows longer than it take the streamed two-pass path.
    """
    _check(x, causal, segment_ids)
    return ScaledMaskedSoftmax.apply(x, float(scale), causal, segment_ids, block_n)


def reference_scaled_masked_softmax(x: torch.Tensor, scale: float = 1.0, *, causal: bool = False,
                                    segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch reference of :func:`scaled_masked_softmax` (fp32 math, output in ``x.dtype``)."""
    xf = x.float() * scale
    keep = None
    if segment_ids is not None:
        keep = segment_mask(segment_ids, causal)  # [b, 1, s, s]
    elif causal:
        sq, sk = x.shape[-2], x.shape[-1]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=x.device).tril()
    if keep is None:
        return torch.softmax(xf, dim=-1).to(x.dtype)
    y = torch.softmax(xf.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.where(keep, y, torch.zeros((), device=x.device)).nan_to_num(0.0).to(x.dtype)


# ---------------------------------------------------------------------------------------------- attention path
def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                      segment_ids: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None,
                      softmax=scaled_masked_softmax) -> torch.Tensor:
    """Attention ``[b, hq, s, d]`` as ``softmax(scale * q k^T, mask) @ v`` with the Triton softmax.

    MQA/GQA: the ``hq // hkv`` query heads of a group are stacked along the row dim so one batched matmul per
    K/V head serves them (K/V not expanded). ``dropout_p`` drops probabilities (torch dropout, training mode).
    ``softmax`` defaults to :func:`scaled_masked_softmax`; pass :func:`reference_scaled_masked_softmax` for an
    all-torch reference of the same path.
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.reshape(b, hkv, group * s, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, hq, s, s)
    probs = softmax(scores, scale, causal=causal, segment_ids=segment_ids)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs.view(b, hkv, group * s, s), v).view(b, hq, s, d)


def supports(q, k, v, *, segment_ids=None, dropout_p: float = 0.0) -> bool:
    """True for CUDA tensors (or CPU under ``TRITON_INTERPRET=1``) of one float dtype with as many keys as
    queries; any head dim, dropout ok."""
    return (q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype and q.shape[2] == k.shape[2]
            and (q.is_cuda or (q.device.type == "cpu" and interpreter_enabled())))


def _triton_softmax_backend(q, k, v, *, causal, segment_ids, dropout_p, scale):
    return unfused_attention(q, k, v, causal=causal, segment_ids=segment_ids, dropout_p=dropout_p, scale=scale)


register_backend("triton_softmax", _triton_softmax_backend, supports, priority=-20)
# model.kernels: triton reaches this backend through the "triton" backend, for calls with dropout
# (megaocto.kernels.flash_attention.fallback_backend).

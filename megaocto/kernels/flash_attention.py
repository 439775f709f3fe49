"""Triton flash attention (FlashAttention-2 style), forward and backward, registered as attention backend "triton".

Contract (same as :func:`megaocto.kernels.attention.attention`)::

    flash_attention(q [b, hq, s, d], k [b, hkv, s, d], v [b, hkv, s, d], *, causal=True,
                    segment_ids=None [b, s] int, scale=None) -> o [b, hq, s, d] (q.dtype)

* dtypes: fp16, bf16, fp32 (all three tensors the same). ``tl.dot`` accumulates in fp32; the softmax statistics
  (running max, running sum, logsumexp) are fp32. fp32 inputs use ``input_precision="ieee"`` (no TF32), so fp32
  results match torch's fp32 SDPA to ~1e-5; bf16/fp16 round P and dS to the input dtype before their matmuls,
  as flash-attn does.
* ``head_dim`` 1..128; a dim that is not a power of two (24, 80, ...) is padded to the next power of two (at least
  16) inside the kernel by masked loads, never in memory. ``s`` need not be a multiple of any block size.
  The last dim of q, k, v must have stride 1 (other strides are free: views of a fused QKV projection work
  without a copy); otherwise a contiguous copy is made.
* MQA/GQA: query head ``i`` reads K/V head ``i // (hq // hkv)`` through strides; K/V are never expanded. In the
  backward, dK/dV for one K/V head are accumulated **inside the kernel**: the program that owns a K/V block loops
  over the ``hq // hkv`` query heads of its group, so no ``[b, hq, s, d]`` dK/dV buffer and no atomics exist.
  Exception, on GPUs only: when that leaves too few programs to fill the device (MQA with a small batch), the
  group is cut into ``splits`` slices handled by separate programs that write fp32 partial sums to a
  ``[splits, b, hkv, s, d]`` buffer, reduced by one torch sum (:func:`_choose_kv_splits`).
* Packing: ``segment_ids`` ``[b, s]`` (1, 2, ... per packed sample, 0 = padding). Token ``i`` attends to token
  ``j`` iff ``segment_ids[i] == segment_ids[j]`` (and ``j <= i`` when causal) — exactly
  :func:`megaocto.kernels.attention.segment_mask`, so padding attends to padding and no row is empty (no NaN).
  Key blocks that cannot hold a key of any query's segment are skipped: per token the first/last index of its
  segment id is computed once (on device, no host sync) and each program bounds its loop with them, so a packed
  row costs about ``sum(len_i^2)`` rather than ``s^2``. flash-attn's ``cu_seqlens`` layout (q ``[total, h, d]``)
  is served by :func:`flash_attention_varlen`, which turns the offsets into segment ids on one row.
* Dropout is not implemented in the kernel: :func:`supports` is False when ``dropout_p > 0``. The backend
  function (``backend="triton"``, what ``model.kernels: triton`` asks for) runs such calls on the
  ``triton_softmax`` backend (Triton softmax + torch dropout), and any other input :func:`supports` rejects
  (head_dim > 128, other dtypes, a CPU tensor without the interpreter) on ``sdpa``: :func:`fallback_backend`.
* Offsets: row offsets (``offs * row_stride``) are int64 in every kernel, so tensors past 2**31 elements (long
  sequences of a fused QKV view) address correctly.

Algorithm. Forward: one program per (query block, batch*query head); online softmax over key blocks in the
base-2 domain (``exp2``, scores pre-multiplied by ``scale*log2(e)``); saves ``lse`` (natural-log logsumexp per
row, fp32 ``[b, hq, s]``). Backward: (1) ``delta = rowsum(dO * O)`` (fp32), (2) one program per (key block,
batch*K/V head) recomputes ``P = exp(S - lse)`` and accumulates ``dV += P^T dO`` and ``dK += dS^T Q`` with
``dS = P * (dP - delta)``, (3) one program per (query block, batch*query head) accumulates ``dQ += dS K``.
dQ, dK, dV are written once each (no atomics, deterministic). Without segments every loop is split into blocks
that need no mask (fully visible: below the causal diagonal, inside the sequence) and the few masked ones (the
diagonal, the ragged tail), so the mask arithmetic is paid only there; with segments one masked loop runs over
the blocks that can share a segment.

Block sizes: under ``TRITON_INTERPRET=1`` one fixed config (32x32; the interpreter cannot autotune). On a GPU
``triton.autotune`` picks among a few configs keyed by (seq_len, head_dim, causal, packed, dtype).
Registration: backend ``"triton"`` with priority -10, below ``sdpa`` (0) and flash-attn (10), so automatic
selection never picks it; the model asks for it with ``backend="triton"`` when ``kernels: triton`` and flash-attn
is not importable (see ``megaocto.kernels.registry``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megaocto.kernels import softmax as _softmax  # registers the "triton_softmax" backend used for dropout
from megaocto.kernels.attention import attention as _attention
from megaocto.kernels.registry import interpreter_enabled, register
from megaocto.kernels.attention import register_backend

_LOG2E = 1.4426950408889634
# Triton reads TRITON_INTERPRET when the kernels are decorated (import time); the configs below follow it.
_INTERPRET = interpreter_enabled()
MAX_HEAD_DIM = 128


def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs from (BLOCK_M, BLOCK_N, num_warps, num_stages); one small config under the interpreter."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in pairs]


_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)])
_BWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)])
_TUNE_KEY = ["seq_len", "HEAD_DIM", "CAUSAL", "HAS_SEG"]


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``DOT_F32`` upcasts the operands first (interpreter + bf16, where
    Triton 3.9's numpy ``tl.dot`` returns garbage for bf16; bf16 products are exact in fp32, so same numerics)."""
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PREC)
    return out


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, seg_q, SEG, seg_row, offs_m, offs_d, d_ok, m_ok,
               lo, hi, seq_len, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
               DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update over key blocks ``[lo, hi)``. ``MASK=False`` only for blocks every row fully sees
    (all keys valid, below the causal diagonal, no segments): no mask arithmetic at all."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC, DOT_F32) * qk_scale
        if MASK:
            ok = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_m[:, None] >= offs_n[None, :])
            if HAS_SEG:
                seg_k = tl.load(SEG + seg_row + offs_n, mask=n_ok, other=-2)
                ok = ok & (seg_q[:, None] == seg_k[None, :])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, DOT_F32)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEG, FIRST, LAST,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                seq_len, n_heads, group, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    hk = h // group
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_len
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    seg_row = b * seq_len

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_SEG:  # one masked pass over the key blocks that can share a segment with this query block
        seg_q = tl.load(SEG + seg_row + offs_m, mask=m_ok, other=-1)
        first = tl.load(FIRST + seg_row + offs_m, mask=m_ok, other=seq_len)
        last = tl.load(LAST + seg_row + offs_m, mask=m_ok, other=-1)
        lo = (tl.min(first, 0) // BLOCK_N) * BLOCK_N
        hi = tl.max(last, 0) + 1
        if CAUSAL:
            hi = tl.minimum(hi, (mb + 1) * BLOCK_M)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, seg_q, SEG, seg_row, offs_m, offs_d,
                                   d_ok, m_ok, lo, hi, seq_len, qk_scale, True, CAUSAL, True, DOT_PREC, DOT_F32,
                                   BLOCK_N)
    else:  # unmasked full blocks, then the masked diagonal (causal) or ragged tail
        if CAUSAL:
            split = (tl.minimum(mb * BLOCK_M + 1, seq_len) // BLOCK_N) * BLOCK_N
            hi = tl.minimum((mb + 1) * BLOCK_M, seq_len)
        else:
            split = (seq_len // BLOCK_N) * BLOCK_N
            hi = seq_len
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, m_ok, SEG, seg_row, offs_m, offs_d,
                                   d_ok, m_ok, 0, split, seq_len, qk_scale, False, CAUSAL, False, DOT_PREC,
                                   DOT_F32, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, m_ok, SEG, seg_row, offs_m, offs_d,
                                   d_ok, m_ok, split, hi, seq_len, qk_scale, True, CAUSAL, False, DOT_PREC,
                                   DOT_F32, BLOCK_N)

    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_fin = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past seq_len can be empty; they are not stored
    out = acc / l_fin[:, None]
    tl.store(O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * sos + offs_d[None, :],
             out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_fin + tl.log2(l_fin)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + (b * n_heads + h) * seq_len + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, sos, sdb, sdh, sds, seq_len, n_heads,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * sos + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m.to(tl.int64)[:, None] * sds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * n_heads + h) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, sqs, sds, LSE, DELTA, row_base, seg_k, SEG, seg_row, offs_n, offs_d,
                d_ok, n_ok, lo, hi, seq_len, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_SEG: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK/dV of one key block from query blocks ``[lo, hi)`` of one query head (scores kept transposed,
    ``[keys, queries]``). ``MASK=False`` only for query blocks that are all valid and see every key."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seq_len
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m.to(tl.int64)[:, None] * sds + offs_d[None, :], mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        s_t = _dot(k, tl.trans(q), DOT_PREC, DOT_F32) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASK:
            ok = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_m[None, :] >= offs_n[:, None])
            if HAS_SEG:
                seg_q = tl.load(SEG + seg_row + offs_m, mask=m_ok, other=-1)
                ok = ok & (seg_k[:, None] == seg_q[None, :])
            p_t = tl.where(ok, p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, DOT_PREC, DOT_F32)
        dp_t = _dot(v, tl.trans(do), DOT_PREC, DOT_F32)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_PREC, DOT_F32)
    return dk, dv


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEG, FIRST, LAST,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                     sdkb, sdkh, sdks, sdvb, sdvh, sdvs, sdk_split, sdv_split,
                     seq_len, n_heads, n_kv_heads, group, splits, heads_per_split, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                     DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    nb = tl.program_id(0)
    pid1 = tl.program_id(1)
    sp = (pid1 % splits).to(tl.int64)  # which slice of the group's query heads this program sums
    bh = pid1 // splits
    b = (bh // n_kv_heads).to(tl.int64)
    hk = (bh % n_kv_heads).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seq_len
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    seg_row = b * seq_len

    # Query-block ranges: [lo, a) masked (causal diagonal), [a, c) unmasked, [c, hi) masked (ragged tail);
    # with segments a single masked range over the query blocks that can share a segment with these keys.
    lo = 0
    hi = seq_len
    if HAS_SEG:
        seg_k = tl.load(SEG + seg_row + offs_n, mask=n_ok, other=-2)
        last = tl.load(LAST + seg_row + offs_n, mask=n_ok, other=-1)
        hi = tl.max(last, 0) + 1
        if CAUSAL:
            lo = ((nb * BLOCK_N) // BLOCK_M) * BLOCK_M
        else:
            first = tl.load(FIRST + seg_row + offs_n, mask=n_ok, other=seq_len)
            lo = (tl.min(first, 0) // BLOCK_M) * BLOCK_M
        a = hi
        c = hi
    else:
        seg_k = n_ok
        c = (seq_len // BLOCK_M) * BLOCK_M
        if CAUSAL:
            lo = ((nb * BLOCK_N) // BLOCK_M) * BLOCK_M
            a = tl.minimum(tl.cdiv((nb + 1) * BLOCK_N - 1, BLOCK_M) * BLOCK_M, c)
        else:
            a = 0
        c = tl.maximum(c, a)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(heads_per_split):  # query heads sharing this K/V head (GQA/MQA): dK/dV summed here
        h = hk * group + sp * heads_per_split + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        row_base = (b * n_heads + h) * seq_len
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, sqs, sds, LSE, DELTA, row_base, seg_k, SEG, seg_row,
                             offs_n, offs_d, d_ok, n_ok, lo, a, seq_len, qk_scale, True, CAUSAL, HAS_SEG, DOT_PREC,
                             DOT_F32, BLOCK_M)
        if not HAS_SEG:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, sqs, sds, LSE, DELTA, row_base, seg_k, SEG,
                                 seg_row, offs_n, offs_d, d_ok, n_ok, a, c, seq_len, qk_scale, False, CAUSAL, False,
                                 DOT_PREC, DOT_F32, BLOCK_M)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, sqs, sds, LSE, DELTA, row_base, seg_k, SEG,
                                 seg_row, offs_n, offs_d, d_ok, n_ok, c, hi, seq_len, qk_scale, True, CAUSAL, False,
                                 DOT_PREC, DOT_F32, BLOCK_M)
    dk = dk * scale
    tl.store(DK + sp * sdk_split + b * sdkb + hk * sdkh + offs_n.to(tl.int64)[:, None] * sdks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + sp * sdv_split + b * sdvb + hk * sdvh + offs_n.to(tl.int64)[:, None] * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, svs, seg_q, SEG, seg_row, offs_m, offs_d, d_ok, m_ok,
              lo, hi, seq_len, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
              DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block from key blocks ``[lo, hi)``; ``MASK`` as in :func:`_fwd_inner`."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC, DOT_F32) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            ok = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_m[:, None] >= offs_n[None, :])
            if HAS_SEG:
                seg_k = tl.load(SEG + seg_row + offs_n, mask=n_ok, other=-2)
                ok = ok & (seg_q[:, None] == seg_k[None, :])
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_PREC, DOT_F32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PREC, DOT_F32)
    return dq


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEG, FIRST, LAST,
                   sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sdqb, sdqh, sdqs,
                   seq_len, n_heads, group, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                   DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    hk = h // group
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_len
    d_ok = offs_d < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m.to(tl.int64)[:, None] * sds + offs_d[None, :], mask=q_mask, other=0.0)
    row_base = (b * n_heads + h) * seq_len
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    seg_row = b * seq_len

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_SEG:
        seg_q = tl.load(SEG + seg_row + offs_m, mask=m_ok, other=-1)
        first = tl.load(FIRST + seg_row + offs_m, mask=m_ok, other=seq_len)
        last = tl.load(LAST + seg_row + offs_m, mask=m_ok, other=-1)
        lo = (tl.min(first, 0) // BLOCK_N) * BLOCK_N
        hi = tl.max(last, 0) + 1
        if CAUSAL:
            hi = tl.minimum(hi, (mb + 1) * BLOCK_M)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, svs, seg_q, SEG, seg_row, offs_m, offs_d, d_ok,
                       m_ok, lo, hi, seq_len, qk_scale, True, CAUSAL, True, DOT_PREC, DOT_F32, BLOCK_N)
    else:
        if CAUSAL:
            split = (tl.minimum(mb * BLOCK_M + 1, seq_len) // BLOCK_N) * BLOCK_N
            hi = tl.minimum((mb + 1) * BLOCK_M, seq_len)
        else:
            split = (seq_len // BLOCK_N) * BLOCK_N
            hi = seq_len
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, svs, m_ok, SEG, seg_row, offs_m, offs_d, d_ok,
                       m_ok, 0, split, seq_len, qk_scale, False, CAUSAL, False, DOT_PREC, DOT_F32, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, svs, m_ok, SEG, seg_row, offs_m, offs_d, d_ok,
                       m_ok, split, hi, seq_len, qk_scale, True, CAUSAL, False, DOT_PREC, DOT_F32, BLOCK_N)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m.to(tl.int64)[:, None] * sdqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty),
             mask=q_mask)


# ---------------------------------------------------------------------------------------------- launchers
def segment_bounds(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the first and last index (int32 ``[b, s]``) in its row holding the same segment id.

    Any ids work (runs need not be contiguous); computed with a stable sort on device, no host sync. Kernels use
    them to skip key (query) blocks that share no segment with a query (key) block.
    """
    b, s = segment_ids.shape
    ids, perm = torch.sort(segment_ids, dim=1, stable=True)
    pos = torch.arange(s, device=segment_ids.device).expand(b, s)
    new = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group_start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    end[:, :-1] = new[:, 1:]
    group_end = torch.where(end, pos, torch.full_like(pos, s)).flip(1).cummin(dim=1).values.flip(1)
    first_sorted = perm.gather(1, group_start)
    last_sorted = perm.gather(1, group_end)
    first = torch.empty_like(perm).scatter_(1, perm, first_sorted)
    last = torch.empty_like(perm).scatter_(1, perm, last_sorted)
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous()


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_f32(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _choose_kv_splits(programs: int, group: int, device: torch.device) -> int:
    """How many programs share one K/V block's query heads in the dK/dV kernel (a divisor of ``group``).

    1 (the whole group summed in registers, written once) unless there are too few programs to fill the GPU —
    MQA with a small batch, e.g. b=1, 1 K/V head, s=2048 gives 32 programs on 132 SMs; then the group is cut
    into slices summed into an fp32 ``[splits, b, hkv, s, d]`` buffer and reduced with one torch sum.
    ``programs`` is the count at split 1 (for a 64-key block).
    """
    if device.type != "cuda" or group == 1:
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, -(-target // max(programs, 1)))
    return max(s for s in range(1, group + 1) if group % s == 0 and s <= want)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _seg_args(segment_ids: torch.Tensor | None, like: torch.Tensor):
    if segment_ids is None:
        dummy = torch.empty(1, dtype=torch.int32, device=like.device)
        return dummy, dummy, dummy
    seg = segment_ids.to(device=like.device, dtype=torch.int32).contiguous()
    first, last = segment_bounds(seg)
    return seg, first, last


def _forward(q, k, v, causal: bool, scale: float, seg, first, last, has_seg: bool):
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    o = torch.empty(b, hq, s, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(s, meta["BLOCK_M"]), b * hq)

    _fwd_kernel[grid](q, k, v, o, lse, seg, first, last,
                      *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                      s, hq, hq // hkv, scale * _LOG2E,
                      HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, HAS_SEG=has_seg,
                      DOT_PREC=_dot_precision(q.dtype), DOT_F32=_dot_f32(q.dtype))
    return o, lse


def _backward(do, q, k, v, o, lse, causal: bool, scale: float, seg, first, last, has_seg: bool):
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    do = _last_dim_contiguous(do)
    delta = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
    block_m = 32 if _INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(s, block_m), b * hq)](o, do, delta, *o.stride()[:3], *do.stride()[:3], s, hq,
                                                         HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=block_m)
    dq = torch.empty(b, hq, s, d, dtype=q.dtype, device=q.device)
    group = hq // hkv
    splits = _choose_kv_splits(b * hkv * triton.cdiv(s, 64), group, q.device)
    if splits == 1:  # each program sums its whole group: write dK/dV directly
        dk = torch.empty(b, hkv, s, d, dtype=k.dtype, device=k.device)
        dv = torch.empty(b, hkv, s, d, dtype=v.dtype, device=v.device)
        dk_buf, dv_buf = dk.unsqueeze(0), dv.unsqueeze(0)
    else:  # `splits` programs per K/V block, each summing group/splits heads into an fp32 slice; summed below
        dk_buf = torch.empty(splits, b, hkv, s, d, dtype=torch.float32, device=k.device)
        dv_buf = torch.empty(splits, b, hkv, s, d, dtype=torch.float32, device=v.device)
    common = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, HAS_SEG=has_seg,
                  DOT_PREC=_dot_precision(q.dtype), DOT_F32=_dot_f32(q.dtype))
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(s, meta["BLOCK_N"]), b * hkv * splits)](
        q, k, v, do, lse, delta, dk_buf, dv_buf, seg, first, last,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk_buf.stride()[1:4],
        *dv_buf.stride()[1:4], dk_buf.stride(0), dv_buf.stride(0),
        s, hq, hkv, group, splits, group // splits, scale * _LOG2E, scale, **common)
    if splits > 1:
        dk, dv = dk_buf.sum(0).to(k.dtype), dv_buf.sum(0).to(v.dtype)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * hq)](
        q, k, v, do, lse, delta, dq, seg, first, last,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        s, hq, hq // hkv, scale * _LOG2E, scale, **common)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the fp32 logsumexp; the backward recomputes P from them."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, segment_ids):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        seg, first, last = _seg_args(segment_ids, q)
        has_seg = segment_ids is not None
        o, lse = _forward(q, k, v, causal, scale, seg, first, last, has_seg)
        ctx.save_for_backward(q, k, v, o, lse, seg, first, last)
        ctx.causal, ctx.scale, ctx.has_seg = causal, scale, has_seg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seg, first, last = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, seg, first, last, ctx.has_seg)
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    segment_ids: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Triton flash attention ``[b, hq, s, d]`` (see the module docstring); inputs must pass :func:`supports`."""
    if not supports(q, k, v, segment_ids=segment_ids):
        raise ValueError(f"megaocto/kernels/flash_attention.py: unsupported input q {tuple(q.shape)} {q.dtype} on "
                         f"{q.device} (needs CUDA or TRITON_INTERPRET=1 on CPU, fp16/bf16/fp32, "
                         f"head_dim <= {MAX_HEAD_DIM}, matching dtypes/devices, k/v as long as q)")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, causal, float(scale), segment_ids)


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 ``[total]`` ids 1, 2, ... of the sequences delimited by ``cu_seqlens`` (``[n + 1]``, starts at 0, ends
    at ``total``); computed on device without a host sync."""
    bumps = torch.zeros(total, dtype=torch.int32, device=cu_seqlens.device)
    inner = cu_seqlens[1:-1].long()
    bumps.index_add_(0, inner[inner < total], torch.ones_like(inner[inner < total], dtype=torch.int32))
    return bumps.cumsum(0, dtype=torch.int32) + 1


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                           causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """flash-attn's varlen layout: q ``[total, hq, d]``, k/v ``[total, hkv, d]``, sequences laid end to end at
    offsets ``cu_seqlens`` (int ``[n + 1]``). Returns ``[total, hq, d]``.

    Runs :func:`flash_attention` on one row with segment ids derived from ``cu_seqlens`` (strided views, no copy
    of q/k/v); each token attends only within its own sequence.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0]:
        raise ValueError(f"flash_attention_varlen expects q [total, hq, d] and k, v [total, hkv, d]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    seg = segment_ids_from_cu_seqlens(cu_seqlens.to(q.device), q.shape[0]).unsqueeze(0)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = flash_attention(q4, k4, v4, causal=causal, segment_ids=seg, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        segment_ids: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Plain-torch reference: the ``sdpa`` backend of :mod:`megaocto.kernels.attention`."""
    return _attention(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale, backend="sdpa")


# ---------------------------------------------------------------------------------------------- registration
def _device_ok(t: torch.Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and interpreter_enabled())


def supports(q, k, v, *, segment_ids=None, dropout_p: float = 0.0) -> bool:
    """True when the Triton kernel handles these inputs (no dropout, head_dim <= 128, fp16/bf16/fp32, CUDA or
    interpreter, one dtype and device for q, k, v, as many keys as queries)."""
    return (dropout_p == 0.0 and q.dim() == 4 and q.shape[-1] <= MAX_HEAD_DIM and q.shape[2] == k.shape[2]
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and k.dtype == q.dtype and v.dtype == q.dtype
            and _device_ok(q) and k.device == q.device and v.device == q.device)


def fallback_backend(q, k, v, *, segment_ids=None, dropout_p: float = 0.0) -> str | None:
    """The backend the ``triton`` backend hands a call it cannot run itself, or None when the kernel runs it.

    The one rule for attention under ``model.kernels: triton``: attention dropout (``dropout_p > 0``, training)
    goes to ``triton_softmax`` (unfused: torch matmuls + the Triton scaled masked softmax + torch dropout on the
    probabilities) when that backend takes the inputs; anything else :func:`supports` rejects (head_dim > 128,
    other dtypes, CPU without the interpreter) goes to ``sdpa``.
    """
    if supports(q, k, v, segment_ids=segment_ids, dropout_p=dropout_p):
        return None
    if dropout_p > 0.0 and _softmax.supports(q, k, v, segment_ids=segment_ids, dropout_p=dropout_p):
        return "triton_softmax"
    return "sdpa"


def _triton_backend(q, k, v, *, causal, segment_ids, dropout_p, scale):
    """Backend fn: the Triton kernel when :func:`supports` accepts, else :func:`fallback_backend`'s choice."""
    other = fallback_backend(q, k, v, segment_ids=segment_ids, dropout_p=dropout_p)
    if other is not None:
        return _attention(q, k, v, causal=causal, segment_ids=segment_ids, dropout_p=dropout_p, scale=scale,
                          backend=other)
    return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale)


register_backend("triton", _triton_backend, supports, priority=-10)
# kernels: triton -> KernelOps.attention_backend == "triton" (the registry sets None when flash-attn is importable).
register("attention_backend", "triton", "triton")

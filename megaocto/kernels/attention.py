"""Core attention: the one seam where fused kernels plug in.

``attention(q, k, v, *, causal=True, segment_ids=None, dropout_p=0.0, scale=None)`` takes
q ``[b, hq, s, d]`` and k, v ``[b, hkv, s, d]`` with ``hq % hkv == 0`` (multi-query / grouped K/V: query head
``i`` reads K/V head ``i // (hq // hkv)``) and returns ``[b, hq, s, d]``.

``segment_ids`` ``[b, s]`` marks packed samples (1, 2, ... per sample, 0 = padding): a token attends only to
earlier tokens of its own segment (block-diagonal causal). Padding tokens attend to padding, so no softmax row is
empty and nothing becomes NaN.

Backends are tried in priority order; the first whose ``supports(...)`` accepts the call runs it:

* ``flash`` — flash-attn 2 (``flash_attn_func``, or ``flash_attn_varlen_func`` for packed rows), only when the
  package imports and the tensors are fp16/bf16 on CUDA; imported lazily.
* ``sdpa`` — ``torch.nn.functional.scaled_dot_product_attention`` (always available, the reference).

``register_backend(name, fn, supports, priority)`` adds a kernel (e.g. from ``megaocto.kernels``);
``attention(..., backend="sdpa")`` forces one.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Backend:
    name: str
    fn: Callable  # fn(q, k, v, *, causal, segment_ids, dropout_p, scale) -> [b, hq, s, d]
    supports: Callable  # supports(q, k, v, *, segment_ids, dropout_p) -> bool
    priority: int


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable, supports: Callable, priority: int = 0) -> None:
    """Register (or replace) a core-attention implementation; higher ``priority`` is tried first."""
    _BACKENDS[name] = Backend(name, fn, supports, priority)


def backends() -> list[str]:
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def select_backend(q, k, v, *, segment_ids=None, dropout_p=0.0) -> str:
    """Name of the backend ``attention`` would use for these inputs."""
    for name in backends():
        if _BACKENDS[name].supports(q, k, v, segment_ids=segment_ids, dropout_p=dropout_p):
            return name
    raise RuntimeError(f"no attention backend supports these inputs (registered: {backends()})")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              segment_ids: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention ``[b, hq, s, d]`` (see module doc for shapes, packing and backends)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q [b, hq, s, d] and k, v [b, hkv, s, d]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of K/V heads ({k.shape[1]})")
    if segment_ids is not None and tuple(segment_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"segment_ids must be [b, s] = {(q.shape[0], q.shape[2])}, got {tuple(segment_ids.shape)}")
    name = backend or select_backend(q, k, v, segment_ids=segment_ids, dropout_p=dropout_p)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {backends()}")
    return _BACKENDS[name].fn(q, k, v, causal=causal, segment_ids=segment_ids, dropout_p=dropout_p, scale=scale)


# ---------------------------------------------------------------------------------------------- masks
def segment_mask(segment_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Boolean ``[b, 1, s, s]`` mask (True = may attend): same segment, and key <= query when causal."""
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if causal:
        s = segment_ids.shape[1]
        same = same & torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return same


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths (int32) of the runs of equal segment id in each row, rows laid end to end.

    Each maximal run (padding runs included) becomes one sequence, which is what varlen kernels need.
    Returns ``(cu_seqlens [n_runs + 1], max_seqlen)``.
    """
    b, s = segment_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    flat = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    cu = torch.cat([flat, torch.tensor([b * s], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


# ---------------------------------------------------------------------------------------------- sdpa
def _sdpa(q, k, v, *, causal, segment_ids, dropout_p, scale):
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # explicit expand keeps every kernel path (masks, dropout, old torch) available
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    mask = segment_mask(segment_ids, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


register_backend("sdpa", _sdpa, lambda q, k, v, **_: True, priority=0)


# ---------------------------------------------------------------------------------------------- flash-attn
_flash_module = None


def _flash():
    """flash_attn module or None (imported once, lazily)."""
    global _flash_module
    if _flash_module is None:
        try:
            _flash_module = importlib.import_module("flash_attn")
        except Exception:  # not installed, or built for another torch/CUDA
            _flash_module = False
    return _flash_module or None


def _flash_supports(q, k, v, *, segment_ids=None, dropout_p=0.0):
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and _flash() is not None)


def _flash_attention(q, k, v, *, causal, segment_ids, dropout_p, scale):
    fa = _flash()
    b, hq, s, d = q.shape
    # flash-attn wants [b, s, h, d] and handles hq != hkv (MQA/GQA) natively.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if segment_ids is None:
        out = fa.flash_attn_func(qt, kt, vt, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    cu, max_len = cu_seqlens_from_segments(segment_ids)
    flat = [t.reshape(b * s, t.shape[2], d) for t in (qt, kt, vt)]
    out = fa.flash_attn_varlen_func(flat[0], flat[1], flat[2], cu, cu, max_len, max_len, dropout_p=dropout_p,
                                    softmax_scale=scale, causal=causal)
    return out.reshape(b, s, hq, d).transpose(1, 2)


register_backend("flash", _flash_attention, _flash_supports, priority=10)

"""Optional prebuilt CUDA kernels: ``megaocto._cuda_kernels`` (csrc/*.cu + csrc/cuda_kernels_binding.cpp).

The extension is built by setup.py at install time only (a CUDA torch and nvcc, or ``MEGAOCTO_BUILD_CUDA=1``;
see setup.py). This module never compiles anything: :func:`load` imports the prebuilt module or returns None.

Functions (CUDA tensors, contiguous, fp32/fp16/bf16; fp32 math; run on the tensors' device and its current
stream); each raises RuntimeError when the extension is not built:

- ``bias_gelu(x [..., n], bias [n] | None)`` -> tanh-GELU of ``x + bias`` (autograd: dx and dbias);
- ``scaled_masked_softmax(x [b, h, sq, sk], mask [b | 1, 1, sq, sk] bool | None, scale, causal=False)`` ->
  ``softmax(scale·x)`` over the unmasked columns (mask True = masked out; causal masks ``j > i``, top-left
  aligned like SDPA's ``is_causal`` and the Triton softmax); fully masked rows give zeros (autograd: dx).
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

_MODULE_NAME = "megaocto._cuda_kernels"
_cache: dict[str, ModuleType | None] = {}


def load() -> ModuleType | None:
    """The prebuilt ``megaocto._cuda_kernels`` module, or None when it was not built (cached)."""
    if _MODULE_NAME not in _cache:
        try:
            _cache[_MODULE_NAME] = importlib.import_module(_MODULE_NAME)
        except ImportError:  # not built, or built against a CUDA runtime this machine lacks
            _cache[_MODULE_NAME] = None
    return _cache[_MODULE_NAME]


def available() -> bool:
    """True when the extension is built and importable (says nothing about a GPU being present)."""
    return load() is not None


def _ext() -> ModuleType:
    ext = load()
    if ext is None:
        raise RuntimeError(f"{_MODULE_NAME} is not built: reinstall with a CUDA torch and nvcc present, or "
                           f"MEGAOCTO_BUILD_CUDA=1 pip install --no-build-isolation -e . (see setup.py)")
    return ext


def _check_cuda(op: str, x: torch.Tensor) -> None:
    _ext()
    if not x.is_cuda:
        raise ValueError(f"megaocto.kernels.cuda.{op} takes CUDA tensors (got {x.device}); use the torch or "
                         f"Triton kernels (megaocto.kernels.registry) elsewhere")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        with torch.cuda.device(x.device):
            y = _ext().bias_gelu_fwd(x, bias, _stream(x))
        ctx.save_for_backward(x, bias)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        with torch.cuda.device(x.device):
            dx = _ext().bias_gelu_bwd(dy.contiguous(), x, bias if ctx.has_bias else None, _stream(x))
        dbias = dx.reshape(-1, dx.shape[-1]).float().sum(0).to(dx.dtype) if ctx.has_bias else None
        return dx, dbias


class _ScaledMaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale, causal):
        with torch.cuda.device(x.device):
            y = _ext().scaled_masked_softmax_fwd(x, mask, scale, causal, _stream(x))
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        with torch.cuda.device(y.device):
            dx = _ext().scaled_masked_softmax_bwd(dy.contiguous(), y, ctx.scale, _stream(y))
        return dx, None, None, None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """tanh-GELU of ``x + bias`` with the CUDA kernel (see the module docstring)."""
    _check_cuda("bias_gelu", x)
    return _BiasGelu.apply(x.contiguous(), None if bias is None else bias.contiguous())


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool = False
                          ) -> torch.Tensor:
    """``softmax(scale·x)`` over unmasked columns with the CUDA kernel (see the module docstring)."""
    _check_cuda("scaled_masked_softmax", x)
    return _ScaledMaskedSoftmax.apply(x.contiguous(), None if mask is None else mask.contiguous(), float(scale),
                                      bool(causal))

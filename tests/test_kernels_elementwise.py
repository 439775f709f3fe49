"""Triton LayerNorm, RMSNorm, bias+GELU, SwiGLU and rotary kernels vs their plain-torch references, forward and
backward, fp32 and bf16, under the Triton interpreter (TRITON_INTERPRET=1 from conftest.py); plus the registry's
dispatch rules.

Shapes are odd on purpose: hidden 96 / 100, row counts that are not a multiple of the row block (several programs
with a ragged last one), more than 4096 columns (two column blocks), head_dim 24 with 12 rotated dims, strided
rotary inputs. bf16 kernels are compared with the reference evaluated in fp32 on the same (bf16-valued) inputs.
Debug one kernel with e.g. ``pytest -q tests/test_kernels_elementwise.py -k rms``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaocto.config.base import ConfigError
from megaocto.config.model import ModelConfig
from megaocto.kernels import registry
from megaocto.kernels.bias_gelu import reference_bias_gelu, triton_bias_gelu
from megaocto.kernels.layer_norm import reference_layer_norm, triton_layer_norm
from megaocto.kernels.rms_norm import reference_rms_norm, triton_rms_norm
from megaocto.kernels.rotary import reference_rotary, triton_rotary
from megaocto.kernels.swiglu import reference_swiglu, triton_swiglu

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _compare(kernel, reference, inputs, dtype, *, grad_tol=None, **kw):
    """Run ``kernel`` on ``inputs`` (in ``dtype``) and ``reference`` on fp32 copies; compare outputs and grads."""
    mine = [_leaf(t) for t in inputs]
    ref = [_leaf(t, torch.float32) for t in inputs]
    y = kernel(*mine, **kw)
    r = reference(*ref, **kw)
    assert y.dtype == dtype and y.shape == r.shape
    torch.testing.assert_close(y.float(), r, **TOL[dtype])
    g = torch.randn(r.shape, generator=torch.Generator().manual_seed(7)).to(dtype).float()  # same values both sides
    y.backward(g.to(dtype))
    r.backward(g)
    for i, (a, b) in enumerate(zip(mine, ref)):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == a.dtype, f"input {i}"
        torch.testing.assert_close(a.grad.float(), b.grad, **(grad_tol or TOL[dtype]), msg=lambda m: f"grad {i}: {m}")


def _randn(*shape, dtype, seed=0, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift).to(dtype)


# ------------------------------------------------------------------------------------------------ norms
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 75, 96), (3, 7, 100)])
def test_layer_norm(dtype, shape):
    n = shape[-1]
    x = _randn(*shape, dtype=dtype, scale=2.0, shift=0.5)
    w, b = _randn(n, dtype=dtype, seed=1, scale=0.5, shift=1.0), _randn(n, dtype=dtype, seed=2)
    # dweight/dbias sum 150 rows: bf16 rounding of the sum dominates
    _compare(triton_layer_norm, reference_layer_norm, [x, w, b], dtype, eps=1e-5,
             grad_tol=dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else None)


def test_layer_norm_without_affine_and_mixed_dtypes():
    x = _randn(5, 33, dtype=torch.bfloat16)
    _compare(triton_layer_norm, reference_layer_norm, [x, None, None], torch.bfloat16, eps=1e-6)
    # bf16 activations with fp32 parameters: grads come back in each input's dtype
    xw = _leaf(x)
    w, b = _leaf(_randn(33, dtype=torch.float32, seed=3)), _leaf(_randn(33, dtype=torch.float32, seed=4))
    y = triton_layer_norm(xw, w, b, 1e-5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert (xw.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    torch.testing.assert_close(b.grad, torch.full((33,), 5.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 75, 96), (3, 7, 100)])
def test_rms_norm(dtype, shape):
    x = _randn(*shape, dtype=dtype, scale=2.0)
    w = _randn(shape[-1], dtype=dtype, seed=1, scale=0.5, shift=1.0)
    _compare(triton_rms_norm, reference_rms_norm, [x, w], dtype, eps=1e-5,
             grad_tol=dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else None)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_weight_grads_are_partial_sums_over_rows(kind):
    """Sequence parallelism: each rank's dweight covers its own rows; the shards' sum is the full dweight."""
    x = _randn(4, 30, 96, dtype=torch.float32)
    w = _randn(96, dtype=torch.float32, seed=1, shift=1.0)
    b = _randn(96, dtype=torch.float32, seed=2)
    g = _randn(4, 30, 96, dtype=torch.float32, seed=3)

    def grads(rows):
        ww, bb = _leaf(w), _leaf(b)
        y = triton_layer_norm(x[:, rows], ww, bb, 1e-5) if kind == "layer" else triton_rms_norm(x[:, rows], ww, 1e-5)
        y.backward(g[:, rows])
        return ww.grad
    full = grads(slice(0, 30))
    shards = grads(slice(0, 15)) + grads(slice(15, 30))
    torch.testing.assert_close(shards, full, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ activations
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,with_bias", [((3, 50, 100), True), ((3, 50, 100), False), ((2, 4100), True)])
def test_bias_gelu(dtype, shape, with_bias):
    x = _randn(*shape, dtype=dtype, scale=2.0)
    b = _randn(shape[-1], dtype=dtype, seed=1) if with_bias else None
    _compare(triton_bias_gelu, reference_bias_gelu, [x, b], dtype,
             grad_tol=dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 50, 2 * 100), (2, 2 * 4100)])
def test_swiglu(dtype, shape):
    x = _randn(*shape, dtype=dtype, scale=2.0)
    _compare(triton_swiglu, reference_swiglu, [x], dtype)


# ------------------------------------------------------------------------------------------------ strided inputs
_A, _B, _N = 3, 10, 96
_VIEWS = {  # name: (shape of the contiguous leaf, the non-contiguous [_A, _B, _N] view the kernel gets)
    "column-slice": ((_A, _B, _N + 7), lambda t: t[..., 3:3 + _N]),  # rows further apart than their width
    "transposed": ((_B, _A, _N), lambda t: t.transpose(0, 1)),  # rows not in memory order
    "row-step": ((_A, 2 * _B, _N), lambda t: t[:, ::2]),  # every other row
    "strided-last-dim": ((_A, _B, _N, 2), lambda t: t[..., 0]),  # last-dim stride 2
}
_OPS = {  # op: (kernel, reference, keyword args, parameter names)
    "layer_norm": (triton_layer_norm, reference_layer_norm, dict(eps=1e-5), ("w", "b")),
    "rms_norm": (triton_rms_norm, reference_rms_norm, dict(eps=1e-5), ("w",)),
    "bias_gelu": (triton_bias_gelu, reference_bias_gelu, {}, ("b",)),
    "swiglu": (triton_swiglu, reference_swiglu, {}, ()),
}


@pytest.mark.parametrize("op", sorted(_OPS))
@pytest.mark.parametrize("view", sorted(_VIEWS))
def test_non_contiguous_inputs(op, view):
    """Views (a column slice of a wider buffer, a transpose, a row step, a strided last dim) give the reference's
    output and gradients; the input gradient reaches the viewed buffer."""
    kernel, reference, kw, param_names = _OPS[op]
    base_shape, make_view = _VIEWS[view]
    base = _randn(*base_shape, dtype=torch.float32, scale=2.0, shift=0.3)
    params = [_randn(_N, dtype=torch.float32, seed=1 + i, scale=0.5, shift=1.0) for i, _ in enumerate(param_names)]
    mine, ref = [_leaf(base)] + [_leaf(p) for p in params], [_leaf(base)] + [_leaf(p) for p in params]
    x = make_view(mine[0])
    assert not x.is_contiguous()
    y = kernel(x, *mine[1:], **kw)
    r = reference(make_view(ref[0]).contiguous(), *ref[1:], **kw)
    torch.testing.assert_close(y, r, **TOL[torch.float32])
    g = _randn(*r.shape, dtype=torch.float32, seed=9)
    y.backward(g)
    r.backward(g)
    for i, (a, b) in enumerate(zip(mine, ref)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {i}: {m}")


def test_swiglu_rejects_odd_width():
    with pytest.raises(ValueError, match=r"\[gate \| up\]"):
        triton_swiglu(torch.randn(2, 7))


# ------------------------------------------------------------------------------------------------ rotary
def _rotary_inputs(dtype, *, b=2, h=3, s=37, d=24, rot=12, cos_batch=True):
    """A strided q view [b, h, s, d] (from a fused projection, as in glm2) and fp32 cos/sin [b or 1, 1, s, rot/2]."""
    qkv = _randn(b, s, 3 * h * d, dtype=dtype)
    x = qkv[..., : h * d].view(b, s, h, d).transpose(1, 2)
    pos = torch.arange(s, dtype=torch.float32) + torch.arange(b, dtype=torch.float32)[:, None] * 5
    inv = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    ang = (pos[..., None] * inv)[:, None]  # [b, 1, s, rot/2]
    if not cos_batch:
        ang = ang[:1]
    return x, ang.cos(), ang.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rot", [12, 24])
def test_rotary(dtype, interleaved, rot):
    x, cos, sin = _rotary_inputs(dtype, rot=rot)
    xs = _leaf(x)
    y = triton_rotary(xs, cos, sin, interleaved=interleaved)
    xr = _leaf(x, torch.float32)
    r = reference_rotary(xr, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(y.float(), r, **TOL[dtype])
    if rot < 24:  # partial rotary: the tail passes through bit for bit
        assert torch.equal(y[..., rot:], x[..., rot:])
    g = _randn(*r.shape, dtype=dtype, seed=5).float()
    y.backward(g.to(dtype))
    r.backward(g)
    torch.testing.assert_close(xs.grad.float(), xr.grad, **TOL[dtype])


def test_rotary_broadcast_cos_and_inverse():
    """cos/sin shared over the batch ([1, 1, s, r]); rotating back by the opposite angle restores x."""
    from megaocto.kernels.rotary import rotary_apply

    x, cos, sin = _rotary_inputs(torch.float32, cos_batch=False)
    for interleaved in (True, False):
        y = triton_rotary(x, cos, sin, interleaved=interleaved)
        torch.testing.assert_close(y, reference_rotary(x, cos, sin, interleaved=interleaved), atol=1e-6, rtol=1e-6)
        back = rotary_apply(y, cos, sin, interleaved=interleaved, inverse=True)
        torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"2·r <= head_dim"):
        triton_rotary(x, torch.ones(2, 1, 37, 13), torch.ones(2, 1, 37, 13), interleaved=True)


@pytest.mark.parametrize("interleaved", [True, False])
def test_registry_torch_rotary_matches_reference_and_glm(interleaved):
    """The registry's torch op (what kernels=torch runs) agrees with the complex-number reference; the rotated
    part keeps x's dtype and the tail passes through bit for bit."""
    x, cos, sin = _rotary_inputs(torch.float32)
    y = registry.torch_rotary(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(y, reference_rotary(x, cos, sin, interleaved=interleaved), atol=1e-6, rtol=1e-6)
    rot = 2 * cos.shape[-1]
    assert y.dtype == x.dtype and torch.equal(y[..., rot:], x[..., rot:])


def test_registry_torch_ops_match_references():
    x = _randn(3, 5, 96, dtype=torch.float32)
    w, b = _randn(96, dtype=torch.float32, seed=1), _randn(96, dtype=torch.float32, seed=2)
    torch.testing.assert_close(registry.torch_layer_norm(x, w, b, 1e-5), reference_layer_norm(x, w, b, 1e-5))
    torch.testing.assert_close(registry.torch_rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5))
    torch.testing.assert_close(registry.torch_bias_gelu(x, b), reference_bias_gelu(x, b))
    torch.testing.assert_close(registry.torch_swiglu(x), reference_swiglu(x))


# ------------------------------------------------------------------------------------------------ registry
def test_resolve_rules(monkeypatch):
    assert registry.resolve("torch", "cpu") == "torch"
    assert registry.resolve("auto", "cpu") == "torch"
    assert registry.resolve("auto", None) == "torch"
    assert registry.resolve("triton", "cpu") == "triton"  # the interpreter is on (conftest)
    assert registry.resolve("auto", "cuda") == "triton"  # triton is installed
    with pytest.raises(ConfigError, match=r"model.kernels must be one of"):
        registry.resolve("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match=r"model.kernels=triton .*TRITON_INTERPRET=1"):
        registry.resolve("triton", "cpu")
    assert registry.resolve("triton", "cuda") == "triton"
    # a Triton kernel handed CPU tensors without the interpreter says what to do instead of a driver error
    with pytest.raises(RuntimeError, match=r"model.kernels=torch"):
        triton_rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)
    monkeypatch.setattr(registry, "triton_available", lambda: False)
    assert registry.resolve("auto", "cuda") == "torch"
    with pytest.raises(ConfigError, match=r"needs the triton package"):
        registry.resolve("triton", "cuda")


def test_broken_triton_module_raises_instead_of_falling_back(monkeypatch):
    """A Triton kernel module that fails to import is an error at ops_for, never a silent torch fallback."""
    monkeypatch.setattr(registry, "TRITON_MODULES", registry.TRITON_MODULES + ("no_such_kernel",))
    monkeypatch.setattr(registry, "_triton_loaded", False)
    monkeypatch.setattr(registry, "_ops_cache", {})
    with pytest.raises(ModuleNotFoundError, match=r"megaocto.kernels.no_such_kernel"):
        registry.ops_for("triton", "cpu")


def test_model_config_validates_kernels():
    assert ModelConfig().kernels == "auto"
    with pytest.raises(ConfigError, match=r"model.kernels"):
        ModelConfig(kernels="fast").validate()


def test_ops_for_triton_registers_every_elementwise_kernel(monkeypatch):
    ops = registry.ops_for("triton", "cpu")
    assert ops.impl == "triton" and ops.fuse_bias
    for op in ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "rotary"):
        assert ops.impls[op] == "triton", op
    assert ops.rms_norm is triton_rms_norm and registry.get("rms_norm", "triton") is triton_rms_norm
    torch_ops = registry.ops_for("auto", "cpu")
    assert torch_ops.impl == "torch" and not torch_ops.fuse_bias and torch_ops.attention_backend is None
    assert set(torch_ops.impls.values()) == {"torch"} and torch_ops.layer_norm is registry.torch_layer_norm
    # the flash-attn rule: on CUDA with flash_attn importable, attention.py picks (flash-attn wins)
    monkeypatch.setattr(registry, "_flash_attn_importable", lambda: True)
    assert registry.ops_for("triton", "cuda").attention_backend is None
    monkeypatch.setattr(registry, "_flash_attn_importable", lambda: False)
    cuda_ops = registry.ops_for("triton", "cuda")
    assert cuda_ops.attention_backend == "triton" and cuda_ops.impls["attention_backend"] == "triton"
    assert set(cuda_ops.impls.values()) == {"triton"}
    with pytest.raises(ValueError, match=r"unknown kernel op"):
        registry.register("gelu", "triton", F.gelu)
    with pytest.raises(KeyError, match=r"no 'cuda' implementation of kernel op 'rotary'"):
        registry.get("rotary", "cuda")

"""Triton flash attention and scaled masked softmax (megaocto/kernels/{flash_attention,softmax}.py) under the
Triton interpreter (TRITON_INTERPRET=1, tests/conftest.py): forward and dQ/dK/dV against the ``sdpa`` backend,
fp32 and bf16, causal and not, MHA/GQA/MQA, packed segments with padding, odd sequence lengths and head dims."""
import pytest
import torch

from megaocto.kernels import flash_attention as fa
from megaocto.kernels import softmax as sm
from megaocto.kernels.attention import attention, segment_mask, select_backend


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |actual - expected| <= rel * max(1, max |expected|) (scale-aware for gradients of any size)."""
    bound = rel * max(1.0, expected.abs().max().item())
    err = _max_err(actual, expected)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _segments(b: int, s: int) -> torch.Tensor:
    """Row 0: three samples then padding; last row: one sample then padding (segment 0 = padding)."""
    seg = torch.zeros(b, s, dtype=torch.long)
    seg[0, : s // 3] = 1
    seg[0, s // 3: s - 6] = 2
    seg[0, s - 6: s - 2] = 3
    seg[-1, : s - 9] = 1
    return seg


def _qkv(b, hq, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v


def _fwd_bwd(backend, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = attention(q, k, v, backend=backend, **kw)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o, dq, dk, dv


CASES = [  # (b, hq, hkv, s, d, causal, packed, dtype)
    pytest.param(2, 2, 2, 37, 16, True, False, torch.float32, id="mha-causal-s37-fp32"),
    pytest.param(1, 2, 2, 70, 32, False, False, torch.float32, id="mha-full-s70-fp32"),
    pytest.param(1, 4, 2, 70, 24, True, False, torch.float32, id="gqa-causal-d24-fp32"),
    pytest.param(1, 4, 1, 37, 16, False, False, torch.float32, id="mqa-full-fp32"),
    pytest.param(2, 4, 2, 70, 24, True, True, torch.float32, id="gqa-packed-causal-fp32"),
    pytest.param(2, 2, 1, 37, 16, False, True, torch.float32, id="mqa-packed-full-fp32"),
    pytest.param(1, 1, 1, 37, 80, True, False, torch.float32, id="d80-causal-fp32"),
    pytest.param(1, 4, 2, 70, 32, True, False, torch.bfloat16, id="gqa-causal-bf16"),
    pytest.param(2, 2, 2, 37, 16, True, True, torch.bfloat16, id="mha-packed-causal-bf16"),
    pytest.param(1, 2, 1, 37, 16, False, False, torch.bfloat16, id="mqa-full-bf16"),
]


@pytest.mark.parametrize("b,hq,hkv,s,d,causal,packed,dtype", CASES)
def test_flash_attention_matches_sdpa(b, hq, hkv, s, d, causal, packed, dtype):
    q, k, v = _qkv(b, hq, hkv, s, d, dtype)
    do = torch.randn(b, hq, s, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    seg = _segments(b, s) if packed else None
    scale = 0.3 if d == 24 else None  # an explicit scale once per dim family, default 1/sqrt(d) otherwise
    got = _fwd_bwd("triton", q, k, v, do, causal=causal, segment_ids=seg, scale=scale)
    # The reference is fp32 SDPA on the same (rounded) inputs; bf16 gets a bf16-sized tolerance.
    want = _fwd_bwd("sdpa", q.float(), k.float(), v.float(), do.float(), causal=causal, segment_ids=seg,
                    scale=scale)
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == e.shape
        _assert_close(a, e, rel, f"{name} ({dtype})")


@pytest.mark.parametrize("block_m,block_n", [(64, 32), (32, 64), (16, 64)], ids=["64x32", "32x64", "16x64"])
def test_flash_attention_gpu_block_shapes(monkeypatch, block_m, block_n):
    """GPU autotune configs have BLOCK_M != BLOCK_N (the interpreter's single config is 32x32): force such
    configs on the forward and both backward kernels; causal, packed causal and packed full, GQA and MQA, a
    sequence (75) that is a multiple of neither block."""
    import triton

    cfg = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)]
    for kern in (fa._fwd_kernel, fa._bwd_dkdv_kernel, fa._bwd_dq_kernel):
        monkeypatch.setattr(kern, "configs", cfg)
        monkeypatch.setattr(kern, "cache", {})
    s, d = 75, 16
    seg = torch.zeros(2, s, dtype=torch.long)
    seg[0, :20], seg[0, 20:21], seg[0, 21:70], seg[1, :50] = 1, 2, 3, 1
    for b, hq, hkv, causal, packed in ((1, 4, 2, True, False), (2, 4, 2, True, True), (2, 2, 1, False, True)):
        q, k, v = _qkv(b, hq, hkv, s, d, torch.float32, seed=b + hkv)
        do = torch.randn(b, hq, s, d, generator=torch.Generator().manual_seed(2))
        kw = dict(causal=causal, segment_ids=seg[:b] if packed else None)
        got = _fwd_bwd("triton", q, k, v, do, **kw)
        want = _fwd_bwd("sdpa", q, k, v, do, **kw)
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
            _assert_close(a, e, 1e-4, f"{name} {block_m}x{block_n} hq={hq} hkv={hkv} causal={causal} "
                                      f"packed={packed}")
    for kern in (fa._fwd_kernel, fa._bwd_dkdv_kernel, fa._bwd_dq_kernel):  # the forced config did run
        assert kern.best_config.kwargs == {"BLOCK_M": block_m, "BLOCK_N": block_n}


@pytest.mark.parametrize("hkv,splits,packed", [(1, 4, False), (2, 2, True)], ids=["mqa-split4", "gqa-split2-packed"])
def test_flash_attention_dkdv_group_split(monkeypatch, hkv, splits, packed):
    """The dK/dV kernel's group split (used on GPUs when MQA/GQA leaves too few programs) sums to the same grads."""
    monkeypatch.setattr(fa, "_choose_kv_splits", lambda programs, group, device: splits)
    b, hq, s, d = 2, 4, 37, 16
    q, k, v = _qkv(b, hq, hkv, s, d, torch.float32, seed=6)
    do = torch.randn(b, hq, s, d)
    seg = _segments(b, s) if packed else None
    got = _fwd_bwd("triton", q, k, v, do, causal=True, segment_ids=seg)
    want = _fwd_bwd("sdpa", q, k, v, do, causal=True, segment_ids=seg)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(a, e, 1e-4, f"{name} splits={splits}")


def test_flash_attention_strided_views_of_fused_qkv():
    """q, k, v as views of one fused projection (bigcode/GLM layout) run without copies and match sdpa."""
    b, s, h, d = 2, 37, 2, 16
    qkv = torch.randn(b, s, 3 * h * d)
    q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in qkv.split(h * d, dim=-1))
    assert not q.is_contiguous()
    do = torch.randn(b, h, s, d)
    got = _fwd_bwd("triton", q, k, v, do, causal=True)
    want = _fwd_bwd("sdpa", q, k, v, do, causal=True)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(a, e, 1e-4, name)


def test_flash_attention_segment_ids_compared_by_id_not_run():
    """Same semantics as segment_mask: a repeated id (padding in the middle and at the end) is one segment."""
    seg = torch.tensor([[1] * 10 + [0] * 5 + [2] * 12 + [0] * 5 + [1] * 5])  # s = 37
    q, k, v = _qkv(1, 2, 1, 37, 16, torch.float32, seed=3)
    do = torch.randn(1, 2, 37, 16)
    for causal in (True, False):
        got = _fwd_bwd("triton", q, k, v, do, causal=causal, segment_ids=seg)
        want = _fwd_bwd("sdpa", q, k, v, do, causal=causal, segment_ids=seg)
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
            _assert_close(a, e, 1e-4, f"{name} causal={causal}")


def test_flash_attention_varlen_cu_seqlens_matches_per_sequence_sdpa():
    """flash-attn's varlen layout: sequences of 20, 9 and 12 tokens end to end; MQA (hq=2, hkv=1)."""
    lens = [20, 9, 12]
    cu = torch.tensor([0, 20, 29, 41], dtype=torch.int32)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(41, h, 16, generator=g).requires_grad_() for h in (2, 1, 1))
    out = fa.flash_attention_varlen(q, k, v, cu, causal=True)
    do = torch.randn(41, 2, 16, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), do)
    outs, ref_grads = [], [torch.zeros_like(t) for t in (q, k, v)]
    for start, n in zip(cu[:-1].tolist(), lens):
        sl = [t[start:start + n].detach().transpose(0, 1).unsqueeze(0).requires_grad_() for t in (q, k, v)]
        o = attention(*sl, causal=True, backend="sdpa")
        gs = torch.autograd.grad(o, sl, do[start:start + n].transpose(0, 1).unsqueeze(0))
        outs.append(o.squeeze(0).transpose(0, 1))
        for acc, gr in zip(ref_grads, gs):
            acc[start:start + n] = gr.squeeze(0).transpose(0, 1)
    _assert_close(out, torch.cat(outs), 1e-4, "varlen out")
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(a, e, 1e-4, f"varlen {name}")


def test_segment_bounds_match_brute_force():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 0, 0, 0], [0, 1, 1, 0, 2, 2, 1]])
    first, last = fa.segment_bounds(seg)
    for r in range(seg.shape[0]):
        for i in range(seg.shape[1]):
            same = (seg[r] == seg[r, i]).nonzero().flatten()
            assert (first[r, i].item(), last[r, i].item()) == (same.min().item(), same.max().item())


def test_triton_backend_dispatch_rules():
    q, k, v = _qkv(1, 2, 2, 37, 16, torch.float32)
    # Never chosen automatically (priority below sdpa) ...
    assert select_backend(q, k, v) == "sdpa"
    assert fa.supports(q, k, v) and sm.supports(q, k, v)
    # ... dropout is not in the kernel: supports() says no, and a "triton" call with dropout runs the unfused
    # triton_softmax backend (Triton softmax + torch dropout on the probabilities), the same dropout mask.
    assert not fa.supports(q, k, v, dropout_p=0.1)
    assert fa.fallback_backend(q, k, v) is None
    assert fa.fallback_backend(q, k, v, dropout_p=0.1) == "triton_softmax"
    torch.manual_seed(7)
    got = attention(q, k, v, backend="triton", dropout_p=0.5)
    torch.manual_seed(7)
    want = attention(q, k, v, backend="triton_softmax", dropout_p=0.5)
    assert torch.equal(got, want)
    torch.manual_seed(7)
    assert not torch.equal(got, attention(q, k, v, backend="triton"))  # dropout did happen
    big = _qkv(1, 1, 1, 8, 160, torch.float32)
    assert not fa.supports(*big) and fa.fallback_backend(*big) == "sdpa"  # head_dim > 128
    assert fa.fallback_backend(*big, dropout_p=0.1) == "triton_softmax"  # the softmax takes any head dim
    q1 = q[:, :, :1]  # one query over 37 keys (a decode step): sdpa's job
    assert not fa.supports(q1, k, v) and not sm.supports(q1, k, v)
    with pytest.raises(ValueError, match="flash_attention.py"):
        fa.flash_attention(*_qkv(1, 1, 1, 8, 160, torch.float32))


def test_interpreter_switch_is_read_one_way(monkeypatch):
    """TRITON_INTERPRET means the same to the registry, both attention kernels' supports()/launch checks and
    Triton itself (its getenv_bool: 1/true/on/yes/y, any case); "0", "" or anything else is off."""
    from triton._C.libtriton import getenv_bool

    from megaocto.kernels import registry

    q, k, v = _qkv(1, 1, 1, 8, 16, torch.float32)
    for value in ("1", "true", "ON", "yes", "y", "0", "", "2", "false", "off"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        on = getenv_bool("TRITON_INTERPRET", False)
        assert registry.interpreter_enabled() == on, value
        assert fa.supports(q, k, v) == on and sm.supports(q, k, v) == on, value
        if not on:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                sm.scaled_masked_softmax(q)


def test_flash_attention_addresses_rows_past_int32():
    """Row offsets (row · row stride) past 2**31 elements: q and k rows 2**30 elements apart in one sparse 4 GiB
    fp16 buffer (only the touched pages become memory) give sdpa's output and grads (int32 offsets wrapped)."""
    s, d, stride = 3, 16, 2 ** 30
    try:
        buf = torch.zeros((s - 1) * stride + 2 * d, dtype=torch.float16)
    except RuntimeError as e:  # no address space for the sparse buffer
        pytest.skip(f"cannot allocate a 4 GiB sparse buffer: {e}")
    rows = torch.randn(3, s, d, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    for r in range(s):  # q row r at r·2**30, k row r right after it
        buf[r * stride: r * stride + d] = rows[0, r]
        buf[r * stride + d: r * stride + 2 * d] = rows[1, r]
    q = torch.as_strided(buf, (1, 1, s, d), (0, 0, stride, 1), 0).requires_grad_()
    k = torch.as_strided(buf, (1, 1, s, d), (0, 0, stride, 1), d).requires_grad_()
    v = rows[2].view(1, 1, s, d).clone().requires_grad_()
    do = torch.randn(1, 1, s, d, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    got = fa.flash_attention(q, k, v, causal=True)
    got_grads = torch.autograd.grad(got, (q, k, v), do)
    want = _fwd_bwd("sdpa", rows[0].float().view(1, 1, s, d), rows[1].float().view(1, 1, s, d),
                    rows[2].float().view(1, 1, s, d), do.float(), causal=True)
    for name, a, e in zip(("out", "dq", "dk", "dv"), (got, *got_grads), want):
        _assert_close(a, e, 2e-2, f"{name} (rows 2**30 elements apart)")


def test_registry_names_triton_attention_backend():
    from megaocto.kernels.registry import ops_for
    assert ops_for("triton", "cpu").attention_backend == "triton"
    assert ops_for("torch", "cpu").attention_backend is None


# ---------------------------------------------------------------------------------------------- softmax
SOFTMAX_CASES = [  # (shape, causal, packed, dtype, block_n)
    pytest.param((2, 3, 37, 37), True, False, torch.float32, None, id="causal-fp32"),
    pytest.param((2, 2, 37, 37), False, True, torch.float32, 16, id="packed-streamed-fp32"),
    pytest.param((2, 2, 70, 70), True, True, torch.bfloat16, 32, id="packed-causal-streamed-bf16"),
    pytest.param((2, 2, 37, 37), True, True, torch.bfloat16, None, id="packed-causal-bf16"),
    pytest.param((5, 131), False, False, torch.float32, None, id="plain-rows-131"),
    pytest.param((3, 37, 37), True, False, torch.float16, None, id="causal-fp16"),
]


@pytest.mark.parametrize("shape,causal,packed,dtype,block_n", SOFTMAX_CASES)
def test_scaled_masked_softmax_matches_torch(shape, causal, packed, dtype, block_n):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    seg = _segments(shape[0], shape[-1]) if packed else None
    xt, xr = x.clone().requires_grad_(), x.float().requires_grad_()
    y = sm.scaled_masked_softmax(xt, 0.7, causal=causal, segment_ids=seg, block_n=block_n)
    (dx,) = torch.autograd.grad(y, xt, dy)
    y_ref = sm.reference_scaled_masked_softmax(xr, 0.7, causal=causal, segment_ids=seg)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, dy.float())
    assert y.dtype == dtype and dx.dtype == dtype
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_close(y, y_ref, rel, "softmax")
    _assert_close(dx, dx_ref, rel, "softmax grad")
    if causal or packed:  # masked entries are exactly zero, rows sum to one
        keep = (segment_mask(seg, causal) if packed else torch.ones(shape[-2:], dtype=torch.bool).tril())
        assert (y.float().masked_fill(keep, 0) == 0).all()
    torch.testing.assert_close(y.float().sum(-1), torch.ones(shape[:-1]), atol=1e-2 if dtype != torch.float32
                               else 1e-5, rtol=0)


def test_unfused_triton_softmax_backend_matches_sdpa():
    b, hq, hkv, s, d = 2, 4, 2, 37, 24
    q, k, v = _qkv(b, hq, hkv, s, d, torch.float32, seed=5)
    do = torch.randn(b, hq, s, d)
    seg = _segments(b, s)
    got = _fwd_bwd("triton_softmax", q, k, v, do, causal=True, segment_ids=seg)
    want = _fwd_bwd("sdpa", q, k, v, do, causal=True, segment_ids=seg)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(a, e, 1e-4, name)


# ---------------------------------------------------------------------------------------------- benchmark script
def _bench_module():
    import importlib.util
    import pathlib
    import sys
    if "kernels_bench" in sys.modules:
        return sys.modules["kernels_bench"]
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "kernels_bench.py"
    spec = importlib.util.spec_from_file_location("kernels_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels_bench"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_kernels_bench_refuses_without_gpu_and_smoke_runs(monkeypatch, capsys):
    bench = _bench_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--all"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    # One kernel case of the per-kernel table, end to end on CPU (the full --cpu-smoke run takes ~1.5 min).
    assert bench.main(["--kernels", "--only", "softmax_causal", "--no-compile", "--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("softmax_causal")]
    assert {(line.split()[1], line.split()[2]) for line in lines} == {
        (m, i) for m in ("fwd", "fwd+bwd") for i in ("triton", "torch")}
    assert "FAILED" not in out


def test_attention_flops_convention():
    bench = _bench_module()
    fwd = 4 * 2 * 16 * 8192 ** 2 * 128
    assert bench.attention_flops(2, 16, 128, 8192 ** 2, False, "fwd") == fwd
    assert bench.attention_flops(2, 16, 128, 8192 ** 2, True, "fwd+bwd") == 3.5 * fwd / 2

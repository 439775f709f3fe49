"""Whole tiny models with ``model.kernels: triton`` (every Triton kernel, interpreted on CPU) match
``model.kernels: torch`` in loss and gradients — at tp=1 and at tp=2 with sequence parallelism (where the norms'
weight gradients are partial per rank and the existing ``sequence_parallel`` tags must still be honoured) — and
``kernels: torch`` keeps the unfused computation bit for bit.

Debug with ``pytest -q tests/test_kernels_model.py -k glm2``; KernelOps.impls says which implementation each op got.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from megaocto.config.base import ConfigError
from megaocto.config.model import ModelConfig
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext
from megaocto.parallel.cross_entropy import vocab_parallel_cross_entropy

B, S, V = 2, 16, 1000
FAMILIES = ["tiny-bigcode", "tiny-glm2"]


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[0, :3] = -100  # prompt tokens without loss
    seg = torch.tensor([[1] * 9 + [2] * 7, [1] * 16])  # one packed row
    return ids, seg, labels


def _build(name, kernels, pc, dtype=torch.float32, **over):
    cfg = ModelConfig.from_preset(name, kernels=kernels, **over)
    torch.manual_seed(1234)  # same seed -> same weights for every kernels setting and TP size
    return build_model(cfg, pc, dtype=dtype)


def _loss_and_grads(model, pc=None):
    ids, seg, labels = _batch()
    loss = model(ids, segment_ids=seg, labels=labels)
    loss.sum().backward()
    if pc is not None:
        from megaocto.parallel.grads import allreduce_sequence_parallel_grads
        allreduce_sequence_parallel_grads(model, pc)
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", FAMILIES)
def test_triton_model_matches_torch_fp32(name):
    pc = ParallelContext.single()
    ref, fused = _build(name, "torch", pc), _build(name, "triton", pc)
    assert fused.ops.impl == "triton" and ref.ops.impl == "torch"
    for op in ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "rotary"):
        assert fused.ops.impls[op] == "triton", op
    loss_r, grads_r = _loss_and_grads(ref)
    loss_f, grads_f = _loss_and_grads(fused)
    assert loss_f.dtype == torch.float32 and loss_f.shape == (B, S)
    assert torch.all(loss_f[0, :3] == 0)
    torch.testing.assert_close(loss_f, loss_r, atol=2e-5, rtol=1e-5)
    assert grads_f.keys() == grads_r.keys()
    for k in grads_r:
        torch.testing.assert_close(grads_f[k], grads_r[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} {k}: {m}")
    # without labels: the same logits as today
    ids, seg, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, segment_ids=seg), ref(ids, segment_ids=seg), atol=2e-5, rtol=1e-5)


def test_triton_model_matches_torch_bf16():
    """bf16 weights and activations (fp32 cos/sin, fp32 loss); one glm2 layer keeps the interpreter time down."""
    pc = ParallelContext.single()
    name = "tiny-glm2"
    ref = _build(name, "torch", pc, torch.bfloat16, num_layers=1)
    fused = _build(name, "triton", pc, torch.bfloat16, num_layers=1)
    loss_r, grads_r = _loss_and_grads(ref)
    loss_f, grads_f = _loss_and_grads(fused)
    torch.testing.assert_close(loss_f, loss_r, atol=5e-2, rtol=2e-2)
    for k in grads_r:  # bf16: compare each gradient's direction and size, not elementwise
        a, b = grads_f[k].float().flatten(), grads_r[k].float().flatten()
        assert F.cosine_similarity(a, b, dim=0) > 0.99, k
        assert abs(a.norm() / b.norm() - 1) < 0.05, k


def test_torch_kernels_keep_the_unfused_computation_bit_for_bit():
    """kernels=torch: MLPs and the loss head compute exactly what the unfused model code did."""
    pc = ParallelContext.single()
    x = torch.randn(B, S, 64, generator=torch.Generator().manual_seed(0))
    big, glm = _build("tiny-bigcode", "torch", pc), _build("tiny-glm2", "torch", pc)
    mlp = big.layers[0].mlp
    assert not mlp.dense_h_to_4h.skip_bias_add
    expect = mlp.dense_4h_to_h(F.gelu(F.linear(x, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias),
                                      approximate="tanh"))
    assert torch.equal(mlp(x), expect)
    mlp = glm.layers[0].mlp
    gate, up = F.linear(x, mlp.dense_h_to_4h.weight).chunk(2, dim=-1)
    assert torch.equal(mlp(x), mlp.dense_4h_to_h(F.silu(gate) * up))
    ln = big.layers[0].input_layernorm
    assert torch.equal(ln(x), F.layer_norm(x, (64,), ln.weight, ln.bias, ln.eps))
    ids, seg, labels = _batch()
    for model in (big, glm):
        with torch.no_grad():
            loss = model(ids, segment_ids=seg, labels=labels)
            logits = model(ids, segment_ids=seg)
        assert torch.equal(loss, vocab_parallel_cross_entropy(logits, labels, pc, vocab_size=V))


def test_triton_attention_dropout_runs_the_triton_softmax(monkeypatch):
    """kernels=triton with attention_dropout > 0 (the bigcode presets' default): eval (no dropout) runs the flash
    kernel and equals kernels=torch; training sends attention to the triton_softmax backend
    (flash_attention.fallback_backend) with the same dropout masks as the all-torch reference of that path."""
    from megaocto.kernels import softmax as sm

    orig, calls = sm.unfused_attention, []

    def use_softmax(softmax):
        def spy(*args, **kw):
            calls.append(kw["dropout_p"])
            return orig(*args, softmax=softmax, **kw)
        monkeypatch.setattr(sm, "unfused_attention", spy)

    use_softmax(sm.scaled_masked_softmax)
    pc = ParallelContext.single()
    ref = _build("tiny-bigcode", "torch", pc, attention_dropout=0.5, num_layers=1).eval()
    fused = _build("tiny-bigcode", "triton", pc, attention_dropout=0.5, num_layers=1).eval()
    assert fused.ops.attention_backend == "triton"
    ids, seg, labels = _batch()
    with torch.no_grad():
        loss_eval = fused(ids, segment_ids=seg, labels=labels)
        torch.testing.assert_close(loss_eval, ref(ids, segment_ids=seg, labels=labels), atol=2e-5, rtol=1e-5)
    assert calls == []  # eval: no dropout, the flash kernel ran

    def train_step(softmax):
        use_softmax(softmax)
        model = _build("tiny-bigcode", "triton", ParallelContext.single(), attention_dropout=0.5, num_layers=1)
        return _loss_and_grads(model.train())  # a fresh ParallelContext: the same dropout RNG stream

    loss_t, grads_t = train_step(sm.scaled_masked_softmax)
    assert calls == [0.5]
    loss_r, grads_r = train_step(sm.reference_scaled_masked_softmax)
    assert not torch.allclose(loss_t, loss_eval)  # dropout did change the loss
    torch.testing.assert_close(loss_t, loss_r, atol=2e-5, rtol=1e-5)
    for k in grads_r:
        assert torch.isfinite(grads_t[k]).all(), k
        torch.testing.assert_close(grads_t[k], grads_r[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_triton_bias_gelu_takes_the_projection_bias():
    model = _build("tiny-bigcode", "triton", ParallelContext.single())
    mlp = model.layers[0].mlp
    assert mlp.fuse_bias and mlp.dense_h_to_4h.skip_bias_add
    h, bias = mlp.dense_h_to_4h(torch.randn(1, 3, 64))
    assert h.shape == (1, 3, 256) and bias is mlp.dense_h_to_4h.bias
    # exact-erf GELU has no fused kernel: the GEMM keeps its bias
    erf = _build("tiny-bigcode", "triton", ParallelContext.single(), activation="gelu")
    assert not erf.layers[0].mlp.dense_h_to_4h.skip_bias_add


def test_triton_on_cpu_without_interpreter_is_a_config_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match=r"model.kernels=triton"):
        _build("tiny-glm2", "triton", ParallelContext.single())
    assert _build("tiny-glm2", "auto", ParallelContext.single()).ops.impl == "torch"


def _body_tp_sp(rank, world_size):
    from megaocto.parallel.layers import gather_full_like

    for name in FAMILIES:  # one layer each: the interpreter pays per kernel launch
        pc1 = ParallelContext.single()
        loss_r, grads_r = _loss_and_grads(_build(name, "torch", pc1, num_layers=1))
        pc = ParallelContext.init(tp=2, sequence_parallel=True)
        model = _build(name, "triton", pc, num_layers=1)
        loss, _ = _loss_and_grads(model, pc)
        torch.testing.assert_close(loss, loss_r, atol=2e-5, rtol=1e-5)
        for k, p in model.named_parameters():
            full = gather_full_like(p.grad, p, pc)
            torch.testing.assert_close(full, grads_r[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} {k}: {m}")


def test_triton_model_tp2_sequence_parallel_matches_tp1_torch():
    run_distributed(_body_tp_sp, 2)

"""Fused linear + vocab-parallel cross-entropy (megaocto/kernels/linear_cross_entropy.py) vs the unfused reference.

Triton row kernels run under TRITON_INTERPRET=1 (conftest). Odd shapes throughout: hidden 96, vocab 131 padded to
144, token counts that are not a multiple of the chunk, ignored positions, arbitrary upstream gradients.
"""
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from dist_utils import run_distributed
from megaocto.kernels import linear_cross_entropy as lce
from megaocto.kernels import registry
from megaocto.parallel.context import ParallelContext

H, V_PAD, VOCAB = 96, 144, 131
IMPLS = {"triton": lce.triton_linear_cross_entropy, "torch_chunked": lce.chunked_linear_cross_entropy}
TOL = {torch.float32: dict(loss=(1e-5, 1e-5), grad=(1e-5, 1e-5)),
       torch.bfloat16: dict(loss=(1e-4, 1e-5), grad=(2e-2, 2e-2))}  # bf16 grads: ~1 ulp (chunked dW sum)


def _inputs(shape, dtype, seed=0, h=H, v_pad=V_PAD, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, h, generator=g).to(dtype)
    w = (torch.randn(v_pad, h, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1)
    flat[::7] = -100  # ignored positions
    flat[1] = vocab - 1  # last real column
    flat[2] = 0
    upstream = torch.rand(shape, generator=g) * 2 - 0.5  # arbitrary weights, some negative, incl. ignored rows
    return x, w, labels, upstream


def _run(fn, x, w, labels, upstream, pc, **kw):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = fn(x, w, labels, pc, vocab_size=kw.pop("vocab_size", VOCAB), **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad, w.grad


def _close(got, want, dtype):
    tol = TOL[dtype]
    for name, a, b, key in zip(("loss", "dx", "dweight"), got, want, ("loss", "grad", "grad")):
        atol, rtol = tol[key]
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_fwd_bwd(impl, dtype):
    pc = ParallelContext.single()
    x, w, labels, up = _inputs((2, 19), dtype)  # 38 tokens, chunk 16 -> chunks of 16, 16, 6
    want = _run(lce.reference_linear_cross_entropy, x, w, labels, up, pc)
    got = _run(IMPLS[impl], x, w, labels, up, pc, chunk_size=16)
    _close(got, want, dtype)
    ignored = labels == -100
    assert torch.all(got[0][ignored] == 0) and torch.all(got[0][~ignored] > 0)
    assert got[0].dtype == torch.float32 and got[0].shape == labels.shape


def test_flat_input_default_chunk_and_frozen_weight():
    """[n, h] input, default chunk size, no weight grad; a second backward (retain_graph) gives the same grad."""
    pc = ParallelContext.single()
    x, w, labels, up = _inputs((37,), torch.float32, seed=3)
    ref = lce.reference_linear_cross_entropy(x, w, labels, pc, vocab_size=VOCAB)
    xg = x.clone().requires_grad_()
    loss = lce.triton_linear_cross_entropy(xg, w, labels, pc, vocab_size=VOCAB)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    (loss * up).sum().backward(retain_graph=True)
    first = xg.grad.clone()
    xg.grad = None
    (loss * up).sum().backward()
    torch.testing.assert_close(xg.grad, first)
    xr = x.clone().requires_grad_()
    (lce.reference_linear_cross_entropy(xr, w, labels, pc, vocab_size=VOCAB) * up).sum().backward()
    torch.testing.assert_close(first, xr.grad, atol=1e-5, rtol=1e-5)


def test_custom_ignore_index():
    pc = ParallelContext.single()
    x, w, labels, up = _inputs((2, 11), torch.float32, seed=6)
    labels[labels == -100] = 5  # 5 is the ignored id here; no -100 left
    labels[0, :4] = 5
    want = _run(lce.reference_linear_cross_entropy, x, w, labels, up, pc, ignore_index=5)
    got = _run(lce.triton_linear_cross_entropy, x, w, labels, up, pc, ignore_index=5, chunk_size=8)
    _close(got, want, torch.float32)
    assert torch.all(got[0][labels == 5] == 0) and torch.all(got[1][0, :4] == 0)


@pytest.mark.parametrize("bad", [-1, VOCAB, V_PAD - 1, V_PAD + 5], ids=["minus1", "vocab", "padded", "beyond"])
def test_out_of_range_label_raises_on_every_path(bad):
    """A label that is neither ignore_index nor a real id (-1 with the default -100, a padded column, past the
    padded vocabulary) is a ValueError naming the rule on every implementation, not a different meaningless
    loss per path."""
    pc = ParallelContext.single()
    x, w, labels, _ = _inputs((9,), torch.float32, seed=4)
    labels[3] = bad
    paths = dict(IMPLS, reference=lce.reference_linear_cross_entropy,
                 registry_torch=registry.torch_linear_cross_entropy,
                 ops_triton=registry.ops_for("triton", "cpu").linear_cross_entropy)
    for name, fn in paths.items():
        with pytest.raises(ValueError, match=rf"labels must be token ids in \[0, vocab_size={VOCAB}\) or "
                                             rf"ignore_index=-100; found id {bad}"):
            fn(x, w, labels, pc, vocab_size=VOCAB)
    # a custom ignore_index is the one allowed exception, and the default -100 is then out of range
    labels[3] = -1
    labels[labels == -100] = -1
    for name, fn in paths.items():
        got = fn(x, w, labels, pc, vocab_size=VOCAB, ignore_index=-1)
        assert got[3] == 0, name
    labels[0] = -100
    with pytest.raises(ValueError, match=r"ignore_index=-1; found id -100"):
        lce.triton_linear_cross_entropy(x, w, labels, pc, vocab_size=VOCAB, ignore_index=-1)


def test_bad_arguments_name_the_field():
    pc = ParallelContext.single()
    x, w, labels, _ = _inputs((5,), torch.float32)
    with pytest.raises(ValueError, match="vocab_size=145"):
        lce.triton_linear_cross_entropy(x, w, labels, pc, vocab_size=V_PAD + 1)
    with pytest.raises(ValueError, match="labels"):
        lce.triton_linear_cross_entropy(x, w, labels[:4], pc, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="dtype"):
        lce.triton_linear_cross_entropy(x, w.double(), labels, pc, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="chunk_size"):
        lce.chunked_linear_cross_entropy(x, w, labels, pc, vocab_size=VOCAB, chunk_size=0)


def test_registered_as_triton_op():
    assert registry.get("linear_cross_entropy", "triton") is lce.triton_linear_cross_entropy
    assert registry.ops_for("triton", "cpu").impls["linear_cross_entropy"] == "triton"


class _LargestOutput(TorchDispatchMode):
    """Records the largest floating-point tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = (0, ())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > self.largest[0]:
                self.largest = (t.numel(), tuple(t.shape))
        return out


@pytest.mark.parametrize("impl", ["triton", "torch_chunked", "reference"])
def test_no_full_logits_tensor(impl):
    """Forward + backward of the chunked paths never create a tensor near [tokens, V] (the reference does, so the
    probe can fail): the largest is the dweight accumulator [V, h] / x-sized grads, far below tokens·V / 4."""
    pc = ParallelContext.single()
    n, h, chunk = 512, 16, 32
    x, w, labels, up = _inputs((n,), torch.float32, seed=5, h=h)
    fn = lce.reference_linear_cross_entropy if impl == "reference" else IMPLS[impl]
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with _LargestOutput() as probe:
        loss = fn(xg, wg, labels, pc, vocab_size=VOCAB, chunk_size=chunk)
        (loss * up).sum().backward()
    largest, shape = probe.largest
    if impl == "reference":
        assert largest >= n * V_PAD, shape
    else:
        assert largest < n * V_PAD // 4, f"a {shape} tensor was allocated"
        assert largest <= max(n * h, V_PAD * h, chunk * V_PAD), shape


def _tp_body(rank, world_size):
    pc = ParallelContext.init(tp=2)
    single = ParallelContext.single()
    v_local = V_PAD // 2
    rows = slice(rank * v_local, (rank + 1) * v_local)
    for dtype, vocab in ((torch.float32, VOCAB), (torch.bfloat16, VOCAB), (torch.float32, 70)):
        # vocab 70: the second rank's shard is all padding (no valid column at all)
        x, w, labels, up = _inputs((2, 13), dtype, seed=7, vocab=vocab)
        want = _run(lce.reference_linear_cross_entropy, x, w, labels, up, single, vocab_size=vocab)
        loss, dx, dw = _run(lce.triton_linear_cross_entropy, x, w[rows].contiguous(), labels, up, pc,
                            vocab_size=vocab, chunk_size=10)
        dist.all_reduce(dx, group=pc.tp_group)  # what lm_head_input's backward does with the partial dx
        _close((loss, dx, dw), (want[0], want[1], want[2][rows]), dtype)


def test_tp2_equals_tp1():
    run_distributed(_tp_body, 2)

"""vocab_parallel_cross_entropy vs F.cross_entropy on the full logits (tp=1 and 2 gloo ranks)."""
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

from megaocto.parallel.context import ParallelContext
from megaocto.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaocto.parallel.layers import pad_vocab_size

B, S, VOCAB = 3, 10, 131


def _close(a, b, what, atol=1e-5):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"{what}: max abs err {err}"


def _data(v_pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, v_pad, generator=g) * 3
    target = torch.randint(0, VOCAB, (B, S), generator=g)
    target[0, :3] = torch.tensor([0, v_pad // 2 - 1, v_pad // 2])  # shard edges
    target[1, 2] = -100
    target[2, 5:] = -100
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    gy = torch.rand(B, S, generator=g)
    return logits, target, mask, gy


def _check(pc, dtype=torch.float32, grad_atol=1e-5):
    atol = 1e-5  # loss math is fp32 for every logits dtype
    r, tp = pc.tp_rank, pc.tp
    v_pad = pad_vocab_size(VOCAB, tp, multiple=8)
    logits, target, mask, gy = _data(v_pad)
    logits = logits.to(dtype)
    for smoothing in (0.0, 0.1):
        for real_vocab in (None, VOCAB):
            cols = v_pad if real_vocab is None else real_vocab
            ref_in = logits.float()[..., :cols].clone().requires_grad_(True)
            ref = F.cross_entropy(ref_in.view(-1, cols), target.view(-1), reduction="none",
                                  label_smoothing=smoothing, ignore_index=-100).view(B, S)
            (ref * mask * gy).sum().backward()
            ref_grad = F.pad(ref_in.grad, (0, v_pad - cols))

            local = logits.chunk(tp, -1)[r].clone().requires_grad_(True)
            loss = vocab_parallel_cross_entropy(local, target, pc, loss_mask=mask, label_smoothing=smoothing,
                                                vocab_size=real_vocab)
            assert loss.dtype == torch.float32
            what = f"tp={tp} {dtype} smoothing={smoothing} vocab={real_vocab}"
            _close(loss, ref * mask, f"loss {what}", atol)
            assert torch.all(loss[target == -100] == 0)
            (loss * gy).sum().backward()
            assert local.grad.dtype == dtype
            _close(local.grad, ref_grad.chunk(tp, -1)[r], f"grad {what}", grad_atol)
            assert torch.all(local.grad[target == -100] == 0)

    # reduction="mean" = Σ(loss·mask)/Σmask with ignored tokens out of the denominator
    local = logits.chunk(tp, -1)[r].clone().requires_grad_(True)
    mean = vocab_parallel_cross_entropy(local, target, pc, loss_mask=mask, reduction="mean")
    ref_in = logits.float().clone().requires_grad_(True)
    per = F.cross_entropy(ref_in.view(-1, v_pad), target.view(-1), reduction="none").view(B, S)
    denom = (mask * (target != -100)).sum()
    ref_mean = (per * mask).sum() / denom
    _close(mean, ref_mean, f"mean tp={tp}", atol)
    mean.backward()
    ref_mean.backward()
    _close(local.grad, ref_in.grad.chunk(tp, -1)[r], f"mean grad tp={tp}", grad_atol)
    # no counted token at all: 0, not nan
    zero = vocab_parallel_cross_entropy(local.detach(), target, pc, loss_mask=torch.zeros(B, S), reduction="mean")
    assert zero.item() == 0.0


def _dist_body(rank, world_size):
    pc = ParallelContext.init(tp=2)
    _check(pc)
    _check(pc, torch.bfloat16, grad_atol=4e-3)  # bf16 logits: fp32 math, grad rounded to bf16


def test_cross_entropy_tp2():
    run_distributed(_dist_body, 2)


def test_cross_entropy_tp1_and_errors():
    pc = ParallelContext.single()
    _check(pc)
    logits = torch.randn(2, 5, 16, requires_grad=True)
    target = torch.randint(0, 16, (2, 5))
    loss = vocab_parallel_cross_entropy(logits, target, pc)
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.sum().backward()
    # non-contiguous logits (a transposed view) and int32 targets
    lt = torch.randn(5, 2, 16).transpose(0, 1).requires_grad_(True)
    ref_in = lt.detach().clone().requires_grad_(True)
    t32 = target.to(torch.int32)
    out = vocab_parallel_cross_entropy(lt, t32, pc)
    ref = F.cross_entropy(ref_in.reshape(-1, 16), target.reshape(-1), reduction="none").view(2, 5)
    _close(out, ref, "non-contiguous logits")
    out.sum().backward()
    ref.sum().backward()
    _close(lt.grad, ref_in.grad, "non-contiguous logits grad")
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(logits, target[:, :4], pc)
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(logits, target, pc, reduction="avg")

"""Mappings and TP layers on 2 gloo ranks vs the unsharded torch reference (outputs and gradients)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from megaocto.config.base import ConfigError
from megaocto.parallel import mappings as M
from megaocto.parallel.context import ParallelContext
from megaocto.parallel.grads import allreduce_sequence_parallel_grads
from megaocto.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      gather_full_like, gather_full_state_dict, gather_full_tensor,
                                      load_full_state_dict, merge_shards, pad_vocab_size, shard_tensor)

B, S, H, FFN = 3, 10, 96, 160
ATOL = 1e-5


def _close(a, b, what, atol=ATOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item()
    assert err <= atol, f"{what}: max abs err {err}"


def _check_mappings(pc):
    r, tp = pc.tp_rank, pc.tp
    # per-rank distinct, non-contiguous [3, 4, 6] views: gather/scatter along a non-zero dim
    base = torch.arange(3 * 6 * 4, dtype=torch.float32).reshape(3, 6, 4)
    full = torch.cat([(base + 1000 * k).transpose(1, 2) for k in range(tp)], dim=1)  # [3, 4*tp, 6]
    mine = (base + 1000 * r).transpose(1, 2).requires_grad_(True)
    assert not mine.is_contiguous()
    y = M.gather_from_tp(mine, pc, dim=1)
    assert torch.equal(y, full)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))  # same on all ranks
    y.backward(gy)
    assert torch.equal(mine.grad, gy.chunk(tp, dim=1)[r])

    x = full.clone().requires_grad_(True)
    y = M.scatter_to_tp(x.transpose(1, 2), pc, dim=-1)  # non-contiguous input, last dim
    assert torch.equal(y, full.transpose(1, 2).chunk(tp, dim=-1)[r])
    y.backward(torch.ones_like(y) * (r + 1))
    expect = torch.cat([torch.ones_like(y) * (k + 1) for k in range(tp)], dim=-1).transpose(1, 2)
    assert torch.equal(x.grad, expect)

    # copy_to: identity fwd, all-reduce bwd; reduce_from: all-reduce fwd, identity bwd
    x = torch.full((2, 3), float(r + 1), requires_grad=True)
    y = M.copy_to_tp(x, pc)
    assert torch.equal(y, x)
    y.backward(torch.full((2, 3), float(r + 1)))
    assert torch.equal(x.grad, torch.full((2, 3), float(sum(range(1, tp + 1)))))
    x = torch.full((2, 3), float(r + 1), requires_grad=True)
    y = M.reduce_from_tp(x, pc)
    assert torch.equal(y, torch.full((2, 3), float(sum(range(1, tp + 1)))))
    assert torch.equal(x, torch.full((2, 3), float(r + 1))), "reduce_from must not modify its input"
    y.backward(torch.full((2, 3), 2.0))
    assert torch.equal(x.grad, torch.full((2, 3), 2.0))

    # sequence-parallel mappings along dim 1 of [b, s, h]
    seq_full = torch.randn(B, S, 4, generator=torch.Generator().manual_seed(2))
    x = seq_full.clone().requires_grad_(True)
    y = M.scatter_to_sp(x, pc)
    assert torch.equal(y, seq_full.chunk(tp, 1)[r])
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.ones_like(seq_full))  # all-gathered ones
    for partial in (True, False):
        x = seq_full.chunk(tp, 1)[r].clone().requires_grad_(True)
        y = M.gather_from_sp(x, pc, grad_is_partial=partial)
        assert torch.equal(y, seq_full)
        y.backward(torch.full_like(seq_full, float(r + 1)))
        want = float(sum(range(1, tp + 1))) if partial else float(r + 1)
        assert torch.equal(x.grad, torch.full_like(x, want)), f"gather_from_sp partial={partial}"
    x = (seq_full * (r + 1)).requires_grad_(True)
    y = M.reduce_scatter_to_sp(x, pc)
    _close(y, (seq_full * sum(range(1, tp + 1))).chunk(tp, 1)[r], "reduce_scatter_to_sp")
    y.backward(torch.ones_like(y) * (r + 1))
    expect = torch.cat([torch.full_like(y, float(k + 1)) for k in range(tp)], dim=1)
    assert torch.equal(x.grad, expect)
    # non-contiguous reduce-scatter input
    xt = (torch.arange(24.0).reshape(2, 4, 3) * (r + 1)).transpose(0, 1)  # [4, 2, 3]
    y = M.reduce_scatter(xt, pc, dim=0)
    _close(y, (torch.arange(24.0).reshape(2, 4, 3) * 3).transpose(0, 1).chunk(2, 0)[r], "rs dim0")


def _mlp_reference(seed, sp):
    """Unsharded reference: same seed => same full weights (every rank draws the full weight)."""
    single = ParallelContext.single()
    torch.manual_seed(seed)
    fc1 = ColumnParallelLinear(H, FFN, single)
    fc2 = RowParallelLinear(FFN, H, single, init_method=lambda t: nn.init.normal_(t, std=0.05))
    with torch.no_grad():
        fc2.bias.normal_()  # non-zero bias so its grad path is checked
    return fc1, fc2


def _check_mlp(pc, sp):
    pc = dataclasses.replace(pc, sequence_parallel=sp)
    r, tp = pc.tp_rank, pc.tp
    ref1, ref2 = _mlp_reference(11, sp)
    torch.manual_seed(11)
    fc1 = ColumnParallelLinear(H, FFN, pc)
    fc2 = RowParallelLinear(FFN, H, pc, init_method=lambda t: nn.init.normal_(t, std=0.05))
    fc2.bias.data.copy_(ref2.bias.data)
    assert fc1.weight.shape == (FFN // tp, H) and fc2.weight.shape == (H, FFN // tp)
    assert fc1.weight.partition_dim == 0 and fc2.weight.partition_dim == 1 and fc1.bias.tensor_parallel
    assert getattr(fc2.bias, "sequence_parallel", False) == sp
    assert not getattr(fc2.bias, "tensor_parallel", False)
    for mine, ref in ((fc1, ref1), (fc2, ref2)):
        assert torch.equal(gather_full_tensor(mine.weight, pc), ref.weight), "same seed, any tp => same model"
        assert torch.equal(mine.shard_full_tensor("weight", ref.weight), mine.weight)

    g = torch.Generator().manual_seed(5)
    x_full = torch.randn(B, S, H, generator=g)
    gy_full = torch.randn(B, S, H, generator=g)
    xr = x_full.clone().requires_grad_(True)
    yr = ref2(F.gelu(ref1(xr)))
    yr.backward(gy_full)

    x = (x_full.chunk(tp, 1)[r] if sp else x_full).clone().requires_grad_(True)
    y = fc2(F.gelu(fc1(x)))
    assert y.shape == ((B, S // tp, H) if sp else (B, S, H))
    _close(y, yr.chunk(tp, 1)[r] if sp else yr, f"mlp out sp={sp}")
    y.backward(gy_full.chunk(tp, 1)[r] if sp else gy_full)
    assert allreduce_sequence_parallel_grads(nn.ModuleList([fc1, fc2]), pc) == (1 if sp else 0)
    _close(x.grad, xr.grad.chunk(tp, 1)[r] if sp else xr.grad, f"dx sp={sp}")
    for name, mine, ref in (("fc1", fc1, ref1), ("fc2", fc2, ref2)):
        _close(gather_full_like(mine.weight.grad, mine.weight, pc), ref.weight.grad, f"{name}.dW sp={sp}", 1e-4)
        _close(gather_full_like(mine.bias.grad, mine.bias, pc), ref.bias.grad, f"{name}.db sp={sp}", 1e-4)

    # Row with input_is_parallel=False splits a full input itself
    row = RowParallelLinear(FFN, H, pc, input_is_parallel=False, bias=False)
    row.weight.data.copy_(fc2.weight.data)
    h_full = torch.randn(B, S, FFN, generator=g)
    out = row(h_full)
    ref = F.linear(h_full, ref2.weight)
    _close(out, ref.chunk(tp, 1)[r] if sp else ref, f"row input_is_parallel=False sp={sp}")


def _check_fused_column(pc):
    r, tp = pc.tp_rank, pc.tp
    sizes = [96, 32, 32]  # q, k, v with unequal blocks
    torch.manual_seed(3)
    ref = ColumnParallelLinear(H, sizes, ParallelContext.single())
    plain = nn.Linear(H, sum(sizes))
    with torch.no_grad():
        plain.weight.copy_(ref.weight)
        plain.bias.normal_()
    torch.manual_seed(3)
    fused = ColumnParallelLinear(H, sizes, pc)
    gathered = ColumnParallelLinear(H, sizes, pc, gather_output=True)
    for layer in (fused, gathered):
        layer.bias.data.copy_(layer.shard_full_tensor("bias", plain.bias.data))
        layer.weight.data.copy_(layer.shard_full_tensor("weight", plain.weight.data))
    assert fused.weight.partition_blocks == (96, 32, 32)
    assert torch.equal(gather_full_tensor(fused.weight, pc), plain.weight.detach())
    assert torch.equal(gather_full_tensor(fused.bias, pc), plain.bias.detach())
    g = torch.Generator().manual_seed(9)
    x_full = torch.randn(B, S, H, generator=g)
    xr = x_full.clone().requires_grad_(True)
    yr = plain(xr)
    gy = torch.randn(yr.shape, generator=g)
    yr.backward(gy)

    x = x_full.clone().requires_grad_(True)
    y = fused(x)
    local = [blk.chunk(tp, -1)[r] for blk in yr.split(sizes, -1)]
    _close(y, torch.cat(local, -1), "fused local output = concat of local block shards")
    y.backward(torch.cat([blk.chunk(tp, -1)[r] for blk in gy.split(sizes, -1)], -1))
    _close(x.grad, xr.grad, "fused dx")
    _close(gather_full_like(fused.weight.grad, fused.weight, pc), plain.weight.grad, "fused dW", 1e-4)
    _close(gather_full_like(fused.bias.grad, fused.bias, pc), plain.bias.grad, "fused db", 1e-4)

    x2 = x_full.clone().requires_grad_(True)
    y2 = gathered(x2)
    _close(y2, yr, "gather_output fused output in unsharded order")
    y2.backward(gy)
    _close(x2.grad, xr.grad, "gather_output dx")
    _close(gather_full_like(gathered.weight.grad, gathered.weight, pc), plain.weight.grad, "gather dW", 1e-4)

    # state-dict round trip through full tensors
    sd = gather_full_state_dict(fused, pc)
    assert torch.equal(sd["weight"], plain.weight.detach())
    fresh = ColumnParallelLinear(H, sizes, pc)
    load_full_state_dict(fresh, sd, pc)
    assert torch.equal(fresh.weight, fused.weight) and torch.equal(fresh.bias, fused.bias)


def _check_embedding(pc):
    r, tp = pc.tp_rank, pc.tp
    vocab = pad_vocab_size(131, tp, multiple=8)
    assert vocab == 144
    torch.manual_seed(4)
    ref = VocabParallelEmbedding(vocab, H, ParallelContext.single())
    torch.manual_seed(4)
    emb = VocabParallelEmbedding(vocab, H, pc)
    assert torch.equal(gather_full_tensor(emb.weight, pc), ref.weight)
    assert (emb.vocab_start, emb.vocab_end) == (r * vocab // tp, (r + 1) * vocab // tp)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 131, (B, S), generator=g)
    ids[0, :4] = torch.tensor([0, 71, 72, 130])  # both shards and their edges
    gy = torch.randn(B, S, H, generator=g)
    yr = ref(ids)
    yr.backward(gy)
    y = emb(ids)
    assert torch.equal(y, yr)
    # out-of-range ids raise on every rank (they would otherwise be zero vectors); padded rows are valid ids
    for bad in (vocab, vocab + 50, -1):
        with pytest.raises(IndexError, match=rf"out of range .* \[0, {vocab}\).*found id {bad}"):
            emb(ids.masked_fill(ids == 71, bad))
    assert emb(torch.tensor([[vocab - 1, 0]])).shape == (1, 2, H)
    y.backward(gy)
    _close(gather_full_like(emb.weight.grad, emb.weight, pc), ref.weight.grad, "embedding dW")
    # a tied output head appears twice in state_dict; both entries gather to the full weight
    tied = nn.ModuleDict({"emb": emb, "out": nn.Linear(H, vocab // tp, bias=False)})
    tied["out"].weight = emb.weight
    sd = gather_full_state_dict(tied, pc)
    assert torch.equal(sd["emb.weight"], ref.weight) and torch.equal(sd["out.weight"], ref.weight)


def _dist_body(rank, world_size):
    pc = ParallelContext.init(tp=2)
    assert (pc.tp, pc.dp, pc.pp, pc.tp_rank, pc.tp_ranks) == (2, 1, 1, rank, (0, 1))
    assert pc.backend == "gloo" and pc.device.type == "cpu"
    _check_mappings(pc)
    _check_mlp(pc, sp=False)
    _check_mlp(pc, sp=True)
    _check_fused_column(pc)
    _check_embedding(pc)


def test_layers_and_mappings_tp2():
    run_distributed(_dist_body, 2)


def test_tp1_is_plain_torch():
    pc = ParallelContext.single()
    x = torch.randn(B, S, H)
    col = ColumnParallelLinear(H, [32, 16, 16], pc, dtype=torch.float64)
    xd = x.double()
    assert isinstance(col, nn.Linear) and col.weight.dtype == torch.float64
    assert torch.equal(col(xd), F.linear(xd, col.weight, col.bias))
    row = RowParallelLinear(H, 40, pc)
    assert torch.equal(row(x), F.linear(x, row.weight, row.bias))
    emb = VocabParallelEmbedding(131, H, pc)
    ids = torch.randint(0, 131, (B, S))
    assert isinstance(emb, nn.Embedding) and torch.equal(emb(ids), F.embedding(ids, emb.weight))
    with pytest.raises(IndexError, match=r"out of range.*found id 131"):
        emb(torch.tensor([[0, 131]]))
    assert torch.equal(row.bias, torch.zeros(40)) and abs(col.weight.std().item() - 0.02) < 0.002
    for fn in (M.copy_to_tp, M.reduce_from_tp, M.scatter_to_tp, M.gather_from_tp, M.scatter_to_sp,
               M.gather_from_sp, M.reduce_scatter_to_sp):
        assert fn(x, pc) is x
    assert set(dict(col.named_parameters())) == {"weight", "bias"}


def test_shard_merge_and_errors():
    full = torch.arange(12 * 3).reshape(12, 3)
    shards = [shard_tensor(full, 2, k, 0, (6, 2, 4)) for k in range(2)]
    assert shards[0][:, 0].tolist() == [0, 3, 6, 18, 24, 27]
    assert torch.equal(merge_shards(shards, 0, (6, 2, 4)), full)
    cols = [shard_tensor(full, 3, k, 1) for k in range(3)]
    assert torch.equal(merge_shards(cols, 1), full)
    assert pad_vocab_size(49152, 4) == 49152 and pad_vocab_size(131, 1) == 128 * 2
    pc2 = dataclasses.replace(ParallelContext.single(), tp=2, world_size=2)
    for make in (lambda: ColumnParallelLinear(8, [4, 3], pc2), lambda: RowParallelLinear(7, 4, pc2),
                 lambda: VocabParallelEmbedding(131, 4, pc2)):
        try:
            make()
        except ConfigError as e:
            assert "divisible by tp=2" in str(e)
        else:
            raise AssertionError("expected ConfigError")

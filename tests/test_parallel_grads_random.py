"""Global grad-norm clipping over TP x PP (4 gloo ranks), sequence-parallel grads, RNG streams and state."""
import io
import json
import math
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from megaocto.parallel.context import ParallelContext
from megaocto.parallel.grads import allreduce_sequence_parallel_grads, clip_grad_norm_, grad_norm
from megaocto.parallel.layers import ColumnParallelLinear, RowParallelLinear, shard_for_param
from megaocto.parallel.random import get_rng_state, seed_everything, set_rng_state

H, FFN = 96, 160


def _reference(seed):
    """Unsharded 2-stage model with deterministic grads: stage 0 = [fc1, norm], stage 1 = [fc2]."""
    single = ParallelContext.single()
    torch.manual_seed(seed)
    stages = [[ColumnParallelLinear(H, [FFN, 64], single), nn.LayerNorm(H)], [RowParallelLinear(FFN, H, single)]]
    g = torch.Generator().manual_seed(seed + 1)
    for mods in stages:
        for m in mods:
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
    return stages


def _local(stages, pc, seed):
    torch.manual_seed(seed)
    mods = ([ColumnParallelLinear(H, [FFN, 64], pc), nn.LayerNorm(H)] if pc.pp_rank == 0
            else [RowParallelLinear(FFN, H, pc)])
    for m, ref in zip(mods, stages[pc.pp_rank]):
        for p, rp in zip(m.parameters(), ref.parameters()):
            p.grad = shard_for_param(p, rp.grad, pc).clone()
    return mods


def _dist_body(rank, world_size):
    pc = ParallelContext.init(tp=2, pp=2)
    assert (pc.tp_rank, pc.dp_rank, pc.pp_rank) == (rank % 2, 0, rank // 2)
    assert pc.tp_ranks == (rank - rank % 2, rank - rank % 2 + 1) and pc.pp_ranks == (rank % 2, rank % 2 + 2)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=pc.tp_group)
    assert t.item() == sum(pc.tp_ranks)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=pc.pp_group)
    assert t.item() == sum(pc.pp_ranks)

    # the same 4 ranks as tp=2 x dp=2: dp groups stride by tp
    pc_dp = ParallelContext.init(tp=2)
    assert (pc_dp.dp, pc_dp.dp_rank, pc_dp.dp_ranks) == (2, rank // 2, (rank % 2, rank % 2 + 2))
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=pc_dp.dp_group)
    assert t.item() == sum(pc_dp.dp_ranks)

    stages = _reference(7)
    ref_params = [p for mods in stages for m in mods for p in m.parameters()]
    ref_inf = max(p.grad.abs().max().item() for p in ref_params)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0).item()
    mods = _local(_reference(7), pc, 7)
    params = [p for m in mods for p in m.parameters()]
    assert abs(grad_norm(params, pc, math.inf).item() - ref_inf) < 1e-6
    norm = clip_grad_norm_(params, 1.0, pc)
    assert abs(norm.item() - ref_norm) < 1e-4 * ref_norm, (norm.item(), ref_norm)
    for m, ref in zip(mods, stages[pc.pp_rank]):
        for p, rp in zip(m.parameters(), ref.parameters()):
            assert torch.allclose(p.grad, shard_for_param(p, rp.grad, pc), atol=1e-6), "clipped grads"
    # a nan on one rank reaches every rank and leaves grads untouched
    before = [p.grad.clone() for p in params]
    if rank == 3:
        params[0].grad[0, 0] = float("nan")
    bad = clip_grad_norm_(params, 1.0, pc)
    assert math.isnan(bad.item())
    assert all(torch.equal(p.grad, b) for p, b in zip(params[1:], before[1:]))

    # RNG: default stream equal across TP ranks (and differs across PP), tracker stream differs across TP
    seed_everything(42, pc)
    with pc.rng.fork():
        mine = torch.rand(8)
        drop = F.dropout(torch.ones(64), p=0.5)
    default = torch.rand(8)
    got = [torch.empty(8) for _ in range(2)]
    dist.all_gather(got, mine, group=pc.tp_group)
    assert not torch.equal(got[0], got[1]), "tracker stream must differ per tp rank"
    dgot = [torch.empty(64) for _ in range(2)]
    dist.all_gather(dgot, drop, group=pc.tp_group)
    assert not torch.equal(dgot[0], dgot[1]), "dropout masks must differ per tp rank"
    dist.all_gather(got, default, group=pc.tp_group)
    assert torch.equal(got[0], got[1]), "default stream must agree across tp ranks"
    dist.all_gather(got, default, group=pc.pp_group)
    assert not torch.equal(got[0], got[1]), "default stream differs per pp stage"


def test_grad_norm_and_rng_tp2_pp2():
    run_distributed(_dist_body, 4)


def test_sequence_parallel_grad_allreduce_single_is_noop():
    pc = ParallelContext.single()
    norm = nn.LayerNorm(4)
    norm.weight.sequence_parallel = True
    norm.weight.grad = torch.ones(4)
    assert allreduce_sequence_parallel_grads(norm, pc) == 0
    assert torch.equal(norm.weight.grad, torch.ones(4))


def _draws(pc):
    with pc.rng.fork():
        fork = torch.rand(3).tolist()
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist(), fork, torch.randn(2).tolist()]


def test_rng_fork_and_state_round_trip():
    pc = ParallelContext.single()
    seed_everything(3, pc)
    first = _draws(pc)
    seed_everything(3, pc)
    assert _draws(pc) == first
    # fork leaves the default stream where it was
    seed_everything(3, pc)
    a = torch.rand(4)
    seed_everything(3, pc)
    with pc.rng.fork():
        torch.rand(100)
    assert torch.equal(torch.rand(4), a)

    seed_everything(5, pc)
    _draws(pc)
    state = get_rng_state(pc)
    expect = _draws(pc)
    restored = json.loads(json.dumps(state))  # JSON-able
    _draws(pc)
    set_rng_state(restored, pc)
    assert _draws(pc) == expect
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True), pc)  # torch.save-able, weights_only-safe
    assert _draws(pc) == expect

    other = ParallelContext(tp=2, tp_rank=1, world_size=2)
    try:
        set_rng_state(state, other)
    except ValueError as e:
        assert "tp_rank=0" in str(e)
    else:
        raise AssertionError("expected a tp_rank mismatch error")
    try:
        with pc.rng.fork("nope"):
            pass
    except KeyError as e:
        assert "seed_everything" in str(e)
    else:
        raise AssertionError("expected KeyError for an unknown stream")

"""Tensor parallelism: tp=2 (sequence parallel off and on) reproduces tp=1 logits, gradients and AdamW steps;
the check catches the bigcode MQA K/V gradient bug class."""
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megaocto.config.model import ModelConfig
from megaocto.model import build_model
from megaocto.model.flops import num_params, num_params_per_rank
from megaocto.parallel.context import ParallelContext
from megaocto.parallel.grads import allreduce_sequence_parallel_grads
from megaocto.parallel.layers import gather_full_like, gather_full_state_dict

V, B, S = 1000, 2, 16
TOL = dict(atol=1e-5, rtol=1e-5)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, V, (B, S), generator=g)
    seg = torch.tensor([[1] * 9 + [2] * 7, [1] * 16])
    return ids, seg, torch.roll(ids, -1, 1)


def _loss_backward(model, pc, step):
    ids, seg, labels = _batch(step)
    loss = model(ids, segment_ids=seg, labels=labels)
    loss.mean().backward()
    allreduce_sequence_parallel_grads(model, pc)
    return loss.detach()


def _grad_mismatches(ref, model, pc):
    """Names whose gathered tp gradient differs from the tp=1 gradient (collective over TP)."""
    ref_params = dict(ref.named_parameters())
    bad = []
    for name, p in model.named_parameters():
        full = gather_full_like(p.grad, p, pc)
        if not torch.allclose(full, ref_params[name].grad, **TOL):
            bad.append(name)
    return bad


def _gather_logits(logits, pc):
    parts = [torch.empty_like(logits) for _ in range(pc.tp)]
    dist.all_gather(parts, logits.contiguous(), group=pc.tp_group)
    return torch.cat(parts, dim=-1)


def _check_family(name, pc1, pc2, recompute):
    cfg = ModelConfig.from_preset(name)
    torch.manual_seed(1234)
    ref = build_model(cfg, pc1)
    torch.manual_seed(1234)
    model = build_model(cfg, pc2, recompute=recompute, recompute_num_layers=2)
    # same seed -> same full weights at every TP size
    full = gather_full_state_dict(model, pc2)
    for k, v in ref.state_dict().items():
        assert torch.equal(full[k], v), k
    # parameter count per rank
    assert sum(p.numel() for p in model.parameters()) == num_params_per_rank(cfg, pc2.tp)
    assert num_params(cfg, pc2.tp) == sum(p.numel() for p in ref.parameters())

    ids, seg, _ = _batch(0)
    with torch.no_grad():
        torch.testing.assert_close(_gather_logits(model(ids, segment_ids=seg), pc2)[..., :V],
                                   ref(ids, segment_ids=seg)[..., :V], **TOL)
    torch.testing.assert_close(_loss_backward(model, pc2, 0), _loss_backward(ref, pc1, 0), **TOL)
    assert _grad_mismatches(ref, model, pc2) == [], (name, pc2.sequence_parallel)

    # Three AdamW steps on every rank reproduce the tp=1 trajectory. eps=1e-6: Adam turns rounding-level grads
    # (e.g. the key bias, whose true grad is 0 since softmax ignores a per-row shift) into O(lr) steps of random
    # sign; a larger eps keeps those below the tolerance while real grads (>= 1e-4 here) still dominate.
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, eps=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, eps=1e-6)
    for step in range(1, 4):
        for o, m in ((opt_ref, ref), (opt, model)):
            o.step()
            o.zero_grad(set_to_none=True)
        _loss_backward(ref, pc1, step)
        _loss_backward(model, pc2, step)
    full = gather_full_state_dict(model, pc2)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, **TOL, msg=f"{name} sp={pc2.sequence_parallel} after AdamW: {k}")


def _body_tp(rank, world_size):
    pc1 = ParallelContext.single()
    for sp, recompute in ((False, "none"), (True, "full")):
        pc2 = ParallelContext.init(tp=2, sequence_parallel=sp)
        assert pc2.sequence_parallel == sp
        for name in ("tiny-bigcode", "tiny-glm2"):
            _check_family(name, pc1, pc2, recompute)


def test_tp2_matches_tp1_both_families_sp_off_and_on():
    run_distributed(_body_tp, 2)


def _body_mqa_bug(rank, world_size):
    import megaocto.model.bigcode as bigcode

    pc1 = ParallelContext.single()
    cfg = ModelConfig.from_preset("tiny-bigcode")
    for sp in (False, True):
        pc2 = ParallelContext.init(tp=2, sequence_parallel=sp)
        torch.manual_seed(1234)
        ref = build_model(cfg, pc1)
        _loss_backward(ref, pc1, 0)
        results = {}
        for variant in ("correct", "bug"):
            torch.manual_seed(1234)
            model = build_model(cfg, pc2)
            saved = (bigcode.copy_to_tp, bigcode.gather_from_sp)
            if variant == "bug":  # the pre-PR-#37 bug: K/V output grad not summed over TP
                bigcode.copy_to_tp = lambda x, pc: x
                real_gather = saved[1]
                bigcode.gather_from_sp = lambda x, pc, dim=1, grad_is_partial=True: real_gather(
                    x, pc, dim, grad_is_partial=False)
            try:
                _loss_backward(model, pc2, 0)
            finally:
                bigcode.copy_to_tp, bigcode.gather_from_sp = saved
            results[variant] = _grad_mismatches(ref, model, pc2)
        assert results["correct"] == []
        kv = [n for n in results["bug"] if "key_value" in n]
        assert len(kv) == 2 * cfg.num_layers, results["bug"]  # weight + bias of every layer's key_value


def test_check_catches_mqa_kv_gradient_bug():
    run_distributed(_body_mqa_bug, 2)


def _body_dropout(rank, world_size):
    from megaocto.parallel.random import seed_everything

    for name in ("tiny-bigcode", "tiny-glm2"):
        cfg = ModelConfig.from_preset(name, attention_dropout=0.2, hidden_dropout=0.2)
        for sp in (False, True):
            pc = ParallelContext.init(tp=2, sequence_parallel=sp)
            losses, grads = [], []
            for recompute in ("none", "full", "selective"):
                torch.manual_seed(1234)
                model = build_model(cfg, pc, recompute=recompute).train()
                seed_everything(5, pc)
                losses.append(_loss_backward(model, pc, 0))
                grads.append({k: p.grad for k, p in model.named_parameters()})
            # replicated activations see the same dropout masks on both TP ranks: the loss is identical
            both = [torch.empty_like(losses[0]) for _ in range(2)]
            dist.all_gather(both, losses[0], group=pc.tp_group)
            assert torch.equal(both[0], both[1]), (name, sp)
            # recompute replays the per-TP-rank dropout stream: same loss and grads as without recompute
            for loss, g in zip(losses[1:], grads[1:]):
                assert torch.equal(loss, losses[0]), (name, sp)
                for k in g:
                    torch.testing.assert_close(g[k], grads[0][k], atol=1e-6, rtol=1e-5, msg=f"{name} sp={sp} {k}")
            # dropout is active: eval mode gives a different loss
            model.eval()
            with torch.no_grad():
                ids, seg, labels = _batch(0)
                assert not torch.allclose(model(ids, segment_ids=seg, labels=labels), losses[0])


def test_dropout_under_tp_consistent_and_recompute_exact():
    run_distributed(_body_dropout, 2)


def _attention_masks(attn, pc, p):
    """Dropout masks ``[b, local_heads, s, s]`` that ``attn._core`` draws (training mode), gathered over TP.

    Probe inputs: q = k = 0 (uniform causal probabilities 1/(i+1)) and one-hot v (v[j] = e_j), so the output is
    the dropped probability matrix itself and ``out != 0`` is the keep mask. Returns (gathered [tp, b, h, s, s],
    this rank's mask, the probe inputs).
    """
    b, s, d = 2, 16, attn.head_dim
    assert d >= s
    q = torch.zeros(b, attn.local_heads, s, d)
    k = torch.zeros(b, attn.local_groups, s, d)
    v = torch.eye(s, d).expand(b, attn.local_groups, s, d).contiguous()
    out = attn._core(q, k, v, None)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    kept = out[..., :s] != 0
    assert not (kept & ~causal).any()
    # surviving entries are 1/(i+1)/(1-p): real dropout, not identity
    scale = (1.0 / torch.arange(1, s + 1, dtype=torch.float32))[:, None].expand(s, s) / (1 - p)
    torch.testing.assert_close(out[..., :s][kept], scale.expand_as(kept)[kept])
    assert 0 < kept.sum() < causal.sum() * b * attn.local_heads
    parts = [torch.empty_like(kept) for _ in range(pc.tp)]
    dist.all_gather(parts, kept.contiguous(), group=pc.tp_group)
    return torch.stack(parts), kept, (q, k, v)


def _body_dropout_streams(rank, world_size):
    import megaocto.model.bigcode as bigcode
    import megaocto.model.glm2 as glm2
    from megaocto.kernels.attention import attention
    from megaocto.model.common import dropout
    from megaocto.parallel.random import seed_everything

    p = 0.5
    for name in ("tiny-bigcode", "tiny-glm2"):
        # 1. attention dropout: probabilities are sharded by head -> per-TP-rank tracker stream
        cfg = ModelConfig.from_preset(name, attention_dropout=p, hidden_dropout=0.0)
        pc = ParallelContext.init(tp=2, sequence_parallel=False)
        torch.manual_seed(1234)
        model = build_model(cfg, pc).train()
        attn = model.layers[0].self_attention
        seed_everything(5, pc)
        tracker = pc.rng.get_states()
        default = torch.get_rng_state()
        masks, mine, (q, k, v) = _attention_masks(attn, pc, p)
        # rank 0 head 0 (global head 0) and rank 1 head 0 (global head 2) get different masks
        assert not torch.equal(masks[0, :, 0], masks[1, :, 0]), name
        assert not torch.equal(masks[0], masks[1]), name
        # the mask is exactly the one this rank's tracker stream draws, and not the shared default stream's
        assert torch.equal(torch.get_rng_state(), default), f"{name}: attention dropout consumed the default RNG"
        pc.rng.set_states(tracker)
        scale = 1.0 / attn.head_dim ** 0.5
        with pc.rng.fork():
            tracked = attention(q, k, v, causal=True, dropout_p=p, scale=scale)[..., :16] != 0
        assert torch.equal(tracked, mine), name
        shared = attention(q, k, v, causal=True, dropout_p=p, scale=scale)[..., :16] != 0
        assert not torch.equal(shared, mine), name

        # 2. residual dropout under sequence parallelism: the [b, s/tp, h] shards differ across TP ranks
        cfg = ModelConfig.from_preset(name, attention_dropout=0.0, hidden_dropout=p)
        pc = ParallelContext.init(tp=2, sequence_parallel=True)
        seed_everything(5, pc)
        ones = torch.ones(2, 8, cfg.hidden_size)
        shard = dropout(ones, p, True, pc, sharded=True) != 0
        parts = [torch.empty_like(shard) for _ in range(pc.tp)]
        dist.all_gather(parts, shard, group=pc.tp_group)
        assert not torch.equal(parts[0], parts[1]), name
        # replicated activations (sharded=False) still agree across ranks
        same = dropout(ones, p, True, pc, sharded=False) != 0
        dist.all_gather(parts, same, group=pc.tp_group)
        assert torch.equal(parts[0], parts[1]), name
        # and the blocks ask for the sharded stream when sequence parallel is on (replicated when off)
        for sp in (True, False):
            pc = ParallelContext.init(tp=2, sequence_parallel=sp)
            torch.manual_seed(1234)
            model = build_model(cfg, pc).train()
            seed_everything(5, pc)
            module = bigcode if name == "tiny-bigcode" else glm2
            seen, real = [], module.dropout

            def spy(x, p_, training, pc_, *, sharded):
                seen.append(sharded)
                return real(x, p_, training, pc_, sharded=sharded)
            module.dropout = spy
            try:
                ids, seg, labels = _batch(0)
                model(ids, segment_ids=seg, labels=labels)
            finally:
                module.dropout = real
            assert seen and all(s == sp for s in seen), (name, sp, seen)


def test_tp_dropout_streams_attention_heads_and_sequence_shards():
    run_distributed(_body_dropout_streams, 2)

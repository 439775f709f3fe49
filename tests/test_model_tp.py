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

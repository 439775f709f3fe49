"""Llama under tensor parallelism (gloo, 2 ranks): tp=2 reproduces tp=1 logits, per-token loss and gradients,
with sequence parallelism off and on, for K/V heads split over TP (GQA, 2 groups) and replicated on every rank
(1 K/V head < tp); the check catches a replicated-K/V gradient that is not summed over TP; KV-cached greedy
generation at tp=2 gives tp=1's tokens."""
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megaocto.config.model import ModelConfig
from megaocto.model import build_model
from megaocto.model.flops import num_params_per_rank
from megaocto.parallel.context import ParallelContext
from megaocto.parallel.grads import allreduce_sequence_parallel_grads
from megaocto.parallel.layers import gather_full_like, gather_full_state_dict

V, B, S = 1000, 2, 16
TOL = dict(atol=1e-5, rtol=1e-5)


def _batch():
    g = torch.Generator().manual_seed(100)
    ids = torch.randint(0, V, (B, S), generator=g)
    seg = torch.tensor([[1] * 9 + [2] * 7, [1] * 16])  # a packed row and a plain one
    return ids, seg, torch.roll(ids, -1, 1)


def _loss_backward(model, pc):
    ids, seg, labels = _batch()
    loss = model(ids, segment_ids=seg, labels=labels)
    loss.mean().backward()
    allreduce_sequence_parallel_grads(model, pc)
    return loss.detach()


def _grad_mismatches(ref, model, pc):
    ref_params = dict(ref.named_parameters())
    return [name for name, p in model.named_parameters()
            if not torch.allclose(gather_full_like(p.grad, p, pc), ref_params[name].grad, **TOL)]


def _build(cfg, pc, **kw):
    torch.manual_seed(1234)
    model = build_model(cfg, pc, **kw)
    with torch.no_grad():  # random norms, so a norm grad that is not reduced over TP shows
        gen = torch.Generator().manual_seed(9)
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
    return model


def _body_tp(rank, world_size):
    pc1 = ParallelContext.single()
    for sp, recompute in ((False, "none"), (True, "full")):
        pc2 = ParallelContext.init(tp=2, sequence_parallel=sp)
        for groups in (2, 1):
            cfg = ModelConfig.from_preset("tiny-llama", num_query_groups=groups)
            ref, model = _build(cfg, pc1), _build(cfg, pc2, recompute=recompute)
            attn = model.layers[0].self_attention
            assert attn.kv_split == (groups == 2) and attn.local_groups == 1
            full = gather_full_state_dict(model, pc2)
            for k, v in ref.state_dict().items():  # same seed -> same full weights at every TP size
                assert torch.equal(full[k], v), k
            assert sum(p.numel() for p in model.parameters()) == num_params_per_rank(cfg, 2)
            ids, seg, _ = _batch()
            with torch.no_grad():
                logits = model(ids, segment_ids=seg)
                parts = [torch.empty_like(logits) for _ in range(2)]
                dist.all_gather(parts, logits.contiguous(), group=pc2.tp_group)
                torch.testing.assert_close(torch.cat(parts, -1)[..., :V], ref(ids, segment_ids=seg)[..., :V], **TOL)
            torch.testing.assert_close(_loss_backward(model, pc2), _loss_backward(ref, pc1), **TOL)
            assert _grad_mismatches(ref, model, pc2) == [], (groups, sp)


def _body_kv_bug(rank, world_size):
    import megaocto.model.llama as llama

    pc1 = ParallelContext.single()
    cfg = ModelConfig.from_preset("tiny-llama", num_query_groups=1)
    for sp in (False, True):
        pc2 = ParallelContext.init(tp=2, sequence_parallel=sp)
        ref = _build(cfg, pc1)
        _loss_backward(ref, pc1)
        model = _build(cfg, pc2)
        saved = (llama.copy_to_tp, llama.gather_from_sp)
        real_gather = saved[1]
        llama.copy_to_tp = lambda x, pc: x  # the bug: replicated K/V output grad not summed over TP
        llama.gather_from_sp = lambda x, pc, dim=1, grad_is_partial=True: real_gather(x, pc, dim,
                                                                                     grad_is_partial=False)
        try:
            _loss_backward(model, pc2)
        finally:
            llama.copy_to_tp, llama.gather_from_sp = saved
        bad = _grad_mismatches(ref, model, pc2)
        assert [n for n in bad if "key_value" in n] == [f"layers.{i}.self_attention.key_value.weight"
                                                         for i in range(cfg.num_layers)], bad


def _body_generate(rank, world_size):
    """KV-cached greedy decoding at tp=2 (sequence parallelism on for training, switched off by generate) gives
    tp=1's tokens on both ranks, K/V split and replicated."""
    from megaocto.generation.generate import GenerationConfig, generate

    pc = ParallelContext.init(tp=2, sequence_parallel=True)
    prompts = [[5, 17, 300, 42, 8], [9, 99], [7]]
    gen = GenerationConfig(max_new_tokens=6)
    for groups in (2, 1):
        cfg = ModelConfig.from_preset("tiny-llama", num_query_groups=groups)
        model, ref = _build(cfg, pc).eval(), _build(cfg, ParallelContext.single()).eval()
        got = generate(model, prompts, gen, pc)
        both = [None, None]
        dist.all_gather_object(both, got, group=pc.tp_group)
        assert both[0] == both[1] == generate(ref, prompts, gen), groups


def _body(rank, world_size):  # one spawn for all checks (process start-up dominates)
    _body_tp(rank, world_size)
    _body_kv_bug(rank, world_size)
    _body_generate(rank, world_size)


def test_llama_tp2_matches_tp1_split_and_replicated_kv_and_catches_kv_grad_bug():
    run_distributed(_body, 2)

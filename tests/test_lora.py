"""LoRA on the tensor-parallel layers (megaocto/model/lora.py): step-0 model equals the base, the base is frozen
(no grads, no main_grad, no fp32 masters, no AdamW state), tp=2 (sequence parallel off and on) reproduces tp=1
loss and adapter gradients for every family, including replicated K/V projections."""
import pytest
import torch

from dist_utils import run_distributed
from megaocto.config.base import ConfigError
from megaocto.config.model import LoraConfig, ModelConfig
from megaocto.model import build_model
from megaocto.model.lora_memory import lora_params
from megaocto.parallel.context import ParallelContext
from megaocto.parallel.grads import allreduce_sequence_parallel_grads
from megaocto.parallel.layers import gather_full_like, shard_for_param

V, B, S = 1000, 2, 16
TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = {"tiny-bigcode": ["c_attn", "c_proj", "c_fc"],
           "tiny-bigcode-mha": ["c_attn", "c_proj", "c_fc"],
           "tiny-glm2": ["query_key_value", "dense", "up", "down"],
           "tiny-llama": ["q", "k", "v", "o", "gate", "up", "down"],
           "tiny-llama-mqa": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}


def _cfg(name, rank=4, **lora):
    overrides = {}
    preset = name
    if name == "tiny-bigcode-mha":
        preset, overrides = "tiny-bigcode", {"num_query_groups": 4}
    if name == "tiny-llama-mqa":  # one K/V head: replicated key_value at tp=2
        preset, overrides = "tiny-llama", {"num_query_groups": 1}
    return ModelConfig.from_preset(preset, **overrides,
                                   lora=LoraConfig(rank=rank, alpha=2.0 * rank, target_modules=TARGETS[name], **lora))


def _batch(step=0):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, V, (B, S), generator=g)
    seg = torch.tensor([[1] * 9 + [2] * 7, [1] * 16])
    return ids, seg, torch.roll(ids, -1, 1)


@torch.no_grad()
def randomize_adapters(model, pc, seed=7):
    """Non-zero B (and fresh A) drawn whole, each rank keeping its shard: the same adapters at every TP size."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            full = torch.randn(_full_shape(p, pc), generator=g) * 0.1
            p.copy_(shard_for_param(p, full, pc))


def _full_shape(p, pc):
    shape = list(p.shape)
    if getattr(p, "tensor_parallel", False):
        shape[p.partition_dim] *= pc.tp
    return shape


def test_step0_equals_base_and_base_frozen():
    from megaocto.training.optimizer import MixedPrecisionAdamW
    from megaocto.config.train import OptimizerConfig

    pc = ParallelContext.single()
    for name in TARGETS:
        cfg = _cfg(name)
        base_cfg = ModelConfig(**{**cfg.to_dict(), "lora": {}})
        torch.manual_seed(0)
        base = build_model(base_cfg, pc)
        torch.manual_seed(0)
        model = build_model(cfg, pc)
        ids, seg, labels = _batch()
        with torch.no_grad():
            assert torch.equal(model(ids, segment_ids=seg), base(ids, segment_ids=seg)), name
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora." in n for n in trainable), name
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.2 * sum(
            p.numel() for p in base.parameters())
        opt = MixedPrecisionAdamW(model, OptimizerConfig(lr=1e-3), pc, bf16=True)
        model(ids, segment_ids=seg, labels=labels).mean().backward()
        opt.step(1e-3)
        for n, p in model.named_parameters():
            if n in trainable:
                assert p.main_grad is not None
            else:
                assert p.grad is None and getattr(p, "main_grad", None) is None, n
        # fp32 masters and AdamW state exist for the adapters only
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert sum(m.numel() for m in opt.masters) == n_train == opt.grad_buffer.numel()
        state = [s for s in opt.optimizer.state.values()]
        assert sum(s["exp_avg"].numel() for s in state) == n_train


def test_bad_targets_one_line_errors():
    with pytest.raises(ConfigError, match="'w_pack' is not a llama layer"):
        ModelConfig.from_preset("tiny-llama", lora=LoraConfig(rank=4, target_modules=["w_pack"]))
    with pytest.raises(ConfigError, match="already covers query and key_value"):
        ModelConfig.from_preset("tiny-bigcode", lora=LoraConfig(rank=4, target_modules=["c_attn", "query"]))
    with pytest.raises(ConfigError, match="only with multi-query"):
        ModelConfig.from_preset("tiny-bigcode", num_query_groups=4,
                                lora=LoraConfig(rank=4, target_modules=["query"]))
    with pytest.raises(ConfigError, match="match no bigcode layer"):
        ModelConfig.from_preset("tiny-bigcode", lora=LoraConfig(rank=4, target_modules=["q_attn"]))


def _loss_backward(model, pc, step=0):
    ids, seg, labels = _batch(step)
    loss = model(ids, segment_ids=seg, labels=labels)
    loss.mean().backward()
    allreduce_sequence_parallel_grads(model, pc)
    return loss.detach()


def _body_tp(rank, world_size):
    pc1 = ParallelContext.single()
    for sp, recompute in ((False, "none"), (True, "full")):
        pc2 = ParallelContext.init(tp=2, sequence_parallel=sp)
        for name in TARGETS:
            cfg = _cfg(name)
            torch.manual_seed(1234)
            ref = build_model(cfg, pc1)
            randomize_adapters(ref, pc1)
            torch.manual_seed(1234)
            model = build_model(cfg, pc2, recompute=recompute)
            randomize_adapters(model, pc2)
            # model-info's torch-free count of the adapters one TP rank holds
            assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_params(cfg, 2)[1], name
            assert sum(p.numel() for p in ref.parameters() if p.requires_grad) == lora_params(cfg, 1)[0], name
            torch.testing.assert_close(_loss_backward(model, pc2), _loss_backward(ref, pc1), **TOL)
            ref_params = dict(ref.named_parameters())
            checked = 0
            for n, p in model.named_parameters():
                if not p.requires_grad:
                    assert p.grad is None, n
                    continue
                full = gather_full_like(p.grad, p, pc2)
                torch.testing.assert_close(full, ref_params[n].grad, **TOL, msg=f"{name} sp={sp} {n}")
                assert ref_params[n].grad.abs().sum() > 0, n
                checked += 1
            assert checked >= 4 * cfg.num_layers, (name, checked)
            # merging the sharded adapters into the sharded weights keeps the function at tp=2
            from megaocto.model.lora import merge_lora_

            ids, seg, labels = _batch(1)
            with torch.no_grad():
                before = model(ids, segment_ids=seg, labels=labels)
                merge_lora_(model)
                torch.testing.assert_close(model(ids, segment_ids=seg, labels=labels), before, **TOL)


def test_lora_tp2_matches_tp1_all_families_sp_off_and_on():
    run_distributed(_body_tp, 2)


def test_memory_estimate_counts_frozen_base_as_weights_only(capsys):
    from megaocto.cli import main
    from megaocto.model.flops import num_params_per_rank
    from megaocto.model.memory import estimate_memory

    cfg = ModelConfig.from_preset("starcoder-15b", seq_length=2048,
                                  lora=LoraConfig(rank=16, alpha=32, target_modules=["c_proj", "c_attn", "q_attn"]))
    full = ModelConfig.from_preset("starcoder-15b", seq_length=2048)
    n, m = num_params_per_rank(full, 2), lora_params(cfg, 2)[1]
    assert 0 < m < n / 100
    lora_mem = estimate_memory(cfg, tp=2, dp=4, recompute="selective")
    full_mem = estimate_memory(full, tp=2, dp=4, recompute="selective")
    assert lora_mem.weights == (n + m) * 2 and lora_mem.grads == m * 4 and lora_mem.optimizer == m * 12
    assert lora_mem.activations == full_mem.activations and lora_mem.total < full_mem.total / 5
    assert main(["model-info", "--preset", "starcoder-15b", "--tp", "2", "--lora-rank", "16",
                 "--lora-targets", "c_proj,c_attn,q_attn"]) == 0
    assert f"{lora_params(cfg, 1)[0]:,} adapter parameters" in capsys.readouterr().out


def test_lora_dropout_replayed_by_full_recompute():
    """Full recompute replays the adapters' dropout masks (the model's own dropout is off here)."""
    from megaocto.parallel.random import seed_everything

    pc = ParallelContext.single()
    cfg = _cfg("tiny-llama", dropout=0.3)
    out = {}
    for recompute in ("none", "full"):
        torch.manual_seed(0)
        model = build_model(cfg, pc, recompute=recompute).train()
        randomize_adapters(model, pc)
        seed_everything(5, pc)
        loss = _loss_backward(model, pc)
        out[recompute] = (loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        model.eval()
        with torch.no_grad():
            ids, seg, labels = _batch()
            assert not torch.allclose(model(ids, segment_ids=seg, labels=labels), loss)  # dropout was active
    assert torch.equal(out["none"][0], out["full"][0])
    for n, g in out["none"][1].items():
        torch.testing.assert_close(out["full"][1][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_merge_lora_in_place_keeps_the_function():
    from megaocto.model.lora import merge_lora_

    pc = ParallelContext.single()
    for name in TARGETS:
        torch.manual_seed(0)
        model = build_model(_cfg(name), pc).eval()
        randomize_adapters(model, pc)
        ids, seg, _ = _batch()
        with torch.no_grad():
            before = model(ids, segment_ids=seg)
            merge_lora_(model)
            assert not any(".lora." in k for k in model.state_dict())
            torch.testing.assert_close(model(ids, segment_ids=seg), before, atol=1e-5, rtol=1e-5)

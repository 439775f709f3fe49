"""optimizer.name=adafactor: torch.optim.Adafactor on the fp32 masters (updates equal torch's on a plain copy),
HF's absolute step (adafactor_scale_parameter=false, Magicoder's Trainer) equal to transformers' Adafactor, exact
resume with the state in the checkpoint, no clipping with clip_grad 0, and the refusals (zero1, tp>1)."""
import io

import pytest
import torch

from megaocto.config.base import ConfigError
from megaocto.config.loader import load_run_config
from megaocto.config.model import ModelConfig
from megaocto.config.train import OptimizerConfig
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext
from megaocto.training.loop import train
from megaocto.training.optimizer import MixedPrecisionAdamW


def _model_and_grads(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset("tiny-llama", seq_length=16), ParallelContext.single(), dtype=dtype)
    grads = [[torch.randn(p.shape) * 10 ** -(1 + i % 3) for p in model.parameters()] for i in range(4)]
    return model, grads


def _run_ours(model, cfg, grads, lrs, bf16=False):
    opt = MixedPrecisionAdamW(model, cfg, ParallelContext.single(), bf16=bf16)
    for g, lr in zip(grads, lrs):
        opt.zero_grad()
        for p, gp in zip(opt.params, g):
            p.main_grad.copy_(gp)
        opt.step(lr)
    return opt


@pytest.mark.parametrize("bf16", [False, True])
def test_adafactor_update_equals_torch_adafactor_on_a_plain_copy(bf16):
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, grads = _model_and_grads(dtype=dtype)
    plain = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]  # fp32 masters' start
    cfg = OptimizerConfig(name="adafactor", lr=3e-2, weight_decay=0.1)
    lrs = [3e-2, 2e-2, 1e-2, 5e-3]
    opt = _run_ours(model, cfg, grads, lrs, bf16=bf16)
    assert isinstance(opt.optimizer, torch.optim.Adafactor)
    ref = torch.optim.Adafactor([{"params": [p for p in plain if p.ndim >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in plain if p.ndim < 2], "weight_decay": 0.0}], lr=3e-2)
    for g, lr in zip(grads, lrs):
        for p, gp in zip(plain, g):
            p.grad = gp.clone()
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
    moved = 0
    start = _model_and_grads(dtype=dtype)[0].parameters()
    for (name, p), m, q, p0 in zip(model.named_parameters(), opt.masters, plain, start):
        assert torch.equal(m.detach(), q.detach()), name  # bitwise: the same torch update on the same fp32 masters
        assert torch.equal(p.detach(), q.detach().to(dtype)), name  # bf16: the params are the rounded masters
        moved += not torch.equal(p.detach(), p0.detach())
    assert moved == len(plain)
    assert {k for st in opt.optimizer.state.values() for k in st} == {"step", "row_var", "col_var", "variance"}


def test_absolute_step_equals_transformers_adafactor_without_parameter_scaling():
    from transformers.optimization import Adafactor as HFAdafactor

    model, grads = _model_and_grads(1)
    plain = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    lr, wd = 5e-3, 0.05
    cfg = OptimizerConfig(name="adafactor", lr=lr, weight_decay=wd, adafactor_scale_parameter=False,
                          adafactor_eps1=1e-15)
    opt = _run_ours(model, cfg, grads, [lr] * len(grads))
    assert opt.adafactor_capped_steps == 0
    hf = HFAdafactor([{"params": [p for p in plain if p.ndim >= 2], "weight_decay": wd},
                      {"params": [p for p in plain if p.ndim < 2], "weight_decay": 0.0}], lr=lr, eps=(1e-30, 1e-3),
                     clip_threshold=1.0, decay_rate=-0.8, beta1=None, scale_parameter=False, relative_step=False,
                     warmup_init=False)
    for g in grads:
        for p, gp in zip(plain, g):
            p.grad = gp.clone()
        hf.step()
    start = _model_and_grads(1)[0]
    for (name, p), q, p0 in zip(model.named_parameters(), plain, start.parameters()):
        step_ours, step_hf = p.detach() - p0.detach(), q.detach() - p0.detach()
        assert step_hf.abs().max() > 0
        torch.testing.assert_close(step_ours, step_hf, rtol=1e-4, atol=3e-7, msg=name)
    # torch's relative step would have been ~RMS(param) times smaller for the matrices: the switch matters
    rel = _run_ours(_model_and_grads(1)[0], OptimizerConfig(name="adafactor", lr=lr, weight_decay=wd), grads,
                    [lr] * len(grads))
    w = next(n for n, p in model.named_parameters() if p.ndim == 2)
    dw_abs = dict(model.named_parameters())[w] - dict(start.named_parameters())[w]
    dw_rel = dict(zip([n for n, _ in model.named_parameters()], rel.params))[w] - dict(start.named_parameters())[w]
    assert dw_rel.abs().mean() < 0.2 * dw_abs.abs().mean()


def _cfg(tmp_path, *extra, iters=6):
    return load_run_config(None, [
        "--model.preset", "tiny-llama", "--model.seq_length", "32", "--train.iters", str(iters),
        "--train.micro_batch_size", "2", "--train.global_batch_size", "4", "--train.dtype", "bf16",
        "--train.seed", "3", "--optimizer.name", "adafactor", "--optimizer.lr", "5e-3",
        "--optimizer.adafactor_scale_parameter", "false", "--optimizer.adafactor_eps1", "1e-15",
        "--optimizer.weight_decay", "0", "--optimizer.clip_grad", "0", "--schedule.style", "linear",
        "--schedule.warmup_iters", "2", "--model.hidden_dropout", "0.1",
        "--logging.run_dir", str(tmp_path / "run"), "--logging.log_interval", "1", "--data.num_workers", "0", *extra])


def test_adafactor_exact_resume_bf16(tmp_path):
    straight = train(_cfg(tmp_path, "--checkpoint.save", str(tmp_path / "a")), stream=io.StringIO())
    assert list(straight.losses) == list(range(1, 7)) and straight.losses[6] < straight.losses[1]
    save = str(tmp_path / "b")
    first = train(_cfg(tmp_path, "--checkpoint.save", save, "--train.exit_interval", "3"), stream=io.StringIO())
    assert first.exit_reason == "exit_interval" and first.iteration == 3
    state = torch.load(f"{save}/iter_0000003/mp_rank_00/model_optim_rng.pt", weights_only=False)
    saved = state["optimizer"]["optimizer"]["state"]
    assert saved and all("row_var" in s or "variance" in s for s in saved.values())  # Adafactor's state is saved
    second = train(_cfg(tmp_path, "--checkpoint.save", save, "--checkpoint.load", save), stream=io.StringIO())
    assert list(second.losses) == [4, 5, 6]
    assert {**first.losses, **second.losses} == straight.losses  # bitwise equal losses
    # no clipping with clip_grad 0: the logged norm is the plain norm, and the update was not scaled by it
    assert all(n > 0 for n in straight.grad_norms.values())


def test_adafactor_refuses_zero1_and_tensor_parallel(tmp_path):
    with pytest.raises(ConfigError, match="train.zero1 does not support optimizer.name=adafactor.*zero1=false"):
        _cfg(tmp_path, "--train.zero1", "true").validate()
    with pytest.raises(ConfigError, match="adafactor needs parallel.tp=1"):
        _cfg(tmp_path, "--parallel.tp", "2").validate()
    with pytest.raises(ConfigError, match="adafactor_eps1=1e-30 is below"):
        _cfg(tmp_path, "--optimizer.adafactor_eps1", "1e-30").validate()
    with pytest.raises(ConfigError, match="optimizer.name must be one of adamw, adafactor"):
        _cfg(tmp_path, "--optimizer.name", "lion").validate()


def test_resuming_adamw_state_with_adafactor_is_a_clear_error(tmp_path):
    save = str(tmp_path / "ck")
    train(_cfg(tmp_path, "--checkpoint.save", save, "--optimizer.name", "adamw", iters=1), stream=io.StringIO())
    with pytest.raises(ConfigError, match="optimizer state is adamw's but optimizer.name=adafactor"):
        train(_cfg(tmp_path, "--checkpoint.save", save, iters=2), stream=io.StringIO())


def test_absolute_step_past_torchs_cap_is_counted_and_warned():
    model, grads = _model_and_grads(2)
    cfg = OptimizerConfig(name="adafactor", lr=0.9, weight_decay=0.0, adafactor_scale_parameter=False)
    with pytest.warns(UserWarning, match="exceeds torch's cap"):
        opt = _run_ours(model, cfg, grads, [0.9] * len(grads))
    assert opt.adafactor_capped_steps >= 1

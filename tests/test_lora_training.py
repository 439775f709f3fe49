"""LoRA training runs: exact resume (6 == 3 + save + resume 3, bitwise, LoRA dropout on), adapter-only checkpoints
with a base reference that the resume loads and fingerprints, frozen base, bf16 + full recompute."""
import io
import os

import pytest
import torch

from megaocto import checkpoint as ckpt
from megaocto.config.base import ConfigError
from megaocto.config.loader import load_run_config
from megaocto.training.loop import Trainer, train

LORA = ("--model.lora.rank", "4", "--model.lora.alpha", "8", "--model.lora.dropout", "0.1",
        "--model.lora.target_modules", "[c_attn, c_proj]")


def _cfg(tmp_path, *extra, iters=6):
    return load_run_config(None, [
        "--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--train.iters", str(iters),
        "--train.micro_batch_size", "2", "--train.global_batch_size", "4", "--train.dtype", "fp32",
        "--train.seed", "7", "--optimizer.lr", "5e-3", "--schedule.warmup_iters", "2",
        "--logging.run_dir", str(tmp_path / "run"), "--logging.log_interval", "1", "--data.num_workers", "0", *extra])


def _quiet(cfg):
    return train(cfg, stream=io.StringIO())


def _state(save, it):
    return torch.load(ckpt.model_file(save, it, 0), weights_only=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    save = str(tmp / "base")
    _quiet(_cfg(tmp, "--checkpoint.save", save, iters=2))
    return save


def test_lora_exact_resume_adapter_checkpoint_and_frozen_base(tmp_path, base):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    straight = _quiet(_cfg(tmp_path, *LORA, "--checkpoint.load", base, "--checkpoint.save", a))
    assert list(straight.losses) == list(range(1, 7))
    first = _quiet(_cfg(tmp_path, *LORA, "--checkpoint.load", base, "--checkpoint.save", b,
                        "--train.exit_interval", "3"))
    assert first.iteration == 3
    second = _quiet(_cfg(tmp_path, *LORA, "--checkpoint.load", base, "--checkpoint.save", b))
    assert list(second.losses) == [4, 5, 6]
    assert {**first.losses, **second.losses} == straight.losses, "resumed LoRA run diverged"

    state, base_state = _state(b, 6), _state(base, 2)
    assert state["model"] and all(".lora." in k for k in state["model"])  # adapters only
    for k, v in _state(a, 6)["model"].items():
        assert torch.equal(v, state["model"][k]), k
    ref = state["lora_base"]
    assert ref["path"] == os.path.abspath(base) and ref["iteration"] == 2 and len(ref["fingerprint"]) == 16
    assert os.path.getsize(ckpt.model_file(b, 6, 0)) < os.path.getsize(ckpt.model_file(base, 2, 0)) / 4
    # optimizer state of the adapters only
    unique = {v.untyped_storage().data_ptr(): v for v in state["model"].values()}  # shared A saved once
    assert len(unique) < len(state["model"])
    n_adapter = sum(v.numel() for v in unique.values())
    n_state = sum(t.numel() for s in state["optimizer"]["optimizer"]["state"].values() for k, t in s.items()
                  if torch.is_tensor(t) and k == "exp_avg")
    assert n_state == n_adapter

    # the frozen base is unchanged after training, and the resume loaded it from the reference
    resumed = Trainer(_cfg(tmp_path, *LORA, "--checkpoint.save", b, iters=6), stream=io.StringIO())
    assert resumed.iteration == 6
    own = resumed.model.state_dict()
    for k, v in base_state["model"].items():
        assert torch.equal(own[k], v), k


def test_lora_resume_refuses_a_changed_base(tmp_path, base):
    import shutil

    moved = str(tmp_path / "base_copy")
    shutil.copytree(base, moved)
    save = str(tmp_path / "s")
    _quiet(_cfg(tmp_path, *LORA, "--checkpoint.load", moved, "--checkpoint.save", save, iters=2))
    path = ckpt.model_file(moved, 2, 0)
    state = torch.load(path, weights_only=True)
    state["model"]["final_layernorm.weight"] += 1.0
    torch.save(state, path)
    with pytest.raises(ConfigError, match="fingerprint .* differs"):
        Trainer(_cfg(tmp_path, *LORA, "--checkpoint.save", save, iters=4), stream=io.StringIO())
    shutil.rmtree(moved)
    with pytest.raises(ConfigError, match="base checkpoint .* is gone"):
        Trainer(_cfg(tmp_path, *LORA, "--checkpoint.save", save, iters=4), stream=io.StringIO())


def test_lora_bf16_recompute_trains_adapters_only(tmp_path, base):
    tr = Trainer(_cfg(tmp_path, *LORA, "--checkpoint.load", base, "--train.dtype", "bf16", "--train.recompute",
                      "full", iters=3), stream=io.StringIO())
    n_adapter = sum(p.numel() for n, p in tr.model.named_parameters() if ".lora." in n)
    assert tr.optimizer.grad_buffer.numel() == n_adapter == sum(m.numel() for m in tr.optimizer.masters)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    res = tr.run()
    assert res.iteration == 3 and all(v == v for v in res.losses.values())
    after = tr.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora." in k and k.endswith(".B") or ".lora." in k for k in changed), changed
    assert any(k.endswith(".B") for k in changed)


def _dist_cfg(save, *extra):
    return load_run_config(None, [
        "--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--train.iters", "4",
        "--train.micro_batch_size", "2", "--train.global_batch_size", "4", "--train.dtype", "fp32",
        "--train.seed", "11", "--optimizer.lr", "5e-3", "--schedule.warmup_iters", "1", *LORA[:4],
        "--model.lora.target_modules", "[c_attn, c_proj, c_fc]", "--model.lora.init", "gaussian",
        "--checkpoint.save", save, "--logging.run_dir", save + "_run", "--logging.jsonl", "false",
        "--data.num_workers", "0", *extra])


def _body_dist(rank, world_size, root, reference):
    import torch.distributed as dist

    for name, args in (("dp2", ("--parallel.tp", "1")), ("tp2sp", ("--parallel.tp", "2", "--parallel.sequence_parallel",
                                                                    "true")),
                       ("dp2zero1", ("--parallel.tp", "1", "--train.zero1", "true"))):
        tr = Trainer(_dist_cfg(os.path.join(root, name), *args), stream=io.StringIO())
        n_adapter = sum(p.numel() for n, p in tr.model.named_parameters() if ".lora." in n)
        assert tr.optimizer.grad_buffer.numel() <= n_adapter + 64 * len(tr.optimizer.buckets)  # only adapter grads
        losses = tr.run().losses
        for step, want in reference.items():
            assert losses[step] == pytest.approx(want, rel=1e-5, abs=1e-5), f"{name} step {step}"
        if name.startswith("dp2"):  # the DP replicas hold the same adapters
            for n, p in tr.model.named_parameters():
                other = p.detach().clone()
                dist.broadcast(other, 0, group=tr.pc.dp_group)
                assert torch.equal(other, p.detach()), n


def test_lora_dp2_tp2sp_zero1_match_single_process(tmp_path):
    from dist_utils import run_distributed

    reference = train(_dist_cfg(str(tmp_path / "ref")), stream=io.StringIO()).losses
    assert len(reference) == 4
    run_distributed(_body_dist, 2, str(tmp_path), reference)


def test_recipe_configs_and_launcher_run_tiny_lora(tmp_path):
    """launch/configs/octocoder-15b-lora.yaml carries the published LoRA hyper-parameters; MODEL=octocoder-lora
    PRESET=tiny bash launch/finetune.sh trains tiny LoRA at tp=2 (2 CPU processes) and saves adapter checkpoints."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = load_run_config(str(root / "launch" / "configs" / "octocoder-15b-lora.yaml"))
    lora = cfg.model.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules) == (16, 32, 0.05, ["c_proj", "c_attn", "q_attn"])
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.schedule.style, cfg.schedule.warmup_iters) == \
        (5e-4, 0.05, "cosine", 5)
    assert cfg.model.seq_length == 2048 and cfg.train.dtype == "bf16"
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MEGAOCTO_ROOT=str(root), PYTHON=sys.executable, MODEL="octocoder-lora", PRESET="tiny", TP="2",
               RUN_DIR=str(run), SAVE=str(run / "ck"), LOAD=str(run / "ck"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(root))
    proc = subprocess.run(["bash", str(root / "launch" / "finetune.sh"), "--train.iters", "2", "--eval.interval", "0",
                           "--checkpoint.save_interval", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(ckpt.model_file(str(run / "ck"), 2, 1), weights_only=True)  # TP rank 1's adapter shards
    assert state["model"] and all(".lora." in k for k in state["model"]) and state["lora_base"]["path"] is None


def test_lora_on_packed_finetuning_data_resumes_exactly(tmp_path, base):
    """Packed SFT rows (several examples per row, loss on targets): LoRA trains and resumes bitwise."""
    import numpy as np

    from megaocto.data.indexed import MMapIndexedDatasetBuilder, dataset_prefix

    sft = str(tmp_path / "sft")
    r = np.random.RandomState(0)
    for key, lo, hi, off in (("inputs", 2, 12, 100), ("targets", 2, 8, 300)):
        b = MMapIndexedDatasetBuilder(dataset_prefix(sft, key) + ".bin", np.uint16)
        for i in range(60):
            b.add_document(np.full(r.randint(lo, hi), off + i))
        b.finalize(dataset_prefix(sft, key) + ".idx")
    packed = ("--data.kind", "packed", "--data.paths", f"[{sft}]", "--data.pad_id", "3", "--data.eod_id", "0",
              "--data.split", "100,0,0", "--eval.interval", "0", *LORA, "--checkpoint.load", base)
    straight = _quiet(_cfg(tmp_path, *packed, "--checkpoint.save", str(tmp_path / "a"), iters=4))
    save = str(tmp_path / "b")
    first = _quiet(_cfg(tmp_path, *packed, "--checkpoint.save", save, "--train.exit_interval", "2", iters=4))
    second = _quiet(_cfg(tmp_path, *packed, "--checkpoint.save", save, iters=4))
    assert first.iteration == 2 and list(second.losses) == [3, 4]
    assert {**first.losses, **second.losses} == straight.losses

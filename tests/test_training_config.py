"""Training building blocks without a model: run-config loading, LR schedules, MFU, sampler, atomic checkpoints.

Failures here point at megaocto/config/loader.py, megaocto/training/{schedule,metrics,sampler,checkpoint}.py.
"""
import json
import math
import os
import re

import pytest
import torch

from megaocto.config.base import ConfigError
from megaocto.config.loader import config_docs_markdown, load_run_config
from megaocto.config.train import RunConfig, ScheduleConfig, TrainConfig
from megaocto.parallel.context import ParallelContext
from megaocto import checkpoint as ckpt
from megaocto.training.metrics import model_tflops_and_mfu, peak_tflops
from megaocto.training.sampler import PretrainingSampler
from megaocto.training.schedule import LRSchedule

YAML = """\
model:
  preset: tiny-bigcode
  num_layers: 3
train:
  iters: 10
  dtype: fp32
optimizer:
  lr: 1e-3
"""


def test_yaml_preset_then_fields_and_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    cfg = load_run_config(str(path), ["--train.micro-batch-size", "2", "--data.paths=[a,b]", "--checkpoint.finetune",
                                      "--logging.peak_tflops", "none", "--schedule.decay_iters=7",
                                      "--train.debug_nan_iters", "3,4", "--optimizer.weight_decay", "0"])
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 64  # preset value kept, field overridden
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 0.0
    assert cfg.train.micro_batch_size == 2 and cfg.train.dtype == "fp32"
    assert cfg.data.paths == ["a", "b"] and cfg.checkpoint.finetune is True
    assert cfg.logging.peak_tflops is None and cfg.schedule.decay_iters == 7
    assert cfg.train.debug_nan_iters == [3, 4]


def test_toml_and_errors_name_file_line_and_suggest(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "tiny-bigcode"\n\n[train]\niters = 5\nmicro_batch_sise = 2\n')
    with pytest.raises(ConfigError, match=r"run.toml:6: unknown key 'train.micro_batch_sise'; did you mean "
                                          r"'train.micro_batch_size'"):
        load_run_config(str(toml))
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(YAML + "optimiser:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"run.yaml:9: unknown key 'optimiser'; did you mean 'optimizer'"):
        load_run_config(str(yaml_path))
    yaml_path.write_text(YAML)
    with pytest.raises(ConfigError, match=r"command line --train.iters: train.iters: expected an integer"):
        load_run_config(str(yaml_path), ["--train.iters", "ten"])
    with pytest.raises(ConfigError, match="did you mean 'optimizer.lr'"):
        load_run_config(str(yaml_path), ["--optimizer.lrr", "1"])
    with pytest.raises(ConfigError, match="exactly one of train.iters"):
        load_run_config(str(yaml_path), ["--train.samples", "100"])
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_run_config(None, ["--model.preset", "nope", "--train.iters", "1"])
    ok = load_run_config(str(toml).replace("run.toml", "run.yaml"), [])
    assert ok.train.iters == 10


def test_microbatch_validation_and_docs():
    t = TrainConfig(micro_batch_size=2, global_batch_size=8, iters=1)
    assert t.microbatches(dp=2) == 2 and t.microbatches(dp=4) == 1
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size\\*dp = 2\\*3"):
        t.microbatches(dp=3)
    table = config_docs_markdown(RunConfig)
    assert "| `train.global_batch_size` |" in table and "| `model.hidden_size` |" in table
    assert all(row.count("|") >= 4 and not row.endswith("|  |") for row in table.splitlines())


def test_lr_schedules_first_step_not_zero():
    for style in ("constant", "linear", "cosine", "inverse_sqrt"):
        s = LRSchedule.from_config(ScheduleConfig(style=style, warmup_iters=4, min_lr=1e-5), 1e-3, 20)
        assert s.lr_at(1) == pytest.approx(2.5e-4)  # max_lr * 1/warmup, never 0 (Megatron's quirk avoided)
        assert s.lr_at(4) == pytest.approx(1e-3)
    cos = LRSchedule(1e-3, 1e-4, "cosine", 0, 10)
    assert cos.lr_at(1) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (math.cos(math.pi * 0.1) + 1))
    assert cos.lr_at(5) == pytest.approx(1e-4 + 0.9e-3 * 0.5) and cos.lr_at(10) == cos.lr_at(50) == 1e-4
    lin = LRSchedule(1e-3, 0.0, "linear", 2, 12)
    assert lin.lr_at(7) == pytest.approx(0.5e-3) and lin.lr_at(12) == 0.0
    inv = LRSchedule(1e-3, 0.0, "inverse_sqrt", 4, 100)
    assert inv.lr_at(16) == pytest.approx(1e-3 * 2 / 4)
    frac = LRSchedule.from_config(ScheduleConfig(style="cosine", warmup_fraction=0.1), 1e-3, 50)
    assert frac.warmup_steps == 5 and frac.lr_at(1) == pytest.approx(2e-4)
    short = LRSchedule(1e-3, 0.0, "cosine", 20, 10)  # warmup longer than the run: ramp, then min_lr
    assert short.lr_at(10) == pytest.approx(5e-4) and short.lr_at(21) == 0.0
    with pytest.raises(ConfigError, match="decay steps"):
        LRSchedule(1e-3, 0.0, "linear", 0, 0)


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops(None, "bf16") is None and peak_tflops("cpu", "fp32") is None
    tflops, mfu = model_tflops_and_mfu(6e9, 1e4, 989.4)
    assert tflops == pytest.approx(60.0) and mfu == pytest.approx(60.0 / 989.4)
    assert model_tflops_and_mfu(6e9, 1e4, None)[1] is None


def test_sampler_resumes_with_next_sample_and_splits_dp():
    per_rank = [list(PretrainingSampler(20, 0, 2, r, 2)) for r in range(2)]
    assert per_rank[0][:2] == [[0, 1], [4, 5]] and per_rank[1][:2] == [[2, 3], [6, 7]]
    assert len(per_rank[0]) == 5
    resumed = list(PretrainingSampler(20, 8, 2, 1, 2))
    assert resumed == per_rank[1][2:]  # continues exactly after 8 consumed samples
    assert list(PretrainingSampler(7, 4, 2, 0, 1)) == [[4, 5]]  # trailing partial batch dropped
    with pytest.raises(ValueError, match="past the end"):
        PretrainingSampler(10, 12, 1, 0, 1)


def _state(v):
    return {"model": {"w": torch.full((3,), float(v))}, "iteration": v, "data": {"consumed_samples": 4 * v}}


def test_checkpoint_atomic_keep_last_and_tp_check(tmp_path, monkeypatch):
    pc = ParallelContext.single()
    save = str(tmp_path / "ck")
    for it in (1, 2, 3):
        ckpt.save_checkpoint(save, it, _state(it), {"consumed_samples": 4 * it}, pc, keep_last=2)
    assert ckpt.list_checkpoints(save) == [2, 3] and ckpt.read_tracker(save) == 3
    assert os.path.exists(os.path.join(save, "iter_0000003", "mp_rank_00", "model_optim_rng.pt"))
    meta = json.load(open(os.path.join(save, "iter_0000003", "metadata.json")))
    assert (meta["iteration"], meta["tp"], meta["pp"], meta["dp"], meta["consumed_samples"]) == (3, 1, 1, 1, 12)

    # crash after the rank files are written, before the rename: iter_3 and the tracker are untouched
    def boom():
        raise RuntimeError("killed mid-save")
    with pytest.raises(RuntimeError, match="killed"):
        ckpt.save_checkpoint(save, 4, _state(4), {}, pc, fail_after_rank_files=boom)
    assert ckpt.read_tracker(save) == 3 and ckpt.list_checkpoints(save) == [2, 3]
    state, _, it = ckpt.load_checkpoint(save, pc)
    assert it == 3 and torch.equal(state["model"]["w"], torch.full((3,), 3.0))

    # crash while replacing the tracker: iter_5 is complete, the tracker still names iter_3
    real_replace = os.replace

    def failing_replace(src, dst):
        if dst.endswith(ckpt.TRACKER):
            raise OSError("disk full")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(save, 5, _state(5), {}, pc)
    monkeypatch.setattr(os, "replace", real_replace)
    assert ckpt.read_tracker(save) == 3
    assert ckpt.load_checkpoint(save, pc)[2] == 3
    ckpt.save_checkpoint(save, 6, _state(6), {}, pc)  # next save cleans up the leftover temp dir
    assert not [n for n in os.listdir(save) if n.endswith(".tmp")] and ckpt.read_tracker(save) == 6

    # crash while re-saving iteration 6 itself, between swapping the old copy aside and renaming the new one in
    def failing_swap(src, dst):
        if src.endswith(".tmp"):
            raise OSError("killed between renames")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", failing_swap)
    with pytest.raises(OSError, match="between renames"):
        ckpt.save_checkpoint(save, 6, _state(7), {}, pc)
    monkeypatch.setattr(os, "replace", real_replace)
    state, _, it = ckpt.load_checkpoint(save, pc)
    assert it == 6 and torch.equal(state["model"]["w"], torch.full((3,), 6.0))

    two = ParallelContext(tp=2, world_size=2)
    with pytest.raises(ConfigError, match="saved with tp=1, pp=1 but this run uses tp=2, pp=1"):
        ckpt.load_checkpoint(save, two)
    ckpt.save_checkpoint(save, 7, _state(7), {}, pc)
    assert not [n for n in os.listdir(save) if n.endswith((".old", ".tmp"))]
    os.remove(os.path.join(save, "iter_0000007", "metadata.json"))  # a Megatron checkpoint: layout from mp_rank_*
    os.makedirs(os.path.join(save, "iter_0000007", "mp_rank_01"))
    with pytest.raises(ConfigError, match="saved with tp=2, pp=1 but this run uses tp=1"):
        ckpt.load_checkpoint(save, pc)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ckpt.TRACKER).write_text("latest\n")
    with pytest.raises(ConfigError, match="latest_checkpointed_iteration.txt:1"):
        ckpt.read_tracker(str(tmp_path / "bad"))


def test_docs_list_every_training_field():
    from megaocto.config.loader import training_docs_markdown

    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "training.md")).read()
    assert training_docs_markdown() in docs, "docs/training.md is stale: paste `python -m megaocto.config.loader`"


KILL_SCRIPT = """
import os, sys, torch
from megaocto.parallel.context import ParallelContext
from megaocto import checkpoint as ckpt
pc = ParallelContext.single()
ckpt.save_checkpoint(sys.argv[1], 1, {"model": {"w": torch.ones(2)}}, {}, pc)
ckpt.save_checkpoint(sys.argv[1], 2, {"model": {"w": torch.zeros(2)}}, {}, pc,
                     fail_after_rank_files=lambda: os._exit(9))  # hard kill: no cleanup code runs
"""


def test_checkpoint_survives_hard_kill_mid_save(tmp_path):
    import subprocess
    import sys

    save = str(tmp_path / "ck")
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, save], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert ckpt.read_tracker(save) == 1 and ckpt.list_checkpoints(save) == [1]
    assert any(n.endswith(".tmp") for n in os.listdir(save))  # the half-written checkpoint is only a temp dir
    state, _, it = ckpt.load_checkpoint(save, ParallelContext.single())
    assert it == 1 and torch.equal(state["model"]["w"], torch.ones(2))


def test_did_you_mean_suggests_full_dotted_keys():
    for flag, want in (("--model.presett", "model.preset"), ("--trian.iters", "train.iters"),
                       ("--optimiser.lr", "optimizer.lr"), ("--checkpoint.overide_scheduler", "checkpoint.override_scheduler")):
        with pytest.raises(ConfigError, match=rf"unknown key .*did you mean '{re.escape(want)}'"):
            load_run_config(None, [flag, "1", "--train.iters", "2"])


def test_bare_flag_only_for_bool_fields():
    cfg = load_run_config(None, ["--checkpoint.finetune", "--train.iters", "5", "--checkpoint.no_load_rng"])
    assert cfg.checkpoint.finetune and cfg.checkpoint.no_load_rng and cfg.train.iters == 5
    for bare, argv in (("--checkpoint.save", ["--checkpoint.save", "--train.iters", "5"]),
                       ("--train.exit_interval", ["--train.iters", "5", "--train.exit_interval"]),
                       ("--model.preset", ["--train.iters", "5", "--model.preset"])):
        with pytest.raises(ConfigError, match=rf"command line {re.escape(bare)}: {re.escape(bare)} needs a value"):
            load_run_config(None, argv)


def test_train_cli_help_and_missing_config(capsys):
    import pytest

    from megaocto.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--section.field VALUE" in out and "docs/training.md" in out
    assert main(["train"]) == 2
    assert "--config FILE is required (or give every required field as --section.field VALUE" in \
        capsys.readouterr().err
    assert main(["train", "--model.preset", "tiny-bigcode"]) == 2
    assert "no --config given" in capsys.readouterr().err


def test_save_override_moves_a_load_that_equals_save_in_the_file(tmp_path):
    """`SAVE=/x` / `--checkpoint.save /x` on a config that resumes from its own save dir (load == save, the tiny
    presets) moves load too; an explicit --checkpoint.load wins, and a load that differs (base weights) stays."""
    tiny = os.path.join(os.path.dirname(__file__), "..", "launch", "configs", "tiny-bigcode.yaml")
    new = str(tmp_path / "ck")
    c = load_run_config(tiny, ["--checkpoint.save", new]).checkpoint
    assert (c.save, c.load) == (new, new)
    c = load_run_config(tiny, ["--checkpoint.save", new, "--checkpoint.load", "/base"]).checkpoint
    assert (c.save, c.load) == (new, "/base")
    c = load_run_config(tiny, []).checkpoint
    assert c.save == c.load == "runs/tiny-bigcode/checkpoints"
    base = tmp_path / "ft.yaml"
    base.write_text(YAML + "checkpoint:\n  load: /weights/base\n  save: ck/ft\n")
    c = load_run_config(str(base), ["--checkpoint.save", new]).checkpoint
    assert (c.save, c.load) == (new, "/weights/base")


@pytest.mark.parametrize("typed, want", [
    ("--optimizer.learning_rate", "'optimizer.lr'"),                 # a common spelling
    ("--train.train_iters", "'train.iters'"), ("--train-iters", "'train.iters'"),  # Megatron's --train-iters
    ("--micro-batch-size", "'train.micro_batch_size'"), ("--global_batch_size", "'train.global_batch_size'"),
    ("--seq-length", "'model.seq_length'"), ("--train.seq_length", "'model.seq_length'"),
    ("--tensor-model-parallel-size", "'parallel.tp'"), ("--lr-decay-style", "'schedule.style'"),
    ("--lr-warmup-iters", "'schedule.warmup_iters'"), ("--optimizer.min_lr", "'schedule.min_lr'"),
    ("--adam-beta2", "'optimizer.beta2'"), ("--eval-interval", "'eval.interval'"), ("--data-path", "'data.paths'"),
    ("--save-interval", "'checkpoint.save_interval'"), ("--seed", "'train.seed'"),
    ("--use-distributed-optimizer", "'train.zero1'"),
])
def test_unknown_keys_suggest_megaocto_names_for_megatron_and_common_aliases(typed, want):
    with pytest.raises(ConfigError, match=rf"unknown key '{re.escape(typed[2:].replace('-', '_'))}'; .*"
                                          rf"{re.escape(want)}"):
        load_run_config(None, [typed, "1", "--train.iters", "2"])


def test_every_alias_points_at_an_existing_key():
    from megaocto.config.loader import KEY_ALIASES, _all_keys

    keys = set(_all_keys(RunConfig))
    assert not {alias: key for alias, key in KEY_ALIASES.items() if key not in keys}


def test_megatron_use_distributed_optimizer_is_train_zero1():
    cfg = load_run_config(None, ["--train.iters", "1", "--train.use_distributed_optimizer", "true"])
    assert cfg.train.zero1 is True
    with pytest.raises(ConfigError, match="another name for train.zero1"):
        load_run_config(None, ["--train.iters", "1", "--train.use_distributed_optimizer", "true",
                               "--train.zero1", "false"])
    with pytest.raises(ConfigError, match="did you mean 'train.zero1'"):
        load_run_config(None, ["--train.iters", "1", "--use_distributed_optimizer", "true"])

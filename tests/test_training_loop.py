"""The training loop on one process with the real tiny-bigcode model and synthetic data (CPU, fp32/bf16).

Proves: exact resume (10 steps == 5 + save/exit + resume 5, bitwise), NaN/inf steps skipped without an update
and the divergence stop after saving the last good state, finetune/no_load_optim/reset_progress switches,
bf16 with fp32 masters, validation on the valid split, the metrics sinks (JSONL, TensorBoard, W&B offline),
and the golden losses in tests/golden/ (regenerate deliberately with MEGAOCTO_REGEN_GOLDEN=1).
Debug: run the failing test with -s to see the per-step log lines.
"""
import io
import json
import math
import os
import re
import shutil

import pytest
import torch

from megaocto.config.base import ConfigError
from megaocto.config.loader import load_run_config
from megaocto import checkpoint as ckpt
from megaocto.training.loop import Trainer, TrainingDiverged, micro_batch_loss, train
from megaocto.training.sampler import PretrainingSampler, collate

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_bigcode_fp32_losses.json")
GOLDEN_ARGS = ["--model.preset", "tiny-bigcode", "--data.kind", "synthetic", "--train.iters", "20",
               "--train.micro_batch_size", "2", "--train.global_batch_size", "4", "--train.seed", "1234",
               "--train.dtype", "fp32", "--optimizer.lr", "1e-3", "--optimizer.weight_decay", "0.1",
               "--schedule.style", "cosine", "--schedule.warmup_iters", "5", "--schedule.min_lr", "1e-4",
               "--logging.log_interval", "5", "--logging.jsonl", "false"]


def _cfg(tmp_path, *extra, iters=10):
    return load_run_config(None, [
        "--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--train.iters", str(iters),
        "--train.micro_batch_size", "2", "--train.global_batch_size", "4", "--train.dtype", "fp32",
        "--train.seed", "7", "--optimizer.lr", "2e-3", "--schedule.warmup_iters", "3",
        "--logging.run_dir", str(tmp_path / "run"), "--logging.log_interval", "5", "--data.num_workers", "0", *extra])


def _quiet(cfg, **kw):
    return train(cfg, stream=io.StringIO(), **kw)


def _weights(save, it):
    return torch.load(ckpt.model_file(save, it, 0), weights_only=True)["model"]


# Dropout on in the exact-resume tests, so that restoring the RNG state is exercised (golden losses stay dropout-off).
DROPOUT = ("--model.hidden_dropout", "0.1", "--model.attention_dropout", "0.1")


def test_exact_resume_fp32(tmp_path):
    straight = _quiet(_cfg(tmp_path, *DROPOUT, "--checkpoint.save", str(tmp_path / "a")))  # main-process data reading
    assert straight.exit_reason == "finished" and list(straight.losses) == list(range(1, 11))
    save = str(tmp_path / "b")
    workers = (*DROPOUT, "--data.num_workers", "2")  # the resumed halves read through 2 DataLoader workers
    first = _quiet(_cfg(tmp_path, "--checkpoint.save", save, "--train.exit_interval", "5", *workers))
    assert first.exit_reason == "exit_interval" and first.iteration == 5 and first.consumed_samples == 20
    second = _quiet(_cfg(tmp_path, "--checkpoint.save", save, "--checkpoint.load", save, *workers))
    assert list(second.losses) == list(range(6, 11)) and second.consumed_samples == 40
    resumed = {**first.losses, **second.losses}
    assert resumed == straight.losses, "resumed run diverged from the straight run"
    for k, v in _weights(str(tmp_path / "a"), 10).items():
        assert torch.equal(v, _weights(save, 10)[k]), k
    assert straight.losses[10] < straight.losses[1]


def test_nan_steps_skipped_then_diverged_saves_last_good(tmp_path):
    one = _quiet(_cfg(tmp_path, "--checkpoint.save", str(tmp_path / "one"), iters=1))
    init = Trainer(_cfg(tmp_path, iters=1), stream=io.StringIO()).model.state_dict()
    after_one = _weights(str(tmp_path / "one"), 1)
    assert not torch.equal(init["embedding.word_embeddings.weight"], after_one["embedding.word_embeddings.weight"]), \
        "the first step must update the weights (lr > 0 during warmup)"
    assert math.isfinite(one.losses[1])

    skipped = _quiet(_cfg(tmp_path, "--train.debug_nan_iters", "2", "--train.max_skipped_steps", "1", iters=4))
    assert skipped.exit_reason == "finished" and skipped.skipped_steps == 1 and math.isnan(skipped.losses[2])
    assert all(math.isfinite(skipped.losses[i]) for i in (1, 3, 4))

    save = str(tmp_path / "div")
    with pytest.raises(TrainingDiverged, match="2 steps had non-finite loss.*max_skipped_steps=1"):
        _quiet(_cfg(tmp_path, "--checkpoint.save", save, "--train.debug_nan_iters", "[2, 3]",
                    "--train.max_skipped_steps", "1", iters=6))
    assert ckpt.read_tracker(save) == 3
    reason = json.load(open(tmp_path / "run" / "exit_reason.json"))
    assert (reason["reason"], reason["exit_code"], reason["iteration"]) == ("diverged", 1, 3), reason
    assert reason["checkpoint"] == os.path.join(save, "iter_0000003") and "max_skipped_steps" in reason["message"]
    def strict(text):  # metrics.jsonl is strict JSON: no NaN/Infinity literals
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl"))
    records = [strict(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert records[-1]["iteration"] == 3 and records[-1]["skipped_steps"] == 2  # the diverging step is logged
    _quiet(_cfg(tmp_path, "--train.debug_nan_iters", "2", "--logging.log_interval", "1", iters=2))
    records = [strict(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert records[-1]["iteration"] == 2 and records[-1]["loss"] is None and records[-1]["grad_norm"] is None
    diverged = _weights(save, 3)
    for k, v in after_one.items():  # steps 2 and 3 were not applied: the saved state is the step-1 state
        assert torch.equal(v, diverged[k]), k


def test_bf16_masters_and_finetune_switches(tmp_path):
    save = str(tmp_path / "bf16")
    res = _quiet(_cfg(tmp_path, "--train.dtype", "bf16", "--checkpoint.save", save, iters=4))
    assert all(math.isfinite(v) for v in res.losses.values())
    state = torch.load(ckpt.model_file(save, 4, 0), weights_only=True)
    assert state["model"]["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    masters = state["optimizer"]["fp32_from_fp16_params"]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert state["data"]["consumed_samples"] == 16 and len(state["rng_state"]) == 1

    ft_args = ("--train.dtype", "bf16", "--checkpoint.load", save, "--checkpoint.finetune",
               "--checkpoint.save", str(tmp_path / "ft"))
    ft = _quiet(_cfg(tmp_path, *ft_args, "--train.exit_interval", "2", iters=3))
    assert list(ft.losses) == [1, 2] and ft.consumed_samples == 8
    requeued = _quiet(_cfg(tmp_path, *ft_args, iters=3))  # auto-resumes its own save, not the base weights
    assert list(requeued.losses) == [3] and requeued.consumed_samples == 12
    reset = Trainer(_cfg(tmp_path, "--train.dtype", "bf16", "--checkpoint.load", save, "--checkpoint.reset_progress",
                         iters=2), stream=io.StringIO())
    assert reset.iteration == 0 and reset.consumed == 0
    assert torch.equal(reset.optimizer.masters[0], masters[0])  # optimizer (fp32 masters) restored
    fresh = Trainer(_cfg(tmp_path, "--train.dtype", "bf16", "--checkpoint.load", save, "--checkpoint.no_load_optim",
                         "--checkpoint.override_scheduler", iters=6), stream=io.StringIO())
    assert fresh.iteration == 4 and not fresh.optimizer.optimizer.state  # moments start fresh
    assert fresh.run().iteration == 6
    release = tmp_path / "release_ck"  # Megatron's OctoPack trick: iter dir renamed to `release`
    shutil.copytree(os.path.join(save, "iter_0000004"), release / "release")
    (release / ckpt.TRACKER).write_text("release\n")
    rel = Trainer(_cfg(tmp_path, "--train.dtype", "bf16", "--checkpoint.load", str(release), iters=2),
                  stream=io.StringIO())
    assert rel.iteration == 0 and not rel.optimizer.optimizer.state
    assert torch.equal(rel.model.state_dict()["final_layernorm.weight"], state["model"]["final_layernorm.weight"])


def test_validation_uses_valid_split_and_sinks(tmp_path):
    cfg = _cfg(tmp_path, "--eval.interval", "2", "--eval.iters", "2", "--logging.tensorboard", "true",
               "--logging.wandb", "true", "--logging.wandb_project", "megaocto-test", "--logging.wandb_id", "job123", "--logging.log_interval", "1",
               iters=2)
    trainer = Trainer(cfg, stream=io.StringIO())
    valid = trainer.datasets["valid"]
    assert len(valid) == 2 * 4 and valid.split == "valid" and trainer.datasets["train"].split == "train"
    result = trainer.run()
    with torch.no_grad():  # recompute the validation loss by hand from the valid split
        trainer.model.eval()
        losses = [micro_batch_loss(trainer.model, collate(valid, idx, "cpu"))
                  for idx in PretrainingSampler(len(valid), 0, 2, 0, 1)]
    assert result.val_losses[2] == pytest.approx(float(sum(losses) / len(losses)), rel=1e-6)
    run_dir = tmp_path / "run"
    assert json.load(open(run_dir / "config.json"))["eval"]["iters"] == 2
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train_recs] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["mfu"] is None for r in train_recs)
    assert [r["iteration"] for r in records if r["kind"] == "valid"] == [2]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir / "tensorboard"))
    assert any(n.startswith("offline-run-") and n.endswith("-job123") for n in os.listdir(run_dir / "wandb"))


def test_golden_losses_tiny_bigcode(tmp_path):
    result = _quiet(load_run_config(None, GOLDEN_ARGS + ["--logging.run_dir", str(tmp_path)]))
    losses = [result.losses[i] for i in range(1, 21)]
    if os.environ.get("MEGAOCTO_REGEN_GOLDEN") == "1":
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump({"args": GOLDEN_ARGS, "torch": torch.__version__, "losses": losses}, f, indent=1)
    golden = json.load(open(GOLDEN))
    assert golden["args"] == GOLDEN_ARGS, "golden file was made with other settings; regenerate it deliberately"
    for i, (got, want) in enumerate(zip(losses, golden["losses"]), 1):
        assert abs(got - want) <= 1e-6, f"step {i}: loss {got!r} != golden {want!r}"
    assert losses[-1] < losses[0] - 0.3


def test_launch_configs_load_and_tiny_ones_run(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..", "launch", "configs")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert {"tiny-bigcode.yaml", "tiny-glm2.yaml"} <= set(names)
    for name in names:
        cfg = load_run_config(os.path.join(root, name))
        assert cfg.train.dtype in ("fp32", "bf16")
    for name in ("tiny-bigcode.yaml", "tiny-glm2.yaml"):
        d = str(tmp_path / name)
        result = _quiet(load_run_config(os.path.join(root, name), [
            "--train.iters", "2", "--checkpoint.save", d, "--checkpoint.load", d, "--logging.run_dir", d,
            "--logging.tensorboard", "false", "--eval.interval", "2"]))
        assert result.exit_reason == "finished" and 2 in result.val_losses and ckpt.read_tracker(d) == 2


def test_accumulation_recompute_and_run_length(tmp_path):
    accum = _quiet(_cfg(tmp_path, iters=3)).losses  # 2 micro batches of 2
    whole = _quiet(_cfg(tmp_path, "--train.micro_batch_size", "4", iters=3)).losses  # 1 micro batch of 4
    full = _quiet(_cfg(tmp_path, "--train.recompute", "full", iters=3)).losses
    selective = _quiet(_cfg(tmp_path, "--train.recompute", "selective", iters=3)).losses
    for step in (1, 2, 3):
        assert whole[step] == pytest.approx(accum[step], rel=1e-5)
        assert full[step] == pytest.approx(accum[step], rel=1e-6)
        assert selective[step] == pytest.approx(accum[step], rel=1e-6)
    # with uneven loss masks (EOD tokens masked), token_mean does not depend on how the batch is split
    masked = ("--data.eod_mask_loss", "true")
    tok2 = _quiet(_cfg(tmp_path, *masked, iters=2)).losses
    tok4 = _quiet(_cfg(tmp_path, *masked, "--train.micro_batch_size", "4", iters=2)).losses
    mb2 = _quiet(_cfg(tmp_path, *masked, "--train.loss_reduction", "micro_batch_mean", iters=2)).losses
    assert tok2[1] == pytest.approx(tok4[1], rel=1e-6) and tok2[2] == pytest.approx(tok4[2], rel=1e-5)
    assert abs(mb2[1] - tok2[1]) > 1e-6  # the per-micro-batch mean weighs tokens unequally
    by_samples = Trainer(load_run_config(None, ["--model.preset", "tiny-bigcode", "--train.samples", "10",
                                                "--train.global_batch_size", "4", "--train.dtype", "fp32"]),
                         stream=io.StringIO())
    assert by_samples.total_iters == 3 and len(by_samples.datasets["train"]) == 12
    by_epochs = Trainer(load_run_config(None, ["--model.preset", "tiny-bigcode", "--train.epochs", "0.5",
                                               "--data.synthetic_epoch_samples", "16", "--train.global_batch_size",
                                               "4", "--train.dtype", "fp32"]), stream=io.StringIO())
    assert by_epochs.total_iters == 2


def test_loader_creation_leaves_default_rng_alone():
    """Starting the DataLoader after a checkpoint's RNG state was restored must not draw from torch's default RNG
    (it would shift every dropout mask of a resumed run)."""
    from megaocto.training.sampler import micro_batch_loader

    data = [{"x": torch.arange(4)} for _ in range(8)]
    for workers in (0, 1):
        before = torch.get_rng_state()
        it = iter(micro_batch_loader(data, PretrainingSampler(8, 0, 2, 0, 1), num_workers=workers,
                                     pin_memory=False, seed=3))
        assert torch.equal(torch.get_rng_state(), before), f"num_workers={workers}"
        assert next(it)["x"].shape == (2, 4)
        del it


def test_resume_refuses_a_different_lr_schedule(tmp_path):
    save = str(tmp_path / "ck")
    first = _quiet(_cfg(tmp_path, "--checkpoint.save", save, "--train.exit_interval", "2", iters=4))
    assert first.iteration == 2
    for args in ((), ("--checkpoint.load", save)):  # own (auto) resume and an explicit load of another run's save
        target = () if args else ("--checkpoint.save", save)
        with pytest.raises(ConfigError, match=r"iter_0000002.*decay_steps=4 \(configured: 6\).*use_checkpoint_sched"):
            Trainer(_cfg(tmp_path, *args, *target, iters=6), stream=io.StringIO())
    log = io.StringIO()
    kept = Trainer(_cfg(tmp_path, "--checkpoint.save", save, "--checkpoint.use_checkpoint_scheduler", iters=6),
                   stream=log)
    assert kept.schedule.decay_steps == 4 and kept.iteration == 2
    assert "WARNING: 3 of the remaining 4 steps (4..6) run at lr 0" in log.getvalue(), log.getvalue()
    log = io.StringIO()  # a finished run extended with the checkpoint's schedule: nothing left to learn
    done = str(tmp_path / "done")
    _quiet(_cfg(tmp_path, "--checkpoint.save", done, iters=4))
    Trainer(_cfg(tmp_path, "--checkpoint.save", done, "--checkpoint.use_checkpoint_scheduler", iters=6), stream=log)
    assert "WARNING: every one of the remaining 2 steps (5..6) run at lr 0" in log.getvalue(), log.getvalue()
    log = io.StringIO()
    Trainer(_cfg(tmp_path, "--checkpoint.save", save, iters=4), stream=log)  # only the last step at lr 0: quiet
    assert "WARNING" not in log.getvalue(), log.getvalue()
    overridden = Trainer(_cfg(tmp_path, "--checkpoint.save", save, "--checkpoint.override_scheduler", iters=6),
                         stream=io.StringIO())
    assert overridden.schedule.decay_steps == 6
    with pytest.raises(ConfigError, match="optimizer.lr|max_lr"):
        Trainer(_cfg(tmp_path, "--checkpoint.save", save, "--optimizer.lr", "1e-3", iters=4), stream=io.StringIO())
    same = Trainer(_cfg(tmp_path, "--checkpoint.save", save, iters=4), stream=io.StringIO())  # unchanged: fine
    assert same.iteration == 2
    reset = Trainer(_cfg(tmp_path, "--checkpoint.load", save, "--checkpoint.reset_progress", iters=6),
                    stream=io.StringIO())  # the schedule restarts at 0: the configured one applies
    assert reset.iteration == 0 and reset.schedule.decay_steps == 6


def test_resume_without_saved_optimizer_state(tmp_path):
    save = str(tmp_path / "noopt")
    args = ("--checkpoint.save", save, "--checkpoint.save_optim", "false")
    first = _quiet(_cfg(tmp_path, *args, "--train.exit_interval", "1", iters=2))
    assert first.iteration == 1 and "optimizer" not in torch.load(ckpt.model_file(save, 1, 0), weights_only=True)
    with pytest.raises(ConfigError, match=r"iter_0000001/mp_rank_00/model_optim_rng.pt has no optimizer.*no_load_optim"):
        _quiet(_cfg(tmp_path, *args, iters=2))  # requeued as is: says what to set
    reason = json.load(open(tmp_path / "run" / "exit_reason.json"))  # config errors leave a reason file too
    assert (reason["reason"], reason["exit_code"]) == ("config_error", 2) and "no_load_optim" in reason["message"]
    log = io.StringIO()
    requeued = Trainer(_cfg(tmp_path, *args, "--checkpoint.no_load_optim", iters=2), stream=log)
    assert requeued.iteration == 1 and not requeued.optimizer.optimizer.state
    assert "no optimizer state" in log.getvalue() and "starts fresh" in log.getvalue()
    assert list(requeued.run().losses) == [2]


def test_explicit_load_without_a_checkpoint_is_an_error(tmp_path):
    save = str(tmp_path / "ck")
    _quiet(_cfg(tmp_path, "--checkpoint.save", save, iters=1))
    empty = tmp_path / "empty"
    empty.mkdir()
    for load, message in ((str(tmp_path / "typo"), "no such directory"),
                          (os.path.join(save, "iter_0000001"), f"pass its parent, checkpoint.load={save}"),
                          (str(empty), f"has no {ckpt.TRACKER}")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            Trainer(_cfg(tmp_path, "--checkpoint.load", load, "--checkpoint.save", str(tmp_path / "new"), iters=1),
                    stream=io.StringIO())
    own = str(tmp_path / "own")  # load == save with nothing there yet: a fresh start (tiny-bigcode.yaml does this)
    assert Trainer(_cfg(tmp_path, "--checkpoint.load", own, "--checkpoint.save", own, iters=1),
                   stream=io.StringIO()).iteration == 0


@pytest.mark.parametrize("bf16", [False, True])
def test_no_weight_decay_on_biases_and_norm_weights(bf16):
    from megaocto.config.model import ModelConfig
    from megaocto.config.train import OptimizerConfig
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext
    from megaocto.training.optimizer import MixedPrecisionAdamW

    pc = ParallelContext.single()
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny-bigcode", seq_length=32), pc,
                        dtype=torch.bfloat16 if bf16 else torch.float32)
    opt = MixedPrecisionAdamW(model, OptimizerConfig(lr=1e-2, weight_decay=0.5), pc, bf16=bf16)
    names = {id(m): n for m, (n, _) in zip(opt.masters, model.named_parameters())}
    wd = {names[id(p)]: g["weight_decay"] for g in opt.optimizer.param_groups for p in g["params"]}
    assert len(wd) == len(names)
    no_decay = {n for n, v in wd.items() if v == 0.0}
    assert no_decay and all(n.endswith("bias") or "norm" in n for n in no_decay), sorted(no_decay)
    assert any("layernorm.weight" in n for n in no_decay) and any("layernorm.bias" in n for n in no_decay)
    for n, v in wd.items():  # every bias and norm weight is exempt, every matrix decays
        assert v == (0.0 if n.endswith("bias") or "norm" in n else 0.5), (n, v)
    # one step with zero grads: Adam's update is 0, so only the decoupled decay moves a param
    before = {n: m.detach().clone() for n, m in zip(names.values(), opt.masters)}
    opt.zero_grad()
    opt.step(1e-2)
    for n, m in zip(names.values(), opt.masters):
        want = before[n] if n in no_decay else before[n] * (1 - 1e-2 * 0.5)
        assert torch.allclose(m.detach(), want, rtol=1e-6, atol=0), n


def test_architecture_mismatch_on_load_is_a_config_error(tmp_path):
    save = str(tmp_path / "ck")
    _quiet(_cfg(tmp_path, "--checkpoint.save", save, iters=1))
    with pytest.raises(ConfigError, match=r"iter_0000001/mp_rank_00/model_optim_rng.pt does not fit.*"
                                          r"model.num_layers=2 \(configured: 3\)") as e:
        Trainer(_cfg(tmp_path, "--checkpoint.load", save, "--checkpoint.finetune", "--model.num_layers", "3",
                     "--model.seq_length", "48", iters=1), stream=io.StringIO())
    assert "seq_length" not in str(e.value), e.value  # not an architecture field: the position table is unchanged
    # a longer sequence is fine for the weights as long as the position table keeps its rows
    Trainer(_cfg(tmp_path, "--checkpoint.load", save, "--checkpoint.finetune", "--model.seq_length", "48", iters=1),
            stream=io.StringIO())
    with pytest.raises(ConfigError, match=r"position table rows 64 \(configured: 96; set "
                                          r"model.max_position_embeddings=64\)"):
        Trainer(_cfg(tmp_path, "--checkpoint.load", save, "--checkpoint.finetune", "--model.seq_length", "48",
                     "--model.max_position_embeddings", "96", iters=1), stream=io.StringIO())


def _word_tokenizer(path, size):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, size)}}
    Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>")).save(str(path))
    return str(path)


def test_missing_data_or_tokenizer_is_a_one_line_config_error(tmp_path):
    def error(*extra):
        with pytest.raises(ConfigError) as e:
            _quiet(_cfg(tmp_path, *extra))
        reason = json.load(open(tmp_path / "run" / "exit_reason.json"))
        assert (reason["reason"], reason["exit_code"]) == ("config_error", 2), reason
        assert "\n" not in str(e.value), e.value
        return str(e.value)

    msg = error("--data.kind", "gpt", "--data.paths", str(tmp_path / "nope"), "--data.eod_id", "0")
    assert msg.startswith(f"data.paths: {tmp_path / 'nope'}:") and "not found" in msg, msg
    prefix = tmp_path / "ft"
    msg = error("--data.kind", "packed", "--data.paths", f"{prefix}_inputs_document", "--data.pad_id", "0")
    assert f"data.paths takes the prefix {prefix} (without _inputs_document" in msg, msg
    msg = error("--data.kind", "packed", "--data.paths", str(prefix), "--data.tokenizer", str(tmp_path / "no.json"))
    assert msg.startswith(f"data.tokenizer={tmp_path / 'no.json'}:") and "not found" in msg, msg


def test_tokenizer_vocab_larger_than_model_vocab_is_a_config_error(tmp_path):
    tok = _word_tokenizer(tmp_path / "tok.json", 1500)
    with pytest.raises(ConfigError, match=r"has 1500 tokens but model.vocab_size=1000.*at least 1500"):
        Trainer(_cfg(tmp_path, "--data.tokenizer", tok, "--model.vocab_size", "1000"), stream=io.StringIO())
    small = _word_tokenizer(tmp_path / "small.json", 600)  # smaller than the (padded) model vocab: fine
    Trainer(_cfg(tmp_path, "--data.tokenizer", small, "--model.vocab_size", "1000"), stream=io.StringIO())


def test_console_metrics_format_loss_tokens_and_data_summary(tmp_path):
    out = io.StringIO()
    train(_cfg(tmp_path, "--logging.log_interval", "1", "--data.eod_mask_loss", "true", "--data.eod_id", "0",
               iters=2), stream=out)
    text = out.getvalue()
    assert re.search(r"^data train: kind=synthetic, split=train, samples=8", text, re.M), text
    step = next(line for line in text.splitlines() if line.startswith("iter 1/2"))
    assert re.search(r"max_rss \d+\.\d\d GiB", step) and "_gib" not in step, step  # the unit once
    assert re.search(r"TFLOP/s/dev \d+\.\d{4} ", step), step  # fixed decimals, not 3 significant digits
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    assert all(0 < r["loss_tokens_per_s"] < r["tokens_per_s"] for r in rows), rows  # EOD positions carry no loss
    assert "loss tok/s" in step


def test_resume_logs_training_settings_changed_since_the_checkpoint(tmp_path):
    save = str(tmp_path / "ck")
    _quiet(_cfg(tmp_path, "--checkpoint.save", save, "--train.exit_interval", "2", iters=4))
    log = io.StringIO()
    Trainer(_cfg(tmp_path, "--checkpoint.save", save, "--train.global_batch_size", "8", "--train.dtype", "bf16",
                 "--train.seed", "8", "--data.num_workers", "1", iters=4), stream=log)
    line = next((x for x in log.getvalue().splitlines() if x.startswith("changed since checkpoint")), "")
    assert line.startswith("changed since checkpoint iter_0000002: "), log.getvalue()
    for change in ("train.global_batch_size 4 -> 8", "train.dtype 'fp32' -> 'bf16'", "train.seed 7 -> 8"):
        assert change in line, line
    assert "num_workers" not in line, line  # not training-relevant
    log = io.StringIO()
    Trainer(_cfg(tmp_path, "--checkpoint.save", save, iters=4), stream=log)  # unchanged: no line
    assert "changed since checkpoint" not in log.getvalue(), log.getvalue()

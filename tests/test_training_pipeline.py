"""Pipeline parallelism (parallel.pp): stage construction, and the 1F1B schedule on 4 gloo ranks.

- stages: the blocks are split by one function (even, or parallel.pp_layers); every stage has the unsplit model's
  parameter names (global layer indices) and, built from the same seed, its values; bigcode's tied word embedding
  has a copy on the last stage tagged `shared`;
- pp=2 (dp=2, 4 micro batches: warmup, steady state and cooldown) and tp=2 x pp=2 with sequence parallelism
  (dp=1, 8 micro batches) give pp=1's losses, grad norms and validation losses over 10 fp32 steps (<= 1e-5), for
  bigcode (tied) and llama (untied); also with zero1, recompute and an uneven split, and on packed SFT rows;
- exact resume at pp=2 (bf16, dropout on), also interleaved, checkpoints in mp_rank_XX_YYY dirs;
- interleaved virtual stages (parallel.virtual_pp=2) == plain 1F1B;
- pp > 1 checkpoints read by convert (to-hf, reshard) and generation, and `reshard --pp` writing them.
"""
import dataclasses
import io
import json
import os

import pytest
import torch

from dist_utils import run_distributed
from megaocto.config.base import ConfigError
from megaocto.config.loader import load_run_config
from megaocto.config.model import ModelConfig
from megaocto.model import build_model
from megaocto.model.common import stage_chunks, stage_layers
from megaocto.parallel.context import ParallelContext
from megaocto.training.loop import Trainer, train


def test_stage_layers_split():
    assert [stage_layers(8, 4, r) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [stage_layers(8, 3, r, [2, 4, 2]) for r in range(3)] == [range(0, 2), range(2, 6), range(6, 8)]
    assert stage_layers(5, 1, 0) == range(0, 5)
    with pytest.raises(ConfigError, match="pp_layers"):
        stage_layers(6, 4, 0)
    # interleaved: chunk c of stage r is virtual stage c*pp + r
    assert stage_chunks(8, 2, 0, virtual=2) == [range(0, 2), range(4, 6)]
    assert stage_chunks(8, 2, 1, virtual=2) == [range(2, 4), range(6, 8)]
    with pytest.raises(ConfigError, match="summing to model.num_layers=8"):
        stage_layers(8, 2, 0, [3, 4])


@pytest.mark.parametrize("preset", ["tiny-bigcode", "tiny-llama", "tiny-glm2"])
def test_stages_have_the_unsplit_names_and_weights(preset):
    cfg = ModelConfig.from_preset(preset, num_layers=4)
    torch.manual_seed(3)
    full = build_model(cfg, ParallelContext.single()).state_dict()
    merged, shared = {}, []
    for rank in range(2):
        pc = dataclasses.replace(ParallelContext.single(), pp=2, pp_rank=rank, pp_ranks=(0, 1))
        torch.manual_seed(3)
        stage = build_model(cfg, pc, pp_layers=[3, 1])
        assert stage.layer_range == (range(0, 3) if rank == 0 else range(3, 4))
        torch.manual_seed(3)
        chunks = build_model(cfg, pc, virtual_pp=2)  # interleaved: layers 0, 2 on stage 0; 1, 3 on stage 1
        assert sorted({n.split(".")[1] for n in chunks.state_dict() if n.startswith("layers.")}) == \
            (["0", "2"] if rank == 0 else ["1", "3"])
        assert all(torch.equal(t, full[n]) for n, t in chunks.state_dict().items())
        shared += [n for n, p in stage.named_parameters() if getattr(p, "shared", False)]
        for name, t in stage.state_dict().items():
            if name in merged:  # the tied embedding's copy
                assert torch.equal(merged[name], t), name
            merged[name] = t
    assert merged.keys() == full.keys()
    for name in full:
        assert torch.equal(merged[name], full[name]), name
    assert shared == (["embedding.word_embeddings.weight"] if cfg.tie_embeddings else [])


def _cfg(save, preset, *extra, iters=10):
    return load_run_config(None, [
        "--model.preset", preset, "--model.num_layers", "4", "--model.seq_length", "32", "--train.iters", str(iters),
        "--train.micro_batch_size", "2", "--train.global_batch_size", "16", "--train.dtype", "fp32",
        "--train.seed", "7", "--optimizer.lr", "2e-3", "--schedule.warmup_iters", "2", "--optimizer.clip_grad", "1.0",
        "--checkpoint.save", save, "--logging.run_dir", save + "_run", "--logging.jsonl", "false",
        "--data.num_workers", "0", "--eval.interval", "5", "--eval.iters", "1", *extra])


def _close(a, b, tol, what):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=tol, abs=tol), f"{what} step {k}: {a[k]} vs {b[k]}"


def _body_equivalence(rank, world_size, root):
    for preset in ("tiny-bigcode", "tiny-llama"):
        ref = train(_cfg(os.path.join(root, preset, "pp1"), preset), stream=io.StringIO())
        assert len(ref.val_losses) == 2
        variants = {
            "pp2": ("--parallel.pp", "2"),
            "pp2_zero1_recompute_uneven": ("--parallel.pp", "2", "--train.zero1", "true", "--train.recompute",
                                           "full", "--parallel.pp_layers", "[3, 1]"),
            "tp2_pp2_sp": ("--parallel.pp", "2", "--parallel.tp", "2", "--parallel.sequence_parallel", "true"),
        }
        for name, extra in variants.items():
            got = train(_cfg(os.path.join(root, preset, name), preset, *extra), stream=io.StringIO())
            _close(got.losses, ref.losses, 1e-5, f"{preset} {name} loss")
            _close(got.grad_norms, ref.grad_norms, 1e-5, f"{preset} {name} grad norm")
            _close(got.val_losses, ref.val_losses, 1e-5, f"{preset} {name} validation loss")
        assert ref.losses[10] < ref.losses[1] - 0.05  # the model learns (the comparison is not of constants)


    # packed SFT rows (segment_ids: attention stays inside each example; every stage gets them)
    packed = ("--data.kind", "packed", "--data.paths", os.path.join(root, "sft"), "--data.eod_id", "0",
              "--data.pad_id", "3", "--data.split", "100,0,0")
    ref = train(_cfg(os.path.join(root, "packed_pp1"), "tiny-bigcode", *packed), stream=io.StringIO())
    got = train(_cfg(os.path.join(root, "packed_tp2_pp2"), "tiny-bigcode", *packed, "--parallel.pp", "2",
                     "--parallel.tp", "2", "--parallel.sequence_parallel", "true"), stream=io.StringIO())
    _close(got.losses, ref.losses, 1e-5, "packed tp2_pp2_sp loss")
    _close(got.grad_norms, ref.grad_norms, 1e-5, "packed tp2_pp2_sp grad norm")


def _write_sft(root):
    import numpy as np

    from megaocto.data.indexed import MMapIndexedDatasetBuilder, dataset_prefix

    r = np.random.RandomState(0)
    for part, base, longest in (("inputs", 100, 12), ("targets", 500, 8)):
        prefix = dataset_prefix(os.path.join(root, "sft"), part)
        b = MMapIndexedDatasetBuilder(prefix + ".bin", np.uint16)
        for i in range(600):
            b.add_document(r.randint(base, base + 300, size=r.randint(1, longest)))
        b.finalize(prefix + ".idx")


def test_pp2_and_tp2_pp2_equal_pp1(tmp_path):
    _write_sft(str(tmp_path))
    run_distributed(_body_equivalence, 4, str(tmp_path))


def _body_resume(rank, world_size, root):
    z = ("--parallel.pp", "2", "--train.dtype", "bf16", "--model.hidden_dropout", "0.1",
         "--model.attention_dropout", "0.1", "--eval.interval", "3", "--eval.iters", "1")
    straight = train(_cfg(os.path.join(root, "straight"), "tiny-bigcode", *z, iters=6), stream=io.StringIO())
    save = os.path.join(root, "resumed")
    first = train(_cfg(save, "tiny-bigcode", *z, "--train.exit_interval", "3", iters=6), stream=io.StringIO())
    second = train(_cfg(save, "tiny-bigcode", *z, iters=6), stream=io.StringIO())
    assert first.iteration == 3 and list(second.losses) == [4, 5, 6]
    assert {**first.losses, **second.losses} == straight.losses, "pp=2 resume is not exact"
    assert {**first.val_losses, **second.val_losses} == straight.val_losses
    assert sorted(os.listdir(os.path.join(save, "iter_0000003"))) == ["metadata.json", "mp_rank_00_000",
                                                                      "mp_rank_00_001"]
    # interleaved (2 chunks per stage): a stage's checkpoint holds both chunks; exact resume too
    v = (*z, "--parallel.virtual_pp", "2")
    straight = train(_cfg(os.path.join(root, "v_straight"), "tiny-bigcode", *v, iters=4), stream=io.StringIO())
    save = os.path.join(root, "v_resumed")
    first = train(_cfg(save, "tiny-bigcode", *v, "--train.exit_interval", "2", iters=4), stream=io.StringIO())
    second = train(_cfg(save, "tiny-bigcode", *v, iters=4), stream=io.StringIO())
    assert {**first.losses, **second.losses} == straight.losses, "interleaved resume is not exact"


def test_pp2_exact_resume(tmp_path):
    run_distributed(_body_resume, 4, str(tmp_path))


def _pp2_copy(root, preset):
    """A pp=1 release checkpoint (from the converter's writer) and the same weights saved as a pp=2 checkpoint in
    mp_rank_00_00{0,1}, each stage's file holding the names of build_model's stage."""
    from megaocto.convert.core import write_megaocto_checkpoint

    cfg = ModelConfig.from_preset(preset, num_layers=4)
    torch.manual_seed(5)
    full = build_model(cfg, ParallelContext.single())
    src, dst = os.path.join(root, "pp1"), os.path.join(root, "pp2")
    write_megaocto_checkpoint(src, cfg, full.state_dict(), 1, progress=False)
    with open(os.path.join(src, "release", "metadata.json")) as f:
        meta = {**json.load(f), "pp": 2, "world_size": 2}
    for rank in range(2):
        pc = dataclasses.replace(ParallelContext.single(), pp=2, pp_rank=rank, pp_ranks=(0, 1))
        names = build_model(cfg, pc).state_dict().keys()
        os.makedirs(os.path.join(dst, "release", f"mp_rank_00_{rank:03d}"))
        torch.save({"model": {n: full.state_dict()[n] for n in names}},
                   os.path.join(dst, "release", f"mp_rank_00_{rank:03d}", "model_optim_rng.pt"))
    with open(os.path.join(dst, "release", "metadata.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release\n")
    return cfg, full, src, dst


@pytest.mark.parametrize("preset", ["tiny-bigcode", "tiny-llama"])
def test_pp2_checkpoints_are_read_by_convert_and_generation(tmp_path, preset):
    from megaocto.convert.core import read_megaocto_checkpoint
    from megaocto.generation.loading import load_checkpoint_model

    cfg, full, src, dst = _pp2_copy(str(tmp_path), preset)
    one, two = dict(read_megaocto_checkpoint(src)[1]), dict(read_megaocto_checkpoint(dst)[1])
    assert one.keys() == two.keys() and all(torch.equal(one[n], two[n]) for n in one)
    model, _ = load_checkpoint_model(dst)  # generation merges the stages into the whole model
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    assert torch.equal(model(ids), full.eval()(ids))
    from megaocto.convert.hf import to_hf
    from safetensors.torch import load_file

    for ckpt_dir in (src, dst):
        to_hf(ckpt_dir, ckpt_dir + "_hf", progress=False)
    hf_one, hf_two = (load_file(os.path.join(d + "_hf", "model.safetensors")) for d in (src, dst))
    assert hf_one.keys() == hf_two.keys() and all(torch.equal(hf_one[n], hf_two[n]) for n in hf_one)
    os.remove(os.path.join(dst, "release", "mp_rank_00_001", "model_optim_rng.pt"))
    with pytest.raises(ConfigError, match="mp_rank_00_001/model_optim_rng.pt: missing .*pp=2"):
        read_megaocto_checkpoint(dst)


@pytest.mark.parametrize("preset", ["tiny-bigcode", "tiny-glm2"])
def test_reshard_changes_pp(tmp_path, preset):
    from megaocto.convert.core import ConversionError, read_megaocto_checkpoint
    from megaocto.convert.reshard import reshard

    cfg, full, src, dst = _pp2_copy(str(tmp_path), preset)
    out = str(tmp_path / "tp2pp2")
    reshard(src, out, tp=2, pp=2, progress=False)  # pp 1 -> 2 (and tp 1 -> 2)
    meta = json.load(open(os.path.join(out, "release", "metadata.json")))
    assert (meta["tp"], meta["pp"], meta["converted_from"]["pp"]) == (2, 2, 1)
    back = str(tmp_path / "back")
    reshard(out, back, tp=1, pp=2, progress=False)  # tp 2 -> 1 at pp=2: the files build_model's stages load
    for rank in range(2):
        want = torch.load(os.path.join(dst, "release", f"mp_rank_00_{rank:03d}", "model_optim_rng.pt"))["model"]
        got = torch.load(os.path.join(back, "release", f"mp_rank_00_{rank:03d}", "model_optim_rng.pt"))["model"]
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    one = dict(read_megaocto_checkpoint(src)[1])
    merged = dict(read_megaocto_checkpoint(out)[1])
    assert all(torch.equal(one[n], merged[n]) for n in one)
    with pytest.raises(ConversionError, match="--pp=3: model.num_layers=4 does not split evenly"):
        reshard(src, str(tmp_path / "bad"), tp=1, pp=3, progress=False)


def test_pp_layers_must_fit_pp(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.pp_layers=\[1, 1\] must give one count >= 1 per pipeline stage "
                                          r"\(pp=1\)"):
        Trainer(_cfg(str(tmp_path / "x"), "tiny-bigcode", "--parallel.pp_layers", "1,1", "--model.num_layers", "2"),
                stream=io.StringIO())


def _body_interleaved(rank, world_size, root):
    # 8 layers, pp=2 x 2 chunks per stage: stage 0 runs layers 0-1 and 4-5, stage 1 layers 2-3 and 6-7 (the ring);
    # dp=2 with 4 micro batches (warmup, steady, cooldown); tp=2 x pp=2 with SP: 8 micro batches
    for preset in ("tiny-bigcode", "tiny-llama"):
        common = ("--model.num_layers", "8", "--parallel.pp", "2")
        plain = train(_cfg(os.path.join(root, preset, "plain"), preset, *common), stream=io.StringIO())
        for name, extra in {"v2": ("--parallel.virtual_pp", "2"),
                            "v2_tp2_sp": ("--parallel.virtual_pp", "2", "--parallel.tp", "2",
                                                "--parallel.sequence_parallel", "true")}.items():
            got = train(_cfg(os.path.join(root, preset, name), preset, *common, *extra), stream=io.StringIO())
            _close(got.losses, plain.losses, 1e-5, f"{preset} {name} loss")
            _close(got.grad_norms, plain.grad_norms, 1e-5, f"{preset} {name} grad norm")
            _close(got.val_losses, plain.val_losses, 1e-5, f"{preset} {name} validation loss")


def test_interleaved_equals_plain_1f1b(tmp_path):
    run_distributed(_body_interleaved, 4, str(tmp_path))

"""megaocto checkpoint resharding and the core writer/reader: tp=2 -> 1 -> 2 bit-exact, training checkpoints,
streaming order, verify, and errors before writing."""
import json
import os

import pytest
import torch

from megaocto.config.model import ModelConfig
from megaocto.convert.core import (ConversionError, TorchStreamWriter, param_specs, read_megaocto_checkpoint,
                                   write_megaocto_checkpoint)
from megaocto.convert.reshard import reshard
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext
from megaocto.parallel.layers import shard_tensor
from megaocto import checkpoint as ckpt

V = 131


def _state(name, seed=0, **kw):
    cfg = ModelConfig.from_preset(name, vocab_size=V, **kw)
    torch.manual_seed(seed)
    return cfg, build_model(cfg, ParallelContext.single()).state_dict()


def _rank_states(path, tp, iteration="release"):
    return [torch.load(ckpt.model_file(path, iteration, r), weights_only=True)["model"] for r in range(tp)]


@pytest.mark.parametrize("name", ["tiny-bigcode", "tiny-glm2"])
def test_tp2_to_tp1_to_tp2_is_bit_exact(tmp_path, capsys, name):
    cfg, full = _state(name)
    a, b, c = (str(tmp_path / x) for x in ("tp2", "tp1", "tp2_again"))
    write_megaocto_checkpoint(a, cfg, full, 2, progress=False)
    # each rank file holds exactly the layers.py shard of every parameter (the 256 padded vocab rows are kept:
    # the padded size is 256 at tp=1 and tp=2)
    specs = param_specs(cfg)
    for r, st in enumerate(_rank_states(a, 2)):
        assert list(st) == list(specs)
        for k, spec in specs.items():
            t = full[k]
            want = t if spec.partition_dim is None else shard_tensor(t, 2, r, spec.partition_dim, spec.partition_blocks)
            assert torch.equal(st[k], want), (r, k)
    assert reshard(a, b, tp=1, progress=False, verify=True) <= 1e-5  # tp=2 run sharded: other summation order
    assert ("max abs logit difference (megaocto tp=2 (2 gloo processes, one rank file each) vs megaocto tp=1)"
            in capsys.readouterr().out)
    reshard(b, c, tp=2, progress=False)
    for x, y in zip(_rank_states(a, 2), _rank_states(c, 2)):
        assert list(x) == list(y) and all(torch.equal(x[k], y[k]) for k in x)
    merged = dict(read_megaocto_checkpoint(b, trim_vocab=True)[1])
    for k, v in full.items():
        assert torch.equal(merged[k], v[:V] if specs[k].vocab else v), k
    meta = json.load(open(os.path.join(c, "release", "metadata.json")))
    assert meta["tp"] == 2 and meta["converted_from"]["kind"] == "reshard" and meta["converted_from"]["tp"] == 1


def test_reshard_a_training_checkpoint_and_stream_order(tmp_path):
    """A checkpoint written by the training loop (iter_*, optimizer state) reshards to its weights; the writer
    accepts tensors in any order (each tensor's shards are appended to the rank files as it arrives, so the order
    of records in a file follows the stream; the loaded state dicts are identical)."""
    cfg, full = _state("tiny-bigcode", seed=3)
    save = str(tmp_path / "train")
    pc = ParallelContext.single()
    state = {"checkpoint_version": 3.0, "iteration": 7, "model": full, "optimizer": {"x": torch.zeros(2)}}
    ckpt.save_checkpoint(save, 7, state, {"config": {"model": cfg.to_dict()}}, pc)
    out = str(tmp_path / "tp2")
    reshard(save, out, tp=2, progress=False)
    shuffled = dict(sorted(full.items(), key=lambda kv: kv[0][::-1]))  # units interleaved (by name suffix)
    other = str(tmp_path / "tp2_shuffled")
    write_megaocto_checkpoint(other, cfg, shuffled, 2, progress=False)
    for x, y in zip(_rank_states(out, 2), _rank_states(other, 2)):
        assert list(x) == list(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert "optimizer" not in torch.load(ckpt.model_file(out, "release", 0), weights_only=True)
    # bf16 cast on the way
    bf = str(tmp_path / "bf16")
    reshard(out, bf, tp=1, dtype="bf16", progress=False)
    st = _rank_states(bf, 1)[0]
    assert all(t.dtype == torch.bfloat16 for t in st.values())
    assert json.load(open(os.path.join(bf, "release", "metadata.json")))["dtype"] == "bfloat16"


def test_reshard_errors_before_writing(tmp_path):
    cfg, full = _state("tiny-glm2")
    src = str(tmp_path / "src")
    write_megaocto_checkpoint(src, cfg, full, 2, progress=False)
    before = set(os.listdir(tmp_path))
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match="--tp=4: model.num_query_groups=2 is not divisible by tp=4"):
        reshard(src, out, tp=4, progress=False)
    with pytest.raises(ConversionError, match="unsupported dtype 'fp8'"):
        reshard(src, out, tp=1, dtype="fp8", progress=False)
    with pytest.raises(ckpt.CheckpointError, match="not a directory"):
        reshard(str(tmp_path / "nope"), out, tp=1, progress=False)
    with pytest.raises(ConversionError, match="already exists"):
        reshard(src, src, tp=1, progress=False)
    os.remove(ckpt.model_file(src, "release", 1))
    with pytest.raises(ckpt.CheckpointError, match=r"mp_rank_01/model_optim_rng.pt: missing \(metadata says tp=2\)"):
        reshard(src, out, tp=1, progress=False)
    os.remove(os.path.join(src, "release", "metadata.json"))
    with pytest.raises(ckpt.CheckpointError, match="metadata.json: missing.*from-megatron"):
        reshard(src, out, tp=1, progress=False)
    assert set(os.listdir(tmp_path)) == before


def test_stream_writer_files_load_like_torch_save(tmp_path):
    base = torch.arange(250_000, dtype=torch.float32).view(500, 500)  # 1 MB
    tensors = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "view": base[1:3, 2:5], "t": base[:3, :4].t(),
               "rows": base[2:4],  # a contiguous view at an offset: written in place
               "half": torch.randn(7).half(), "scalar": torch.tensor(2.5)}
    path = str(tmp_path / "streamed.pt")
    w = TorchStreamWriter(path)
    refs = {k: w.add(v) for k, v in tensors.items()}
    w.close({"checkpoint_version": 3.0, "iteration": 0, "model": refs, "nested": [refs["half"], {"x": 1}]})
    for mmap in (False, True):
        got = torch.load(path, weights_only=True, mmap=mmap)
        assert got["checkpoint_version"] == 3.0 and got["nested"][1] == {"x": 1}
        for k, v in tensors.items():
            assert got["model"][k].dtype == v.dtype and torch.equal(got["model"][k], v), k
        assert torch.equal(got["nested"][0], tensors["half"])
    assert os.path.getsize(path) < 20_000  # a view stores only its own bytes, not its base storage


def test_training_load_at_another_tp_names_the_reshard_command(tmp_path):
    """The training loader's refusal of a checkpoint saved at another TP points to `megaocto convert reshard`
    (it used to say there was no resharding tool)."""
    from types import SimpleNamespace

    from megaocto.config.base import ConfigError

    cfg, full = _state("tiny-bigcode")
    path = str(tmp_path / "tp1")
    write_megaocto_checkpoint(path, cfg, full, 1, progress=False)
    with pytest.raises(ConfigError, match=rf"saved with tp=1, pp=1 but this run uses tp=2, pp=1; .*megaocto convert "
                                          rf"reshard --load {path} --tp 2 --output DIR"):
        ckpt.load_checkpoint(path, SimpleNamespace(tp=2, pp=1, tp_rank=0, pp_rank=0))


def test_stream_writer_checks_an_untested_torch(tmp_path, monkeypatch, capsys):
    """The writer uses torch's private zip writer: tested torch versions are pinned; on another version a write +
    torch.load(weights_only=True) round trip runs first (a line says so) and a broken one is refused clearly."""
    from megaocto.convert import core

    assert core._torch_minor(torch.__version__) in core.TESTED_TORCH  # the CI torch is a tested one
    monkeypatch.setattr(torch, "__version__", "9.1.0")
    monkeypatch.setattr(core, "_TORCH_WRITER_CHECKED", [])
    w = TorchStreamWriter(str(tmp_path / "a.pt"))
    w.close({"model": {"x": w.add(torch.ones(3))}})
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["model"]["x"], torch.ones(3))
    assert "torch 9.1.0 is not among the versions the streaming checkpoint writer is tested with" in \
        capsys.readouterr().err
    assert not os.path.exists(tmp_path / ".torch_writer_check.pt")

    class Broken:  # a torch whose private writer changed its signature
        def __init__(self, *args):
            raise TypeError("PyTorchFileWriter(): incompatible constructor arguments")

    monkeypatch.setattr(core, "_TORCH_WRITER_CHECKED", [])
    monkeypatch.setattr(torch._C, "PyTorchFileWriter", Broken)
    with pytest.raises(ConversionError, match=r"torch 9\.1\.0: megaocto's streaming checkpoint writer .* tested with "
                                              r"torch 2\.13\) does not work with this version \(TypeError"):
        TorchStreamWriter(str(tmp_path / "b.pt"))

"""Converter CLI and error paths: every HF tensor shape checked before writing (MQA/MHA and GLM K/V mismatches),
the original SantaCoder GPT2-MQ layout refused with a hint, internal errors exit 1, --verify-tol (exit 1 above
it), one model in memory at a time while verifying, to-hf of a bf16 training iter_* checkpoint (stored dtype kept,
`to-hf --verify`), an untied GPTBigCode round trip, and from-megatron's --tp error / metadata / --quiet."""
import json
import os
import weakref

import pytest
import torch

from megaocto.cli import main
from megaocto.config.model import ModelConfig
from megaocto.convert import core
from megaocto.convert.core import ConversionError, VerifyError
from megaocto.convert.hf import from_hf, to_hf
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext
from megaocto import checkpoint as ckpt
from test_convert_hf import V, _bigcode, _glm, _safetensors
from test_convert_megatron import _reference, build_megatron_checkpoint


def _save(model, path, **config_changes):
    model.save_pretrained(path)
    if config_changes:
        conf_path = os.path.join(path, "config.json")
        conf = json.load(open(conf_path))
        conf.update(config_changes)
        json.dump(conf, open(conf_path, "w"))
    return path


def _no_output(tmp_path, name="out"):
    return not (tmp_path / name).exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]


# ------------------------------------------------------------------------------------------ shapes before writing
def test_config_weights_mismatch_names_file_and_tensor_before_writing(tmp_path, capsys):
    mha_as_mqa = _save(_bigcode(False), str(tmp_path / "mha"), multi_query=True)  # c_attn has 3h rows, not h+2d
    with pytest.raises(ConversionError, match=r"model\.safetensors: transformer\.h\.0\.attn\.c_attn\.weight has "
                                              r"shape \(96, 32\) but .*config\.json implies \(48, 32\)"):
        from_hf(mha_as_mqa, str(tmp_path / "out"), progress=False)
    assert _no_output(tmp_path)
    assert main(["convert", "from-hf", "--hf", mha_as_mqa, "--output", str(tmp_path / "out")]) == 2
    assert "c_attn.weight has shape (96, 32)" in capsys.readouterr().err
    glm = _save(_glm(), str(tmp_path / "glm"), num_key_value_heads=4)  # weights have 2 K/V heads
    with pytest.raises(ConversionError, match=r"model\.safetensors: model\.layers\.0\.self_attn\.k_proj\.weight has "
                                              r"shape \(16, 32\) but .* implies \(32, 32\)"):
        from_hf(glm, str(tmp_path / "out"), progress=False)
    assert _no_output(tmp_path)


def test_original_santacoder_layout_is_refused_with_a_hint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "santacoder"
    path.mkdir()
    json.dump({"architectures": ["GPT2LMHeadCustomModel"], "model_type": "gpt2", "n_head": 16, "n_embd": 2048,
               "n_layer": 24, "attention_head_type": "multiquery", "vocab_size": 49280}, open(path / "config.json", "w"))
    save_file({"transformer.wte.weight": torch.zeros(2, 2)}, str(path / "model.safetensors"))
    with pytest.raises(ConversionError, match="bigcode/gpt_bigcode-santacoder"):
        from_hf(str(path), str(tmp_path / "out"), progress=False)
    assert _no_output(tmp_path)


def test_internal_errors_exit_1_with_a_report_hint(tmp_path, capsys, monkeypatch):
    import megaocto.convert.hf as hf

    def broken(*args, **kwargs):
        raise RuntimeError("shape '[4, 3, 8, 32]' is invalid")

    monkeypatch.setattr(hf, "from_hf", broken)
    assert main(["convert", "from-hf", "--hf", str(tmp_path), "--output", str(tmp_path / "out")]) == 1
    assert "internal error (please report): RuntimeError: shape" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ --verify
def test_verify_tolerance_exit_codes(tmp_path, capsys):
    src = _save(_bigcode(True), str(tmp_path / "mqa"))
    base = ["convert", "from-hf", "--hf", src, "--dtype", "bf16", "--verify", "--quiet"]
    assert main([*base, "--output", str(tmp_path / "a")]) == 0  # bf16's default tolerance is relative
    out = capsys.readouterr().out
    diff = float(out.split("max abs logit difference (HF gpt_bigcode vs megaocto tp=1):")[1].split()[0])
    assert diff > 0 and "verify: ok (tolerance" in out
    assert main([*base, "--output", str(tmp_path / "b"), "--verify-tol", f"{diff / 2:g}"]) == 1
    err = capsys.readouterr().err
    assert "verify failed" in err and "above the tolerance" in err and os.path.isdir(tmp_path / "b")
    assert main(["convert", "from-hf", "--hf", src, "--output", str(tmp_path / "c"), "--verify-tol", "1"]) == 2
    assert "--verify-tol needs --verify" in capsys.readouterr().err
    with pytest.raises(VerifyError, match="above the tolerance"):  # library: the same limit
        core.verify_logits(lambda ids: torch.zeros(2, 16, 5), lambda ids: torch.full((2, 16, 5), 0.01), 5)


def test_verify_holds_one_model_at_a_time():
    alive = []

    def make_a():
        model = torch.nn.Linear(4, 7)
        alive.append(weakref.ref(model))
        return lambda ids: model(torch.ones(*ids.shape, 4))

    def make_b():
        assert alive[0]() is None, "the first model is still alive while the second is built"
        return lambda ids: torch.zeros(*ids.shape, 7)

    with pytest.raises(VerifyError):
        core.verify_lazy(make_a, make_b, 7, tol=1e-9)


# ------------------------------------------------------------------------------------------ to-hf
def test_to_hf_of_a_bf16_training_checkpoint_keeps_bf16_and_verifies(tmp_path, capsys):
    cfg = ModelConfig.from_preset("tiny-bigcode", vocab_size=V)
    torch.manual_seed(0)
    state = {k: v.to(torch.bfloat16) for k, v in build_model(cfg, ParallelContext.single()).state_dict().items()}
    save = str(tmp_path / "train")
    ckpt.save_checkpoint(save, 7, {"checkpoint_version": 3.0, "iteration": 7, "model": state,
                                   "optimizer": {"step": torch.zeros(1)}},
                         {"config": {"model": cfg.to_dict()}}, ParallelContext.single())
    assert "dtype" not in json.load(open(os.path.join(save, "iter_0000007", "metadata.json")))
    out = str(tmp_path / "hf")
    assert main(["convert", "to-hf", "--load", save, "--output", out, "--verify", "--quiet"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("max abs logit difference"))
    assert float(line.rsplit(":", 1)[1]) <= 1e-4  # bf16 weights on both sides, both run in fp32
    tensors = _safetensors(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.equal(tensors["transformer.wte.weight"], state["embedding.word_embeddings.weight"][:V])
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"


def test_untied_gpt_bigcode_round_trip(tmp_path):
    model = _bigcode(True, tie_word_embeddings=False)
    src = _save(model, str(tmp_path / "untied"))
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    ck = str(tmp_path / "ck")
    assert from_hf(src, ck, tp=2, verify=True, progress=False) <= 1e-4
    cfg, _ = core.read_megaocto_checkpoint(ck)
    assert not cfg.tie_embeddings
    back = str(tmp_path / "back")
    assert to_hf(ck, back, verify=True, progress=False) <= 1e-4
    original, exported = _safetensors(src), _safetensors(back)
    assert "lm_head.weight" in exported and set(original) <= set(exported)
    for k, v in original.items():
        assert torch.equal(exported[k], v), k


# ------------------------------------------------------------------------------------------ from-megatron
def test_from_megatron_tp_error_metadata_and_quiet(tmp_path, capsys):
    cfg, model = _reference("multiquery", seed=1)
    root = str(tmp_path / "meg")
    build_megatron_checkpoint(root, cfg, model, tp=1, head_type="multiquery", iteration=5)
    assert main(["convert", "from-megatron", "--load", root, "--output", str(tmp_path / "t3"), "--tp", "3"]) == 2
    assert "megaocto convert from-megatron: error: --tp=3:" in capsys.readouterr().err
    out = str(tmp_path / "out")
    assert main(["convert", "from-megatron", "--load", root, "--output", out, "--quiet"]) == 0
    assert "from-megatron:" not in capsys.readouterr().err
    meta = json.load(open(os.path.join(out, "release", "metadata.json")))
    assert "source" not in meta
    assert meta["converted_from"]["kind"] == "megatron" and meta["converted_from"]["iteration"] == 5

"""`megaocto convert` with LoRA: to-hf --lora-format peft loads with PeftModel.from_pretrained (same logits as
megaocto), --merge-lora writes a full HF model (same logits), from-hf --lora reads a PEFT folder back onto a
converted base, and bad combinations get one-line errors (exit 2)."""
import io
import json
import os

import pytest
import torch

from megaocto.cli import main
from megaocto.config.loader import load_run_config
from megaocto.training.loop import Trainer, train

peft = pytest.importorskip("peft")
LORA = ["--model.lora.rank", "4", "--model.lora.alpha", "8", "--model.lora.target_modules", "[c_attn, c_proj, c_fc]"]


def _cfg(tmp, *extra, iters=2):
    return load_run_config(None, [
        "--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--train.iters", str(iters),
        "--train.micro_batch_size", "2", "--train.global_batch_size", "2", "--train.dtype", "fp32",
        "--train.seed", "3", "--optimizer.lr", "2e-2", "--schedule.warmup_iters", "1",
        "--logging.run_dir", str(tmp / "run"), "--data.num_workers", "0", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_convert")
    base, lora = str(tmp / "base"), str(tmp / "lora")
    train(_cfg(tmp, "--checkpoint.save", base), stream=io.StringIO())
    train(_cfg(tmp, *LORA, "--checkpoint.load", base, "--checkpoint.save", lora, iters=3), stream=io.StringIO())
    base_hf = str(tmp / "base_hf")
    assert main(["convert", "to-hf", "--load", base, "--output", base_hf, "--quiet"]) == 0
    return tmp, base, lora, base_hf


def _ours_logits(tmp, lora, ids):
    tr = Trainer(_cfg(tmp, *LORA, "--checkpoint.save", lora, iters=3), stream=io.StringIO())
    assert tr.iteration == 3
    tr.model.eval()
    with torch.no_grad():
        return tr.model(ids)[..., :tr.cfg.model.vocab_size]


def test_to_hf_peft_and_merged_match_megaocto(runs):
    from transformers import AutoModelForCausalLM

    tmp, base, lora, base_hf = runs
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = _ours_logits(tmp, lora, ids)
    out = str(tmp / "adapter")
    assert main(["convert", "to-hf", "--load", lora, "--output", out, "--lora-format", "peft", "--quiet"]) == 0
    conf = json.load(open(os.path.join(out, "adapter_config.json")))
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["base_model_name_or_path"] == os.path.abspath(base)
    hf = AutoModelForCausalLM.from_pretrained(base_hf).eval()
    with torch.no_grad():
        plain = hf(input_ids=ids).logits
        peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
        theirs = peft_model(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the trained adapters change the model
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    merged = str(tmp / "merged_hf")
    assert main(["convert", "to-hf", "--load", lora, "--output", merged, "--merge-lora", "--quiet"]) == 0
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
    torch.testing.assert_close(m, ours, atol=1e-4, rtol=1e-4)

    # from-hf --lora: the PEFT folder back onto the converted base; training from it continues with the same model
    back = str(tmp / "back")
    assert main(["convert", "from-hf", "--hf", base_hf, "--lora", out, "--output", back, "--quiet"]) == 0
    tr = Trainer(_cfg(tmp, *LORA, "--checkpoint.load", back, "--checkpoint.save", str(tmp / "cont")),
                 stream=io.StringIO())
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tr.model(ids)[..., :1000], ours, atol=1e-4, rtol=1e-4)


def test_lora_convert_errors_are_one_line(runs, tmp_path, capsys):
    tmp, base, lora, base_hf = runs
    assert main(["convert", "to-hf", "--load", lora, "--output", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds LoRA adapters" in err[0]
    assert main(["convert", "reshard", "--load", lora, "--output", str(tmp_path / "r"), "--tp", "2"]) == 2
    assert "holds LoRA adapters" in capsys.readouterr().err
    assert main(["convert", "to-hf", "--load", base, "--output", str(tmp_path / "y"), "--lora-format", "peft"]) == 2
    assert "not a LoRA checkpoint" in capsys.readouterr().err
    out = str(tmp_path / "adapter")
    assert main(["convert", "to-hf", "--load", lora, "--output", out, "--lora-format", "peft", "--quiet"]) == 0
    conf_path = os.path.join(out, "adapter_config.json")
    conf = json.load(open(conf_path))
    json.dump({**conf, "r": 8}, open(conf_path, "w"))
    capsys.readouterr()
    assert main(["convert", "from-hf", "--hf", base_hf, "--lora", out, "--output", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has rank 4 but adapter_config.json says r=8" in err[0], err
    # an adapter of another base model (wider hidden size)
    json.dump(conf, open(conf_path, "w"))
    other = str(tmp_path / "other")
    train(_cfg(tmp_path, "--model.hidden_size", "128", "--checkpoint.save", other, iters=1), stream=io.StringIO())
    other_hf = str(tmp_path / "other_hf")
    assert main(["convert", "to-hf", "--load", other, "--output", other_hf, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", "from-hf", "--hf", other_hf, "--lora", out, "--output", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another base model" in err[0], err


def test_generation_loads_a_lora_checkpoint(runs):
    """megaocto generate / eval (generation.loading) load a LoRA checkpoint: base from its reference + adapters."""
    from megaocto.generation.loading import load_checkpoint_model

    tmp, base, lora, base_hf = runs
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    model, cfg = load_checkpoint_model(lora)
    assert cfg.lora.rank == 4
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :1000], _ours_logits(tmp, lora, ids), atol=1e-5, rtol=1e-5)

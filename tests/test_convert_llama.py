"""HF ``LlamaForCausalLM`` <-> megaocto llama: tiny random GQA (linear RoPE scaling), MHA and single-K/V models with
an odd vocabulary; --verify at tp=1, bit-exact HF -> megaocto -> HF, tp=2 forward under gloo with K/V heads split
and replicated, reshard (incl. replicated K/V at tp=4), errors before writing, and the exported folder generating
the same greedy tokens in transformers as megaocto's generate."""
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megaocto.config.model import ModelConfig
from megaocto.convert.core import ConversionError
from megaocto.convert.hf import from_hf, to_hf
from megaocto.convert.reshard import reshard
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext
from megaocto import checkpoint as ckpt

V = 131  # odd vocabulary: padded to 256 rows in megaocto, trimmed again on export
TOL = 1e-4


def _llama(kv_heads, rope, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-6,
                       rope_parameters=rope, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(conf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # random norm weights too
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


KINDS = {"gqa": (2, {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}),
         "mha": (4, {"rope_type": "default", "rope_theta": 10000.0}),
         "one_kv": (1, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})}


def _ids(seed=5, s=12):
    return torch.randint(0, V, (2, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{kind: (hf dir, reference logits on _ids())}."""
    root = tmp_path_factory.mktemp("hf_llama")
    out = {}
    for i, (kind, (kv, rope)) in enumerate(KINDS.items()):
        model = _llama(kv, rope, seed=10 + i)
        path = str(root / kind)
        model.save_pretrained(path)
        with torch.no_grad():
            out[kind] = (path, model(_ids()).logits)
    return out


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _megaocto_logits(ckpt_dir):
    meta = json.load(open(os.path.join(ckpt_dir, "release", "metadata.json")))
    model = build_model(ModelConfig(**meta["config"]["model"]), ParallelContext.single()).eval()
    model.load_state_dict(torch.load(ckpt.model_file(ckpt_dir, "release", 0), weights_only=True)["model"])
    with torch.no_grad():
        return model(_ids())[..., :V]


@pytest.mark.parametrize("kind", list(KINDS))
def test_from_hf_verify_logits_and_back_bit_exact(hf_dirs, tmp_path, capsys, kind):
    src, ref = hf_dirs[kind]
    out = str(tmp_path / "ck")
    diff = from_hf(src, out, tp=1, verify=True, progress=False)
    assert diff is not None and diff <= TOL
    assert "max abs logit difference (HF llama vs megaocto tp=1)" in capsys.readouterr().out
    assert (_megaocto_logits(out) - ref).abs().max().item() <= TOL
    meta = json.load(open(os.path.join(out, "release", "metadata.json")))
    model_cfg = meta["config"]["model"]
    assert model_cfg["family"] == "llama" and model_cfg["num_query_groups"] == KINDS[kind][0]
    assert model_cfg["rope_scaling_factor"] == KINDS[kind][1].get("factor", 1.0)
    token_ids = {k: v for k, v in meta["converted_from"]["token_ids"].items() if v is not None}
    assert token_ids == {"bos_token_id": 1, "eos_token_id": 2}

    back = str(tmp_path / "hf")
    assert to_hf(out, back, verify=True, progress=False) <= TOL
    a, b = _safetensors(src), _safetensors(back)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    src_conf = json.load(open(os.path.join(src, "config.json")))
    out_conf = json.load(open(os.path.join(back, "config.json")))
    for key in ("model_type", "architectures", "vocab_size", "num_key_value_heads", "rope_parameters",
                "rms_norm_eps", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert src_conf.get(key) == out_conf.get(key), key


def _tp2_body(rank, world_size, cases):
    pc = ParallelContext.init(tp=2)
    for ckpt_dir, ref, split in cases:
        meta = json.load(open(os.path.join(ckpt_dir, "release", "metadata.json")))
        model = build_model(ModelConfig(**meta["config"]["model"]), pc).eval()
        assert model.layers[0].self_attention.kv_split == split
        model.load_state_dict(torch.load(ckpt.model_file(ckpt_dir, "release", pc.tp_rank), weights_only=True)["model"])
        with torch.no_grad():
            local = model(_ids())
        parts = [torch.empty_like(local) for _ in range(pc.tp)]
        dist.all_gather(parts, local.contiguous(), group=pc.tp_group)
        diff = (torch.cat(parts, dim=-1)[..., :V] - ref).abs().max().item()
        assert diff <= TOL, (ckpt_dir, diff)


def test_tp2_split_and_replicated_kv_forward_matches_hf(hf_dirs, tmp_path):
    cases = []
    for kind, split in (("gqa", True), ("one_kv", False)):
        src, ref = hf_dirs[kind]
        out = str(tmp_path / kind)
        from_hf(src, out, tp=2, progress=False)
        r0, r1 = (torch.load(ckpt.model_file(out, "release", r), weights_only=True)["model"] for r in (0, 1))
        kv = "layers.0.self_attention.key_value.weight"
        # split: each rank holds [k | v] of its own group (2 x 8 rows); replicated: both ranks hold the whole
        # projection (one K/V head: also 2 x 8 rows), the same on both
        assert r0[kv].shape == (16, 32) and torch.equal(r0[kv], r1[kv]) != split
        cases.append((out, ref, split))
    run_distributed(_tp2_body, 2, cases)


def test_reshard_replicated_kv_and_back_bit_exact(hf_dirs, tmp_path):
    src, ref = hf_dirs["gqa"]  # 2 K/V heads: tp=4 replicates them on every rank
    tp1, tp4, back1 = (str(tmp_path / n) for n in ("tp1", "tp4", "back1"))
    from_hf(src, tp1, tp=1, progress=False)
    assert reshard(tp1, tp4, tp=4, verify=True, progress=False) <= TOL
    shards = [torch.load(ckpt.model_file(tp4, "release", r), weights_only=True)["model"] for r in range(4)]
    full = torch.load(ckpt.model_file(tp1, "release", 0), weights_only=True)["model"]
    kv = "layers.1.self_attention.key_value.weight"
    assert all(torch.equal(s[kv], full[kv]) for s in shards)
    q = "layers.1.self_attention.query.weight"
    assert torch.equal(torch.cat([s[q] for s in shards]), full[q])
    reshard(tp4, back1, tp=1, progress=False)
    again = torch.load(ckpt.model_file(back1, "release", 0), weights_only=True)["model"]
    assert set(again) == set(full) and all(torch.equal(again[k], full[k]) for k in full)
    hf_back = str(tmp_path / "hf")
    to_hf(tp4, hf_back, progress=False)  # straight from tp=4
    a, b = _safetensors(src), _safetensors(hf_back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _expect_error(tmp_path, match, fn, *args, **kw):
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    with pytest.raises(ConversionError, match=match):
        fn(*args, str(out), **kw)
    assert not out.exists() and set(os.listdir(tmp_path)) == before  # nothing written, no partial directory


def _edited(tmp_path, src, name, **changes):
    path = tmp_path / name
    shutil.copytree(src, path)
    conf = json.load(open(path / "config.json"))
    conf.update(changes)
    (path / "config.json").write_text(json.dumps(conf))
    return str(path)


def test_errors_are_raised_before_writing(hf_dirs, tmp_path):
    src = hf_dirs["gqa"][0]
    _expect_error(tmp_path, r"--tp=3: model.num_attention_heads=4 is not divisible by tp=3", from_hf, src, tp=3)
    bad = _edited(tmp_path, src, "dyn", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    _expect_error(tmp_path, "rope scaling type 'dynamic' is not supported", from_hf, bad)
    bad = _edited(tmp_path, src, "tied", tie_word_embeddings=True)
    _expect_error(tmp_path, "tie_word_embeddings=true is not supported", from_hf, bad)
    bad = _edited(tmp_path, src, "act", hidden_act="gelu")
    _expect_error(tmp_path, "hidden_act='gelu'", from_hf, bad)
    bad = _edited(tmp_path, src, "kv", num_key_value_heads=4)  # config says MHA, weights are GQA
    _expect_error(tmp_path, r"model.layers.0.self_attn.k_proj.weight has shape \(16, 32\) but .*config.json implies "
                  r"\(32, 32\)", from_hf, bad)
    bad = _edited(tmp_path, src, "deeper", num_hidden_layers=3)
    _expect_error(tmp_path, r"model.safetensors: 9 tensor\(s\) missing", from_hf, bad)
    bad = _edited(tmp_path, src, "nolayers")
    conf = json.load(open(os.path.join(bad, "config.json")))
    del conf["num_hidden_layers"]
    open(os.path.join(bad, "config.json"), "w").write(json.dumps(conf))
    _expect_error(tmp_path, "field 'num_hidden_layers' missing", from_hf, bad)
    shutil.rmtree(bad)
    ck = tmp_path / "ck"
    from_hf(src, str(ck), progress=False)
    with pytest.raises(ConversionError, match="already exists"):
        from_hf(src, str(ck), progress=False)
    _expect_error(tmp_path, r"--tp=3: model.num_attention_heads=4", reshard, str(ck), tp=3)


def test_exported_folder_generates_the_same_greedy_tokens(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from megaocto.generation.generate import GenerationConfig, generate
    from megaocto.generation.loading import load_checkpoint_model

    ck, exported = str(tmp_path / "ck"), str(tmp_path / "hf")
    from_hf(hf_dirs["gqa"][0], ck, tp=1, progress=False)
    to_hf(ck, exported, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    model, _ = load_checkpoint_model(ck)
    prompts = [[1, 17, 30, 42, 8], [1, 99]]
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=8))
    for prompt, new in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert new == ref[0, len(prompt):].tolist()

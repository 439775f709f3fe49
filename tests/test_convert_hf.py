"""HF <-> megaocto converters: tiny random GPTBigCode (MQA, MHA, odd vocab) and Glm models, logits parity at tp=1
and tp=2 (gloo), bit-exact HF -> megaocto -> HF, original ChatGLM2 layout import, complete HF output (shards,
index, generation config, tokenizer), errors before writing, the CLI's --verify, and finetuning from a
converted checkpoint."""
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megaocto.config.model import ModelConfig
from megaocto.convert.core import ConversionError, read_megaocto_checkpoint, write_megaocto_checkpoint
from megaocto.convert.hf import from_hf, to_hf
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext
from megaocto import checkpoint as ckpt

V = 131  # odd vocabulary: padded to 256 rows in megaocto, trimmed again on export
TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-trivial biases and norm weights too
            base = 1.0 if name.endswith("weight") and ("ln_" in name or "norm" in name) else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + base)
    return model.eval()


def _bigcode(multi_query, **kw):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    conf = dict(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=64, multi_query=multi_query,
                activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                bos_token_id=0, eos_token_id=0)
    conf.update(kw)
    return _randomize(GPTBigCodeForCausalLM(GPTBigCodeConfig(**conf)), 1 if multi_query else 2)


def _glm():
    from transformers import GlmConfig, GlmForCausalLM

    conf = GlmConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention_bias=True,
                     tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"})
    return _randomize(GlmForCausalLM(conf), 3)


def _ids(seed=5, s=12):
    return torch.randint(0, V, (2, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{kind: (hf dir, reference logits on _ids())} for mqa, mha, glm."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind, model in (("mqa", _bigcode(True)), ("mha", _bigcode(False)), ("glm", _glm())):
        path = str(root / kind)
        model.save_pretrained(path)
        with torch.no_grad():
            out[kind] = (path, model(_ids()).logits)
    return out


def _megaocto_logits(ckpt_dir):
    cfg, tensors = read_megaocto_checkpoint(ckpt_dir)
    model = build_model(cfg, ParallelContext.single()).eval()
    state = torch.load(ckpt.model_file(ckpt_dir, "release", 0), weights_only=True)["model"]
    model.load_state_dict(state)  # exactly what `megaocto train --checkpoint.load` does
    with torch.no_grad():
        return model(_ids())[..., :V]


def _safetensors(path):
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


# ------------------------------------------------------------------------------------------ tp=1 + round trip
@pytest.mark.parametrize("kind", ["mqa", "mha", "glm"])
def test_hf_to_megaocto_tp1_logits_and_back_bit_exact(hf_dirs, tmp_path, capsys, kind):
    src, ref = hf_dirs[kind]
    out = str(tmp_path / "ck")
    diff = from_hf(src, out, tp=1, verify=True, progress=False)
    assert diff is not None and diff <= TOL
    assert "max abs logit difference" in capsys.readouterr().out
    got = _megaocto_logits(out)
    assert (got - ref).abs().max().item() <= TOL
    meta = json.load(open(os.path.join(out, "release", "metadata.json")))
    assert meta["tp"] == 1 and meta["iteration"] == "release" and meta["config"]["model"]["vocab_size"] == V
    assert open(os.path.join(out, ckpt.TRACKER)).read().strip() == "release"
    # vocab rows padded in megaocto (zeros), trimmed on export
    state = torch.load(ckpt.model_file(out, "release", 0), weights_only=True)["model"]
    assert state["embedding.word_embeddings.weight"].shape[0] == 256
    assert not state["embedding.word_embeddings.weight"][V:].any()

    back = str(tmp_path / "hf")
    diff = to_hf(out, back, verify=True, progress=False)
    assert diff <= TOL
    a, b = _safetensors(src), _safetensors(back)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for fname in ("config.json", "generation_config.json"):
        assert os.path.exists(os.path.join(back, fname))
    src_conf = json.load(open(os.path.join(src, "config.json")))
    out_conf = json.load(open(os.path.join(back, "config.json")))
    for key in ("model_type", "vocab_size", "architectures", "eos_token_id"):
        assert src_conf.get(key) == out_conf.get(key), key


# ------------------------------------------------------------------------------------------ tp=2 under gloo
def _tp2_body(rank, world_size, cases):
    pc = ParallelContext.init(tp=2)
    for ckpt_dir, ref in cases:
        meta = json.load(open(os.path.join(ckpt_dir, "release", "metadata.json")))
        cfg = ModelConfig(**meta["config"]["model"])
        model = build_model(cfg, pc).eval()
        state = torch.load(ckpt.model_file(ckpt_dir, "release", pc.tp_rank), weights_only=True)["model"]
        model.load_state_dict(state)
        with torch.no_grad():
            local = model(_ids())
        parts = [torch.empty_like(local) for _ in range(pc.tp)]
        dist.all_gather(parts, local.contiguous(), group=pc.tp_group)
        logits = torch.cat(parts, dim=-1)[..., :V]
        diff = (logits - ref).abs().max().item()
        assert diff <= TOL, (ckpt_dir, diff)


def test_hf_to_megaocto_tp2_forward_matches_hf(hf_dirs, tmp_path):
    cases = []
    for kind in ("mqa", "mha", "glm"):
        src, ref = hf_dirs[kind]
        out = str(tmp_path / kind)
        from_hf(src, out, tp=2, progress=False)
        assert sorted(os.listdir(os.path.join(out, "release"))) == ["metadata.json", "mp_rank_00", "mp_rank_01"]
        cases.append((out, ref))
    run_distributed(_tp2_body, 2, cases)
    # the tp=2 checkpoint exports to the same HF tensors as the source
    back = str(tmp_path / "mqa_hf")
    to_hf(cases[0][0], back, progress=False)
    a, b = _safetensors(hf_dirs["mqa"][0]), _safetensors(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ original ChatGLM2 layout
def _chatglm_dir(tmp_path, model):
    """Write ``model`` (a native GlmForCausalLM) in the original ChatGLM2/CodeGeeX2 layout: sharded pytorch_model
    .bin files with an index, ChatGLM config.json. This fixture builds the layout from its documentation."""
    c = model.config
    sd = model.state_dict()
    n, g, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, d // 2, 2).float() / (d // 2))),
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        s, t = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        out[t + "input_layernorm.weight"] = sd[s + "input_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[t + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[s + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[t + "self_attention.dense.weight"] = sd[s + "self_attn.o_proj.weight"]
        out[t + "post_attention_layernorm.weight"] = sd[s + "post_attention_layernorm.weight"]
        out[t + "mlp.dense_h_to_4h.weight"] = sd[s + "mlp.gate_up_proj.weight"]
        out[t + "mlp.dense_4h_to_h.weight"] = sd[s + "mlp.down_proj.weight"]
    path = tmp_path / "chatglm"
    path.mkdir()
    names = sorted(out)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, keys in halves.items():
        torch.save({k: out[k].clone() for k in keys}, path / fname)
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True,
        "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": c.intermediate_size,
        "hidden_size": c.hidden_size, "kv_channels": d, "layernorm_epsilon": c.rms_norm_eps,
        "multi_query_attention": True, "multi_query_group_num": g, "num_attention_heads": n,
        "num_layers": c.num_hidden_layers, "original_rope": True, "padded_vocab_size": c.vocab_size,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": 64, "eos_token_id": 2, "pad_token_id": 0}))
    return str(path)


def test_chatglm2_layout_import(hf_dirs, tmp_path, capsys):
    src, ref = hf_dirs["glm"]
    from transformers import GlmForCausalLM

    path = _chatglm_dir(tmp_path, GlmForCausalLM.from_pretrained(src))
    out = str(tmp_path / "ck")
    diff = from_hf(path, out, tp=2, verify=True, progress=False)
    assert diff <= TOL and "ChatGLM" not in capsys.readouterr().err
    got = _megaocto_logits_any_tp(out)
    assert (got - ref).abs().max().item() <= TOL
    # and on to the native layout: the same tensors as the native source
    back = str(tmp_path / "native")
    to_hf(out, back, progress=False)
    a, b = _safetensors(src), _safetensors(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _megaocto_logits_any_tp(ckpt_dir):
    from megaocto.convert.core import megaocto_logits_fn

    cfg, tensors = read_megaocto_checkpoint(ckpt_dir)
    return megaocto_logits_fn(cfg, tensors)(_ids())


# ------------------------------------------------------------------------------------------ HF output details
def test_sharded_export_with_tokenizer_loads_offline(hf_dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "ck")
    from_hf(hf_dirs["mqa"][0], out, tp=2, dtype="bf16", progress=False)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(100)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_path = str(tmp_path / "tokenizer.json")
    tok.save(tok_path)
    back = str(tmp_path / "hf")
    to_hf(out, back, dtype="fp32", tokenizer=tok_path, max_shard_size="30KB", progress=False)
    files = sorted(os.listdir(back))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "tokenizer.json" in files
    index = json.load(open(os.path.join(back, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(shards)
    assert all(os.path.getsize(os.path.join(back, s)) < 30_000 + 20_000 for s in shards)
    assert not [f for f in os.listdir(tmp_path) if ".partial-" in f]
    model = AutoModelForCausalLM.from_pretrained(back, local_files_only=True)
    assert model.config.vocab_size == V and model.dtype == torch.float32
    assert AutoTokenizer.from_pretrained(back, local_files_only=True)("t3 t7")["input_ids"] == [3, 7]
    # bf16 in the checkpoint -> the exported fp32 weights are the bf16 values
    src = _safetensors(hf_dirs["mqa"][0])["transformer.wte.weight"]
    assert torch.equal(_safetensors(back)["transformer.wte.weight"], src.to(torch.bfloat16).float())


# ------------------------------------------------------------------------------------------ errors before writing
def _expect_error(tmp_path, match, fn, *args, **kw):
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    with pytest.raises((ConversionError, ckpt.CheckpointError), match=match):  # checkpoint reading: CheckpointError
        fn(*args, str(out), **kw)
    assert not out.exists() and set(os.listdir(tmp_path)) == before  # nothing written, no partial directory


def test_errors_are_raised_before_writing(hf_dirs, tmp_path):
    src = hf_dirs["mqa"][0]
    _expect_error(tmp_path, r"--tp=3: model.num_attention_heads=4 is not divisible by tp=3", from_hf, src, tp=3)
    _expect_error(tmp_path, "num_query_groups=2 is not divisible by tp=4", from_hf, hf_dirs["glm"][0], tp=4)

    wrong = tmp_path / "wrong"
    shutil.copytree(src, wrong)
    conf = json.load(open(wrong / "config.json"))
    conf.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (wrong / "config.json").write_text(json.dumps(conf))
    _expect_error(tmp_path, r"config.json: unsupported architecture \(model_type='qwen2'", from_hf, str(wrong))

    mismatch = tmp_path / "mismatch"
    shutil.copytree(src, mismatch)
    conf = json.load(open(mismatch / "config.json"))
    conf["n_layer"] = 3
    (mismatch / "config.json").write_text(json.dumps(conf))
    _expect_error(tmp_path, r"model.safetensors: 12 tensor\(s\) missing", from_hf, str(mismatch))

    missing = tmp_path / "missing"
    missing.mkdir()
    _expect_error(tmp_path, "config.json: missing", from_hf, str(missing))
    shutil.copy(os.path.join(src, "config.json"), missing / "config.json")
    _expect_error(tmp_path, "no weights found", from_hf, str(missing))
    (missing / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    _expect_error(tmp_path, "names shard\\(s\\) that are missing: model-00001-of-00002.safetensors", from_hf,
                  str(missing))

    from safetensors.torch import load_file, save_file
    quant = tmp_path / "quant"
    shutil.copytree(src, quant)
    state = load_file(quant / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"] = state["transformer.h.0.mlp.c_fc.weight"].to(torch.int8)
    save_file(state, quant / "model.safetensors", metadata={"format": "pt"})
    _expect_error(tmp_path, "transformer.h.0.mlp.c_fc.weight: tensor dtype torch.int8 is not supported", from_hf,
                  str(quant))
    _expect_error(tmp_path, "unsupported dtype 'int4'", from_hf, src, dtype="int4")

    ck = tmp_path / "ck"
    from_hf(src, str(ck), progress=False)
    with pytest.raises(ConversionError, match="already exists"):
        from_hf(src, str(ck), progress=False)
    _expect_error(tmp_path, "--max-shard-size='lots'", to_hf, str(ck), max_shard_size="lots")
    _expect_error(tmp_path, "latest_checkpointed_iteration.txt: missing", to_hf, str(tmp_path / "missing"))
    gqa = ModelConfig.from_preset("tiny-bigcode", num_query_groups=2, vocab_size=V)
    torch.manual_seed(0)
    write_megaocto_checkpoint(str(tmp_path / "gqa"), gqa, build_model(gqa, ParallelContext.single()).state_dict(), 1,
                              progress=False)
    _expect_error(tmp_path, "num_query_groups=2 \\(grouped K/V\\) has no GPTBigCode equivalent", to_hf,
                  str(tmp_path / "gqa"))


def test_a_failing_stream_leaves_no_directory(tmp_path):
    cfg = ModelConfig.from_preset("tiny-bigcode", vocab_size=V)
    torch.manual_seed(0)
    state = build_model(cfg, ParallelContext.single()).state_dict()
    for broken, match in (({k: v for k, v in state.items() if k != "final_layernorm.bias"},
                           r"1 parameter\(s\) missing.*final_layernorm.bias"),
                          ({**state, "layers.1.mlp.dense_h_to_4h.weight": torch.zeros(3, 3)},
                           r"layers.1.mlp.dense_h_to_4h.weight: shape \(3, 3\)"),
                          ({**state, "extra.weight": torch.zeros(1)}, "'extra.weight' is not a parameter")):
        _expect_error(tmp_path, match, lambda out, b=broken: write_megaocto_checkpoint(out, cfg, b, 2, progress=False))


# ------------------------------------------------------------------------------------------ CLI + training
def test_cli_from_hf_verify_prints_the_difference(hf_dirs, tmp_path, capsys):
    out = str(tmp_path / "ck")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "convert", "hf_to_megaocto.py"), "--hf",
                           hf_dirs["mha"][0], "--output", out, "--tp", "2", "--verify"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("max abs logit difference"))
    assert float(line.rsplit(":", 1)[1]) <= TOL
    assert "[convert] layers.1 (3/4)" in proc.stderr and "ETA" in proc.stderr  # per-layer progress on stderr
    from megaocto.cli import main

    assert main(["convert", "reshard", "--load", out, "--output", str(tmp_path / "r3"), "--tp", "3"]) == 2
    assert "megaocto convert reshard: error: --tp=3" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()


def test_finetune_from_a_converted_checkpoint(tmp_path):
    """`megaocto train --checkpoint.load X --checkpoint.finetune true` starts from the converted weights."""
    from megaocto.config.loader import load_run_config
    from megaocto.training.loop import Trainer

    hf = _bigcode(True, vocab_size=1000, n_positions=64, n_embd=64, n_inner=256)  # = the tiny-bigcode preset
    hf_dir = str(tmp_path / "hf")
    hf.save_pretrained(hf_dir)
    converted = str(tmp_path / "ck")
    from_hf(hf_dir, converted, tp=1, progress=False)
    cfg = load_run_config(None, [
        "--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--train.iters", "2",
        "--train.micro_batch_size", "2", "--train.global_batch_size", "2", "--train.dtype", "fp32",
        "--checkpoint.load", converted, "--checkpoint.finetune", "true", "--logging.run_dir", str(tmp_path / "run"),
        "--logging.jsonl", "false", "--data.num_workers", "0"])
    trainer = Trainer(cfg, stream=io.StringIO())
    assert trainer.iteration == 0
    assert torch.equal(trainer.model.state_dict()["layers.1.mlp.dense_4h_to_h.weight"],
                       hf.state_dict()["transformer.h.1.mlp.c_proj.weight"])
    result = trainer.run()
    assert result.iteration == 2 and all(v == v for v in result.losses.values())


def test_finetune_takes_the_architecture_from_the_checkpoint_metadata(tmp_path):
    """checkpoint.use_checkpoint_args (default): no model fields restated; explicit model keys still win; off = the
    configured (here default) model, which then does not fit the checkpoint."""
    from megaocto.config.base import ConfigError
    from megaocto.config.loader import load_run_config
    from megaocto.training.loop import Trainer

    hf = _bigcode(False, n_layer=3, n_embd=48, n_head=6, n_inner=80, n_positions=40, vocab_size=1000)  # MHA
    hf.save_pretrained(str(tmp_path / "hf"))
    converted = str(tmp_path / "ck")
    from_hf(str(tmp_path / "hf"), converted, tp=1, progress=False)
    base = ["--model.seq_length", "16", "--train.iters", "1", "--train.micro_batch_size", "2",
            "--train.global_batch_size", "2", "--train.dtype", "fp32", "--checkpoint.load", converted,
            "--checkpoint.finetune", "true", "--logging.run_dir", str(tmp_path / "run"), "--logging.jsonl", "false",
            "--data.num_workers", "0", "--model.hidden_dropout", "0.0"]
    cfg = load_run_config(None, base + ["--model.preset", "tiny-bigcode"])  # a preset does not beat the checkpoint
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
            m.vocab_size, m.max_position_embeddings) == (3, 48, 6, 6, 80, 1000, 40)
    assert (m.seq_length, m.hidden_dropout) == (16, 0.0)  # run choices stay the configured ones
    trainer = Trainer(cfg, stream=io.StringIO())
    assert torch.equal(trainer.model.state_dict()["layers.2.mlp.dense_4h_to_h.weight"],
                       hf.state_dict()["transformer.h.2.mlp.c_proj.weight"])
    assert trainer.run().iteration == 1
    assert load_run_config(None, base + ["--model.num_layers", "5"]).model.num_layers == 5  # explicit key wins
    off = load_run_config(None, base + ["--checkpoint.use_checkpoint_args", "false"])
    assert off.model.num_layers == 2
    with pytest.raises(ConfigError, match="does not fit the configured model"):
        Trainer(off, stream=io.StringIO())


# ------------------------------------------------------------------------------------- streaming safetensors writer
def test_streaming_safetensors_writer_layout_index_and_no_buffering(tmp_path):
    import struct

    from safetensors import safe_open

    from megaocto.convert.io import SafetensorsShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(64, 100, generator=g), "a.bias": torch.randn(3, generator=g),
               "b.weight": torch.randn(40, 100, generator=g).to(torch.bfloat16), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "c.weight": torch.randn(100, 64, generator=g).t()}  # non-contiguous
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = SafetensorsShardWriter(str(tmp_path), plan, max_shard_size=30_000)
    assert writer.files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with pytest.raises(ConversionError, match="plan expects 'a.weight' next"):
        writer.add("a.bias", tensors["a.bias"])
    with pytest.raises(ConversionError, match="does not match the planned"):
        writer.add("a.weight", tensors["a.weight"].double())
    first = tmp_path / writer.files[0]
    for name, t in tensors.items():
        original = t.clone()
        writer.add(name, t)
        if name == "a.weight":  # written at once, not held: the file already has its bytes, mutating t changes nothing
            assert first.stat().st_size >= 8 + t.numel() * 4
            t.zero_()
        tensors[name] = original
    files = writer.finish()
    assert files == writer.files + ["model.safetensors.index.json"]
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    for fname in writer.files:
        raw = (tmp_path / fname).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0  # data section 8-byte aligned; padding is spaces
        header = json.loads(raw[8:8 + n])
        assert header.pop("__metadata__") == {"format": "pt"}
        offsets = sorted(v["data_offsets"] for v in header.values())
        assert offsets[0][0] == 0 and offsets[-1][1] == len(raw) - 8 - n  # no gaps, no trailing bytes
        assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
        with safe_open(str(tmp_path / fname), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == fname
                got = f.get_tensor(name)
                assert torch.equal(got, tensors[name]) and got.dtype == tensors[name].dtype
    with pytest.raises(ConversionError, match="not in the plan"):
        writer.add("extra", torch.zeros(1))


def test_streaming_safetensors_writer_single_file_and_incomplete(tmp_path):
    from safetensors.torch import load_file

    from megaocto.convert.io import SafetensorsShardWriter

    t = torch.arange(6, dtype=torch.float16).view(2, 3)
    writer = SafetensorsShardWriter(str(tmp_path), [("x", t.dtype, (2, 3)), ("y", t.dtype, (2, 3))], 10**9)
    writer.add("x", t)
    with pytest.raises(ConversionError, match="before tensor 'y' was written"):
        writer.finish()
    writer.add("y", t + 1)
    assert writer.finish() == ["model.safetensors"]
    got = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(got["x"], t) and torch.equal(got["y"], t + 1)


def test_writer_passes_presharded_tensors_through_bit_exactly(tmp_path, monkeypatch):
    """``core.Sharded`` (a tensor given as its row / column TP shards, as the Megatron import hands them over): at
    the same TP the shards land in the rank files as they are; at another TP (or a split the parameter does not
    use) the writer merges them first; either way the checkpoint equals the one written from full tensors."""
    from megaocto.convert.core import Sharded, param_specs

    cfg = ModelConfig.from_preset("tiny-bigcode", vocab_size=V)
    torch.manual_seed(0)
    full = build_model(cfg, ParallelContext.single()).state_dict()
    specs = param_specs(cfg)

    def presharded(tp, dim_of=lambda spec: spec.partition_dim):
        for k, t in full.items():
            spec = specs[k]
            dim = None if spec.partition_dim is None or spec.partition_blocks is not None else dim_of(spec)
            if dim is None:
                yield k, t
            else:
                yield k, Sharded(tuple(s.clone() for s in t.chunk(tp, dim)), dim)

    def ranks(path, tp):
        return [torch.load(ckpt.model_file(path, "release", r), weights_only=True)["model"] for r in range(tp)]

    write_megaocto_checkpoint(str(tmp_path / "ref2"), cfg, full, 2, progress=False)
    write_megaocto_checkpoint(str(tmp_path / "ref1"), cfg, full, 1, progress=False)
    with monkeypatch.context() as m:  # same TP: no shard is merged
        m.setattr(Sharded, "full", lambda self: pytest.fail("merged a pass-through tensor"))
        write_megaocto_checkpoint(str(tmp_path / "same"), cfg, presharded(2), 2, progress=False)
    write_megaocto_checkpoint(str(tmp_path / "other"), cfg, presharded(2), 1, progress=False)  # merged: tp 2 -> 1
    other_dim = presharded(2, lambda s: 1 - s.partition_dim if len(s.shape) == 2 else None)
    write_megaocto_checkpoint(str(tmp_path / "wrongdim"), cfg, other_dim, 2, progress=False)  # merged, then re-cut
    assert any(isinstance(t, Sharded) and specs[k].vocab for k, t in presharded(2))  # vocab rows pass through too
    for got, want, tp in (("same", "ref2", 2), ("other", "ref1", 1), ("wrongdim", "ref2", 2)):
        for x, y in zip(ranks(str(tmp_path / got), tp), ranks(str(tmp_path / want), tp)):
            assert list(x) == list(y) and all(torch.equal(x[k], y[k]) for k in x), got
    with pytest.raises(ConversionError, match="given twice"):
        name = next(k for k, t in presharded(2) if isinstance(t, Sharded))
        items = list(presharded(2))
        write_megaocto_checkpoint(str(tmp_path / "dup"), cfg, items + [(name, dict(items)[name])], 2, progress=False)
    assert not (tmp_path / "dup").exists()


@pytest.mark.parametrize("preset,kw", [("tiny-bigcode", {}), ("tiny-bigcode", {"num_query_groups": 4}),
                                       ("tiny-glm2", {})], ids=["mqa", "mha", "glm"])
def test_to_hf_from_tp2_many_layers_is_bit_exact(tmp_path, preset, kw):
    """to-hf from a tp=2 checkpoint with 5 layers, several streamed shards: every exported tensor equals the
    mapping of the full tensor. The TP-split tensors are written straight from the rank files (core.Parts): row
    shards one after the other, column shards of row-parallel weights interleaved row by row (os.writev), fused
    blocks (MHA q|k|v, GLM gate|up, GLM q/k/v split) by their block slices."""
    from megaocto.convert import hf_bigcode, hf_glm

    cfg = ModelConfig.from_preset(preset, vocab_size=V, num_layers=5, **kw)
    torch.manual_seed(3)
    full = build_model(cfg, ParallelContext.single()).state_dict()
    write_megaocto_checkpoint(str(tmp_path / "ck"), cfg, full, 2, progress=False)
    to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"), max_shard_size="40KB", progress=False)
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    got = _safetensors(str(tmp_path / "hf"))
    family = hf_glm if preset == "tiny-glm2" else hf_bigcode
    want = {n: t.clone() for n, t in family.iter_to_hf(cfg, iter(full.items()))}
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def _starcoder_like_tokenizer(path):
    """A tiny word-level tokenizer.json whose ids 0..18 are StarCoder's special tokens (as train_bpe_tokenizer's)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from megaocto.data.tokenizer import STARCODER_SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(STARCODER_SPECIAL_TOKENS)}
    vocab.update({f"w{i}": len(STARCODER_SPECIAL_TOKENS) + i for i in range(60)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in STARCODER_SPECIAL_TOKENS])
    tok.save(path)
    return path


def test_exported_tokenizer_has_special_tokens_and_falls_back_to_data_tokenizer(tmp_path, capsys):
    """AutoTokenizer of the export knows eos/bos/pad/unk (StarCoder's <|endoftext|>, <fim_pad>) and the 19 special
    tokens; without --tokenizer, to-hf exports the checkpoint's data.tokenizer (as `megaocto generate` uses it)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from megaocto.data.tokenizer import STARCODER_SPECIAL_TOKENS

    tok_path = _starcoder_like_tokenizer(str(tmp_path / "my_tok.json"))
    cfg = ModelConfig.from_preset("tiny-bigcode", vocab_size=V)
    torch.manual_seed(0)
    src = str(tmp_path / "ck")
    write_megaocto_checkpoint(src, cfg, build_model(cfg, ParallelContext.single()).state_dict(), 1, progress=False)
    meta_path = os.path.join(src, "release", "metadata.json")  # as a training run records it
    meta = json.load(open(meta_path))
    meta["config"]["data"] = {"tokenizer": tok_path}
    json.dump(meta, open(meta_path, "w"))

    for out, kw in ((str(tmp_path / "hf_flag"), {"tokenizer": tok_path}), (str(tmp_path / "hf_fallback"), {})):
        to_hf(src, out, progress=False, **kw)
        tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
        assert (tok.eos_token, tok.bos_token, tok.unk_token, tok.pad_token) == (
            "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", "<fim_pad>")
        assert (tok.eos_token_id, tok.pad_token_id) == (0, 4)
        assert set(STARCODER_SPECIAL_TOKENS) <= set(tok.all_special_tokens)
        assert tok("w3 <fim_prefix> w5")["input_ids"] == [22, 1, 24]
        smap = json.load(open(os.path.join(out, "special_tokens_map.json")))
        assert smap["eos_token"] == "<|endoftext|>" and smap["additional_special_tokens"] == list(
            STARCODER_SPECIAL_TOKENS)
        conf = AutoConfig.from_pretrained(out, local_files_only=True)
        assert (conf.eos_token_id, conf.bos_token_id, conf.pad_token_id) == (0, 0, 4)
        assert GenerationConfig.from_pretrained(out).eos_token_id == 0
    assert f"[to-hf] tokenizer: {tok_path} (the checkpoint's data.tokenizer" in capsys.readouterr().err

    meta["config"]["data"] = {"tokenizer": str(tmp_path / "gone.json")}
    json.dump(meta, open(meta_path, "w"))
    to_hf(src, str(tmp_path / "hf_none"), progress=False)
    assert "no tokenizer exported: no --tokenizer and the checkpoint's data.tokenizer" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf_none" / "tokenizer.json")


def test_verify_runs_a_tp2_checkpoint_sharded_at_tp2(hf_dirs, tmp_path, capsys):
    """--verify of a tp=2 result runs it as 2 gloo processes, each loading only its own rank file (not a merged
    tp=1 model): a rank-1 copy of a replicated weight that differs from rank 0's — invisible to a merge, which reads
    replicated tensors from rank 0 — is caught."""
    from megaocto.convert.core import VerifyError

    path = hf_dirs["mqa"][0]
    out = str(tmp_path / "tp2")
    assert from_hf(path, out, tp=2, verify=True, progress=False) < TOL
    assert "max abs logit difference (HF gpt_bigcode vs megaocto tp=2 (2 gloo processes, one rank file each))" in \
        capsys.readouterr().out
    rank1 = ckpt.model_file(out, "release", 1)
    state = torch.load(rank1, weights_only=True)
    state["model"]["layers.0.input_layernorm.weight"] += 0.5  # replicated: a merge never reads rank 1's copy
    torch.save(state, rank1)
    with pytest.raises(VerifyError, match=r"megaocto tp=2 \(2 gloo processes, one rank file each\) vs HF"):
        to_hf(out, str(tmp_path / "hf"), verify=True, progress=False)
    assert os.path.isdir(tmp_path / "hf")  # written (from the merge) before the check failed


def _fake_hub_cache(cache, repo, src_dir, commit="0123456789abcdef0123456789abcdef01234567"):
    """``cache`` laid out as huggingface_hub lays out HF_HUB_CACHE: blobs, snapshots/<commit>/ symlinks, refs/main."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in os.listdir(src_dir):
        blob = base / "blobs" / f"blob_{name}"
        shutil.copy(os.path.join(src_dir, name), blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return commit


def test_from_hf_hub_id_uses_the_cache_offline_and_says_it_needs_the_network(hf_dirs, tmp_path, monkeypatch, capsys):
    from megaocto.cli import main

    cache = tmp_path / "hub"
    commit = _fake_hub_cache(cache, "tiny-org/tiny-mqa", hf_dirs["mqa"][0])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "from_hub")
    from_hf("tiny-org/tiny-mqa", out, tp=1, progress=False)
    local = str(tmp_path / "from_dir")
    from_hf(hf_dirs["mqa"][0], local, tp=1, progress=False)
    for a, b in zip(_rank_files(out, 1), _rank_files(local, 1)):
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    src = json.load(open(os.path.join(out, "release", "metadata.json")))["converted_from"]
    assert (src["hub_id"], src["revision"], src["commit"]) == ("tiny-org/tiny-mqa", "main", commit)

    # not cached + offline: one line, exit 2, nothing written
    code = main(["convert", "from-hf", "--hf", "tiny-org/not-cached", "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--hf=tiny-org/not-cached: not a local directory and not in the Hugging Face cache" in err
    assert "needs the network (HF_HUB_OFFLINE is set)" in err
    assert not os.path.exists(tmp_path / "x")
    # a path that is neither a directory nor a hub id
    with pytest.raises(ConversionError, match=r"--hf=\./missing: no such directory \(and not a Hugging Face hub id"):
        from_hf("./missing", str(tmp_path / "y"), progress=False)
    # online, only the needed files would be fetched: one set of top-level weights, config, tokenizer
    from megaocto.convert.io import hub_files_needed

    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "README.md",
             "onnx/model.safetensors", "flax_model.msgpack", "generation_config.json"]
    assert hub_files_needed(files) == ["config.json", "tokenizer.json", "generation_config.json", "model.safetensors"]
    assert hub_files_needed(["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]) == [
        "config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]


def _rank_files(path, tp):
    return [torch.load(ckpt.model_file(path, "release", r), weights_only=True)["model"] for r in range(tp)]


def test_to_hf_from_tp2_copies_no_tp_shard_into_a_merged_tensor(tmp_path, monkeypatch):
    """The to-hf speed-up (bench/RESULTS_convert.md, item 20): the TP shards of an MQA GPTBigCode checkpoint go from
    the mmap-ed rank files to the safetensors files without any torch.cat (no merged copy, flat memory)."""
    cfg = ModelConfig.from_preset("tiny-bigcode", vocab_size=V, num_layers=3)
    torch.manual_seed(4)
    full = build_model(cfg, ParallelContext.single()).state_dict()
    write_megaocto_checkpoint(str(tmp_path / "ck"), cfg, full, 2, progress=False)
    cats = []
    real_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        if any(t.device.type != "meta" for t in tensors):
            cats.append([tuple(t.shape) for t in tensors])
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", counting_cat)
    to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"), progress=False)
    monkeypatch.setattr(torch, "cat", real_cat)
    assert cats == []
    got = _safetensors(str(tmp_path / "hf"))
    from megaocto.convert import hf_bigcode

    want = dict(hf_bigcode.iter_to_hf(cfg, iter(full.items())))
    assert all(torch.equal(got[n], want[n]) for n in want)

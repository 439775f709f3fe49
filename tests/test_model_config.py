"""ModelConfig / presets / FLOPs / memory estimate / model-info CLI (no distributed)."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megaocto.cli import main as cli_main
from megaocto.config.base import ConfigError, field_docs
from megaocto.config.model import ModelConfig
from megaocto.config.presets import PRESETS
from megaocto.model import build_model
from megaocto.model.flops import flops_per_token, num_matmul_params, num_params, num_params_per_rank, param_table
from megaocto.model.memory import activation_bytes_per_layer, estimate_memory
from megaocto.parallel.context import ParallelContext


def test_every_field_documented_and_presets_validate():
    assert all(doc for doc in field_docs(ModelConfig).values())
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert PRESETS[name]["source"]
        cfg.validate(tp=2)  # every preset (incl. 22-head 3B, 2-group CodeGeeX2) splits over 2 ranks


def test_presets_importable_without_torch():
    code = ("import sys; import megaocto.config.presets, megaocto.config.model, megaocto.model.flops, "
            "megaocto.model.memory; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_preset_overrides_and_errors():
    cfg = ModelConfig.from_preset("starcoder-15b", seq_length=4096)
    assert cfg.seq_length == 4096 and cfg.num_layers == 40 and cfg.is_mqa
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.from_preset("starcoder-16b")
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        ModelConfig.from_preset("tiny-bigcode", n_layer=3)
    with pytest.raises(ConfigError, match="exceeds max_position_embeddings"):
        ModelConfig.from_preset("santacoder-1b", seq_length=4096)


def test_validate_tp_divisibility_messages():
    with pytest.raises(ConfigError, match="num_attention_heads=22 is not divisible by tp=4"):
        ModelConfig.from_preset("starcoderbase-3b").validate(tp=4)
    with pytest.raises(ConfigError, match="num_query_groups=2 is not divisible by tp=4"):
        ModelConfig.from_preset("codegeex2-6b").validate(tp=4)
    ModelConfig.from_preset("starcoder-15b").validate(tp=8)  # MQA: K/V replicated, any tp dividing heads
    with pytest.raises(ConfigError, match="multiple of num_query_groups"):
        ModelConfig.from_preset("tiny-glm2", num_query_groups=3)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        ModelConfig.from_preset("tiny-glm2", tie_embeddings=True)


def test_param_counts_match_public_sizes():
    n15 = num_params(ModelConfig.from_preset("starcoder-15b"))
    assert abs(n15 - 15.5e9) / 15.5e9 < 0.01, n15
    assert n15 == 15_517_456_384
    assert abs(num_params(ModelConfig.from_preset("codegeex2-6b")) - 6.24e9) / 6.24e9 < 0.01
    assert abs(num_params(ModelConfig.from_preset("santacoder-1b")) - 1.12e9) / 1.12e9 < 0.01
    assert abs(num_params(ModelConfig.from_preset("starcoderbase-7b")) - 7.33e9) / 7.33e9 < 0.01


@pytest.mark.parametrize("name", ["tiny-bigcode", "tiny-glm2"])
def test_num_params_equals_built_model(name):
    cfg = ModelConfig.from_preset(name)
    model = build_model(cfg, ParallelContext.single())
    built = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert built == {s.name: s.shape for s in param_table(cfg)}
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


def test_flops_per_token_formula():
    cfg = ModelConfig.from_preset("starcoder-15b")
    n = num_matmul_params(cfg)
    # tied embedding kept (it is the LM head), learned positions dropped
    assert n == num_params(cfg) - 8192 * 6144
    expected = 6 * n + 12 * 40 * 48 * 128 * 8192
    assert flops_per_token(cfg, 8192) == expected
    assert flops_per_token(cfg, 8192, causal=True) == 6 * n + 6 * 40 * 48 * 128 * 8192
    glm = ModelConfig.from_preset("codegeex2-6b")  # untied: input embedding dropped, output layer kept
    assert num_matmul_params(glm) == num_params(glm) - 65024 * 4096


def test_activation_memory_reduces_to_korthikanti():
    # MHA, 4h GELU MLP, 16-bit, dropout on, no flash: s*b*h*(34 + 5*a*s/h) per layer, /t with TP+SP.
    cfg = ModelConfig(family="bigcode", num_layers=4, hidden_size=1024, num_attention_heads=16,
                      num_query_groups=16, vocab_size=1000, seq_length=2048)
    s, b, h, a = 2048, 2, 1024, 16
    got = activation_bytes_per_layer(cfg, tp=1, micro_batch=b, seq_len=s, elem=2, sequence_parallel=False,
                                     flash_attention=False, selective=False)
    assert got == s * b * h * (34 + 5 * a * s / h)
    got_sp = activation_bytes_per_layer(cfg, tp=4, micro_batch=b, seq_len=s, elem=2, sequence_parallel=True,
                                        flash_attention=False, selective=False)
    # ... except the two all-gathered column-parallel GEMM inputs (2 x 2sbh bytes), which megaocto's
    # ColumnParallelLinear keeps whole for the weight gradient instead of re-gathering them in backward
    gathered = 2 * 2 * s * b * h * (1 - 1 / 4)
    assert got_sp == pytest.approx(s * b * h / 4 * (34 + 5 * a * s / h) + gathered)
    sel = activation_bytes_per_layer(cfg, tp=4, micro_batch=b, seq_len=s, elem=2, sequence_parallel=True,
                                     flash_attention=False, selective=True)
    assert sel == pytest.approx(s * b * h / 4 * 34 + gathered)


def test_memory_estimate_model_states_and_ordering():
    cfg = ModelConfig.from_preset("starcoder-15b")
    base = estimate_memory(cfg, tp=4, pp=4, dp=8, recompute="none")
    n = base.params_per_gpu
    assert base.weights == 2 * n and base.grads == 4 * n and base.optimizer == 12 * n
    z = estimate_memory(cfg, tp=4, pp=4, dp=8, zero1=True)
    assert z.optimizer == pytest.approx(12 * n / 8)
    full = estimate_memory(cfg, tp=4, pp=4, dp=8, recompute="full")
    sel = estimate_memory(cfg, tp=4, pp=4, dp=8, recompute="selective", flash_attention=False)
    none_noflash = estimate_memory(cfg, tp=4, pp=4, dp=8, recompute="none", flash_attention=False)
    assert full.activations < base.activations <= none_noflash.activations
    assert sel.activations < none_noflash.activations
    # the whole 15.5B model splits over tp*pp ranks (+ replicated norms / MQA K/V / positions)
    assert 15.5e9 / 16 < n < 15.5e9 / 16 * 1.2
    replicated = sum(s.numel for s in param_table(cfg, 4) if s.partition_dim is None)
    assert num_params_per_rank(cfg, 4) == (num_params(cfg, 4) - replicated) // 4 + replicated
    fp32 = estimate_memory(ModelConfig.from_preset("tiny-bigcode"), dtype="fp32")
    assert fp32.weights == 4 * fp32.params_per_gpu and fp32.optimizer == 8 * fp32.params_per_gpu


@pytest.mark.parametrize("name", ["tiny-bigcode", "tiny-glm2", "starcoder-15b", "codegeex2-6b"])
def test_memory_params_per_gpu_equal_param_counts(name):
    """Layer norms are counted once per layer (not again as final norms), on every layout."""
    cfg = ModelConfig.from_preset(name)
    assert estimate_memory(cfg).params_per_gpu == num_params(cfg)
    for tp in (1, 2):
        if cfg.num_query_groups > 1 and cfg.num_query_groups % tp:
            continue
        assert estimate_memory(cfg, tp=tp).params_per_gpu == num_params_per_rank(cfg, tp)
        # pp=2: the two stages hold everything once, plus the tied embedding's copy on the last stage
        from megaocto.model.memory import _stage_params
        stages = _stage_params(cfg, tp, 2)
        tied = cfg.padded_vocab_size(tp) * cfg.hidden_size // tp if cfg.tie_embeddings else 0
        assert stages["first"] + stages["last"] == num_params_per_rank(cfg, tp) + tied


def test_model_info_cli(capsys):
    assert cli_main(["model-info", "--preset", "starcoder-15b", "--tp", "4", "--pp", "4", "--dp", "8",
                     "--zero1", "--recompute", "selective"]) == 0
    out = capsys.readouterr().out
    assert "15,517,456,384" in out and "FLOPs per token" in out and "activations" in out and "total" in out
    assert cli_main(["model-info", "--preset", "codegeex2-6b", "--tp", "4"]) == 2
    err = capsys.readouterr()
    assert "num_query_groups=2 is not divisible by tp=4" in err.err and err.out == ""


@pytest.mark.parametrize("argv, message", [
    (["--pp", "3"], "pp=3 does not divide num_layers=2"),  # tiny-bigcode has 2 layers
    (["--pp", "4"], "use pp in [1, 2]"),
    (["--pp", "0"], "--pp must be >= 1"),
    (["--seq-length", "0"], "--seq-length must be >= 1 (got 0)"),
    (["--seq-length", "-5"], "--seq-length must be >= 1"),
    (["--seq-length", "128"], "exceeds max_position_embeddings=64"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1"),
    (["--tp", "4", "--seq-length", "62"], "sequence length 62 is not divisible by tp=4"),
])
def test_model_info_rejects_bad_layouts(capsys, argv, message):
    assert cli_main(["model-info", "--preset", "tiny-bigcode", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    if "--pp" in argv and argv[1] != "0":
        with pytest.raises(ValueError, match="does not divide num_layers"):
            estimate_memory(ModelConfig.from_preset("tiny-bigcode"), pp=int(argv[1]))


def test_tied_embedding_is_output_layer():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny-bigcode"), ParallelContext.single())
    assert not hasattr(model, "output_layer")
    ids = torch.randint(0, 1000, (1, 8))
    x = model.embedding(ids, torch.arange(8)[None])
    for layer in model.layers:
        x = layer(x)
    logits = model.final_layernorm(x) @ model.embedding.word_embeddings.weight.T
    torch.testing.assert_close(model(ids), logits)


def test_build_model_rejects_bad_recompute_and_pp():
    cfg = ModelConfig.from_preset("tiny-bigcode")
    with pytest.raises(ConfigError, match="recompute must be one of"):
        build_model(cfg, ParallelContext.single(), recompute="layers")
    with pytest.raises(ConfigError, match="does not split evenly over parallel.pp=2 stages"):  # pipeline stages
        build_model(ModelConfig.from_preset("tiny-bigcode", num_layers=3), ParallelContext(pp=2, world_size=2))


def test_sequence_parallel_needs_seq_length_divisible_by_tp():
    cfg = ModelConfig.from_preset("tiny-bigcode", seq_length=63)
    cfg.validate(2)  # the existing call (RunConfig.validate) keeps working: no sequence parallelism implied
    cfg.validate(1, sequence_parallel=True)  # sequence parallelism is off at tp=1
    with pytest.raises(ConfigError, match=r"model.seq_length=63 is not divisible by tp=2.*parallel.sequence_parallel"):
        cfg.validate(2, sequence_parallel=True)
    # the model constructors know pc.sequence_parallel and refuse before building anything
    from megaocto.model.bigcode import BigCodeModel
    from megaocto.model.glm2 import GLM2Model
    pc = ParallelContext(tp=2, world_size=2, sequence_parallel=True)
    glm = ModelConfig.from_preset("tiny-glm2", seq_length=63)
    for c, cls in ((cfg, BigCodeModel), (glm, GLM2Model)):
        for build in (lambda: cls(c, pc), lambda: build_model(c, pc)):
            with pytest.raises(ConfigError, match=r"model.seq_length=63.*parallel.sequence_parallel"):
                build()
    # a batch shorter than seq_length that does not split is named at forward time, before any collective
    from megaocto.model.common import check_input_ids
    with pytest.raises(ValueError, match=r"input sequence length 7 is not divisible by tp=2.*sequence_parallel"):
        check_input_ids(torch.zeros(1, 7, dtype=torch.long), ModelConfig.from_preset("tiny-bigcode"), pc)
    check_input_ids(torch.zeros(1, 8, dtype=torch.long), ModelConfig.from_preset("tiny-bigcode"), pc)


@pytest.mark.parametrize("name", ["tiny-bigcode", "tiny-glm2"])
def test_model_rejects_token_ids_outside_vocab(name):
    cfg = ModelConfig.from_preset(name)  # vocab 1000, embedding padded to 1024 rows
    torch.manual_seed(0)
    model = build_model(cfg, ParallelContext.single())
    assert model.embedding.word_embeddings.num_embeddings == 1024
    model(torch.tensor([[0, cfg.vocab_size - 1]]))
    for bad in (cfg.vocab_size, 1023):  # inside the padded embedding: would silently read untrained rows
        with pytest.raises(ValueError, match=rf"model.vocab_size=1000.*tokenizer.*found id {bad}"):
            model(torch.tensor([[0, bad]]))
    with pytest.raises(ValueError, match=r"negative id.*found id -100"):
        model(torch.tensor([[0, -100]]))


def test_apex_norms_are_lazy_optional_and_cuda_only(monkeypatch):
    """apex fused norms: chosen only for CUDA inputs when apex imports; never imported at load or on CPU."""
    import sys
    import types

    from megaocto.model import common

    # module load and a CPU forward never try to import apex
    monkeypatch.setattr(common, "_apex_norm_module", None)
    torch.manual_seed(0)
    for name in ("tiny-bigcode", "tiny-glm2"):
        build_model(ModelConfig.from_preset(name), ParallelContext.single())(torch.tensor([[1, 2, 3, 4]]))
    assert common._apex_norm_module is None

    calls = []
    fake = types.ModuleType("apex.normalization.fused_layer_norm")
    fake.fused_layer_norm_affine = lambda x, w, b, shape, eps: calls.append(("layer", tuple(shape), eps)) or x
    fake.fused_rms_norm_affine = lambda x, w, shape, eps: calls.append(("rms", tuple(shape), eps)) or x
    apex = types.ModuleType("apex")
    apex.normalization = types.ModuleType("apex.normalization")
    apex.normalization.fused_layer_norm = fake
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.normalization", apex.normalization)
    monkeypatch.setitem(sys.modules, "apex.normalization.fused_layer_norm", fake)
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda"))  # compiled
    cuda_like = types.SimpleNamespace(is_cuda=True)
    x = torch.randn(2, 3, 8)
    assert common._apex_norm_fn(x, "layer") is None and common._apex_norm_module is None  # CPU: no import
    assert common._apex_norm_fn(cuda_like, "layer") is fake.fused_layer_norm_affine
    assert common._apex_norm_fn(cuda_like, "rms") is fake.fused_rms_norm_affine

    # the norm modules hand the apex function their parameters when it is selected, else run torch
    ln, rms = common.LayerNorm(8, eps=1e-6), common.RMSNorm(8, eps=1e-4)
    assert torch.equal(ln(x), F.layer_norm(x, (8,), ln.weight, ln.bias, 1e-6)) and calls == []
    monkeypatch.setattr(common, "_apex_norm_fn", lambda t, kind: getattr(fake, common._APEX_NORM_FNS[kind]))
    ln(x)
    rms(x)
    assert calls == [("layer", (8,), 1e-6), ("rms", (8,), 1e-4)]
    monkeypatch.undo()

    # apex missing (or broken): CUDA inputs fall back to torch, the failed import is remembered
    monkeypatch.setattr(common, "_apex_norm_module", None)
    monkeypatch.setitem(sys.modules, "apex", None)  # makes `import apex` raise ImportError
    assert common._apex_norm_fn(cuda_like, "rms") is None and common._apex_norm_module is False

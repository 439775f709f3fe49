"""Llama family (CodeLlama, DeepSeek-Coder), single process: presets and parameter counts against transformers,
logits / per-token loss against ``transformers.LlamaForCausalLM``, packing, recompute, KV-cache generation."""
import pytest
import torch
import torch.nn.functional as F

from llama_reference import llama_hf_config, llama_twin, randomize_norms
from megaocto.config.base import ConfigError
from megaocto.config.model import ModelConfig
from megaocto.model import build_model
from megaocto.model.flops import flops_per_token, num_matmul_params, num_params, num_params_per_rank, param_table
from megaocto.model.memory import estimate_memory
from megaocto.parallel.context import ParallelContext

V = 1000
LLAMA_PRESETS = ["codellama-7b", "codellama-python-7b", "codellama-13b", "codellama-34b", "deepseek-coder-1.3b",
                 "deepseek-coder-6.7b", "deepseek-coder-33b"]
# Published sizes (model cards / HF safetensors metadata), in billions.
PUBLISHED_B = {"codellama-7b": 6.74, "codellama-python-7b": 6.74, "codellama-13b": 13.0, "codellama-34b": 33.7,
               "deepseek-coder-1.3b": 1.35, "deepseek-coder-6.7b": 6.74, "deepseek-coder-33b": 33.3}


def _model(name="tiny-llama", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset(name, **overrides), ParallelContext.single())


# ------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", LLAMA_PRESETS)
def test_preset_param_count_equals_transformers(name):
    """Our count without vocab padding == LlamaForCausalLM built (on meta) from the preset's HF config numbers,
    and it rounds to the published size."""
    from transformers import LlamaForCausalLM

    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        hf = LlamaForCausalLM(llama_hf_config(cfg, cfg.vocab_size))
    hf_n = sum(p.numel() for p in hf.parameters())
    pad_rows = cfg.padded_vocab_size(1) - cfg.vocab_size
    assert num_params(cfg) - 2 * pad_rows * cfg.hidden_size == hf_n
    assert round(hf_n / 1e9, 2 if hf_n < 1e10 else 1) == PUBLISHED_B[name], hf_n
    # transformers' defaults and the presets' HF numbers agree where the preset relies on them
    assert hf.config.hidden_act == "silu" and not hf.config.tie_word_embeddings


def test_preset_numbers():
    c34 = ModelConfig.from_preset("codellama-34b")
    assert (c34.num_layers, c34.hidden_size, c34.ffn_size, c34.num_attention_heads, c34.num_query_groups,
            c34.vocab_size, c34.rotary_base, c34.max_positions) == (48, 8192, 22016, 64, 8, 32000, 1e6, 16384)
    ds = ModelConfig.from_preset("deepseek-coder-6.7b")
    assert (ds.rotary_base, ds.rope_scaling_factor, ds.norm_epsilon, ds.vocab_size) == (1e5, 4.0, 1e-6, 32256)
    assert ModelConfig.from_preset("codellama-7b").norm_epsilon == 1e-5


def test_tp_validation_splits_or_replicates_kv():
    cfg = ModelConfig.from_preset("codellama-34b")  # 8 K/V heads
    for tp in (1, 2, 4, 8, 16, 32):
        cfg.validate(tp)
    assert cfg.kv_split_over(8) and not cfg.kv_split_over(16)
    ModelConfig.from_preset("tiny-llama", ffn_hidden_size=144).validate(6)  # replicated: one query head per rank
    with pytest.raises(ConfigError, match="tie_embeddings"):
        ModelConfig.from_preset("tiny-llama", tie_embeddings=True)
    with pytest.raises(ConfigError, match="rotary_percent=1.0"):
        ModelConfig.from_preset("tiny-llama", rotary_percent=0.5)
    with pytest.raises(ConfigError, match="divides or is a multiple"):  # rank 1's heads 2, 3 span both groups
        ModelConfig.from_preset("tiny-llama").validate(3)
    with pytest.raises(ConfigError, match="divides or is a multiple"):
        ModelConfig(family="llama", num_attention_heads=12, num_query_groups=4, hidden_size=48, activation="swiglu",
                    tie_embeddings=False, add_qkv_bias=False, add_bias_linear=False, rotary_percent=1.0).validate(6)


@pytest.mark.parametrize("groups,tp", [(2, 1), (2, 2), (1, 2), (6, 2)])
def test_param_table_equals_built_model(groups, tp):
    cfg = ModelConfig.from_preset("tiny-llama", num_query_groups=groups)
    model = build_model(cfg, ParallelContext.single())
    built = {k: tuple(p.shape) for k, p in model.named_parameters()}
    table = param_table(cfg, tp)
    assert built == {s.name: s.shape for s in param_table(cfg)}
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)
    kv = [s for s in table if s.name.endswith("key_value.weight")]
    assert len(kv) == 2 and all((s.partition_dim is None) == (tp > groups) for s in kv)  # replicated above groups
    assert estimate_memory(cfg, tp=tp).params_per_gpu == num_params_per_rank(cfg, tp)


def test_flops_and_model_info_cli(capsys):
    from megaocto.cli import main as cli_main

    cfg = ModelConfig.from_preset("deepseek-coder-6.7b")
    n = num_matmul_params(cfg)
    assert n == num_params(cfg) - 32256 * 4096  # untied: input embedding dropped, output layer kept
    assert flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 32 * 128 * 4096
    assert cli_main(["model-info", "--preset", "codellama-34b", "--tp", "16", "--dp", "2", "--zero1"]) == 0
    out = capsys.readouterr().out
    assert "family llama" in out and "48 layers" in out


# ------------------------------------------------------------------------------------------ vs transformers
@pytest.mark.parametrize("groups,scaling", [(2, 2.0), (6, 1.0), (1, 4.0)])  # GQA, MHA, MQA-shaped
def test_matches_transformers_llama(groups, scaling):
    model = _model(num_query_groups=groups, rope_scaling_factor=scaling, rotary_base=500.0).eval()
    randomize_norms(model)
    hf = llama_twin(model, V)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)[..., :V]
        loss = model(ids, labels=labels)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    hf_loss = F.cross_entropy(ref.flatten(0, 1), labels.flatten(), reduction="none").view(2, 24)
    torch.testing.assert_close(loss, hf_loss, atol=1e-4, rtol=0)
    assert ref.std() > 0.05  # weights are not degenerate


def test_rope_scaling_matters():
    """The linear factor really reaches the rotary angles: scaling 1 and 2 give different logits."""
    ids = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = _model(rope_scaling_factor=1.0).eval()(ids)
        b = _model(rope_scaling_factor=2.0).eval()(ids)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a[:, 0], b[:, 0])  # position 0 is not rotated either way


# ------------------------------------------------------------------------------------------ packing, recompute
def test_packed_segments_equal_separate_runs():
    model = _model().eval()
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, V, (1, 7), generator=gen), torch.randint(0, V, (1, 9), generator=gen)
    la, lb = torch.randint(0, V, (1, 7), generator=gen), torch.randint(0, V, (1, 9), generator=gen)
    seg = torch.tensor([[1] * 7 + [2] * 9])
    with torch.no_grad():
        alone = torch.cat([model(a, labels=la), model(b, labels=lb)], dim=1)
        packed = model(torch.cat([a, b], 1), segment_ids=seg, labels=torch.cat([la, lb], 1))
        unpacked = model(torch.cat([a, b], 1), labels=torch.cat([la, lb], 1))
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (unpacked[:, 7:] - alone[:, 7:]).abs().max() > 1e-3  # without segments, b attends to a


def test_recompute_gradients_equal():
    """Full and selective recompute give the same loss and grads as none, with dropout on (the RNG is replayed)."""
    from megaocto.parallel.random import seed_everything

    cfg = ModelConfig.from_preset("tiny-llama", attention_dropout=0.1, hidden_dropout=0.1)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(4))
    seg = torch.tensor([[1] * 10 + [2] * 6, [1] * 16])

    def grads(recompute):
        torch.manual_seed(0)
        model = build_model(cfg, ParallelContext.single(), recompute=recompute).train()
        seed_everything(7, model.pc)
        loss = model(ids, segment_ids=seg, labels=torch.roll(ids, -1, 1))
        loss.mean().backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters()}

    loss0, g0 = grads("none")
    for mode in ("full", "selective"):
        loss, g = grads(mode)
        torch.testing.assert_close(loss, loss0, atol=0, rtol=0)
        for k in g0:
            torch.testing.assert_close(g[k], g0[k], atol=1e-6, rtol=1e-5, msg=f"{mode} {k}")


# ------------------------------------------------------------------------------------------ generation
def test_kv_cache_generation_equals_no_cache_and_transformers():
    from megaocto.generation.generate import GenerationConfig, generate

    model = _model().eval()
    randomize_norms(model)
    prompts = [[5, 17, 300, 42, 8], [9, 99]]  # different lengths: left padding in the cached batch
    gen = GenerationConfig(max_new_tokens=6)
    cached = generate(model, prompts, gen)
    assert cached == generate(model, prompts, gen, use_cache=False)
    hf = llama_twin(model, V)
    for prompt, out in zip(prompts, cached):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()


# ------------------------------------------------------------------------------------------ kernels
def test_triton_kernels_match_torch():
    """``model.kernels: triton`` (rms_norm, swiglu, halves rotary, linear cross-entropy; interpreted on CPU) gives the
    torch ops' loss and gradients."""
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, 1)
    labels[0, :3] = -100
    seg = torch.tensor([[1] * 9 + [2] * 7, [1] * 16])
    out = {}
    for kernels in ("torch", "triton"):
        model = _model(kernels=kernels)
        randomize_norms(model)
        loss = model(ids, segment_ids=seg, labels=labels)
        loss.sum().backward()
        out[kernels] = loss.detach(), {k: p.grad for k, p in model.named_parameters()}
        if kernels == "triton":
            assert all(model.ops.impls[op] == "triton" for op in ("rms_norm", "swiglu", "rotary"))
    torch.testing.assert_close(out["triton"][0], out["torch"][0], atol=2e-5, rtol=1e-5)
    for k, g in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][k], g, atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")

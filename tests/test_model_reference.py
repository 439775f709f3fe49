"""Single-process model checks: vs transformers GPTBigCode, vs an independent GLM2 reference, packing,
activation recompute, bf16, and the attention seam."""
import math

import pytest
import torch
import torch.nn.functional as F

from hf_reference import gpt_bigcode_twin
from megaocto.config.model import ModelConfig
from megaocto.model import build_model
from megaocto.kernels.attention import attention, backends, cu_seqlens_from_segments, segment_mask, select_backend
from megaocto.parallel.context import ParallelContext
from megaocto.parallel.random import seed_everything

V = 1000


def _model(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset(name, **overrides), ParallelContext.single())


# ------------------------------------------------------------------------------------------ bigcode vs HF
def test_bigcode_matches_transformers_gpt_bigcode():
    model = _model("tiny-bigcode").eval()
    hf = gpt_bigcode_twin(model, V, bos=0, eos=0)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)[..., :V]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # per-token loss equals HF's shifted CE
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        loss = model(ids, labels=labels)
    hf_loss = F.cross_entropy(ref.flatten(0, 1), labels.flatten(), reduction="none").view(2, 24)
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ glm2 reference
def _glm2_reference(sd, cfg, ids):
    """CodeGeeX2 equations written independently (complex-number rotary, explicit softmax, expanded groups)."""
    h, n, g, d, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim, cfg.num_layers
    rot = cfg.rotary_dim
    b, s = ids.shape

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_epsilon))

    pos = torch.arange(s, dtype=torch.float64)
    theta = cfg.rotary_base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    phase = torch.polar(torch.ones(s, rot // 2, dtype=torch.float64), pos[:, None] * theta)  # e^{i pos theta}

    def rope(t):  # t [b, heads, s, d]: pairs (2j, 2j+1) are the complex numbers t[2j] + i t[2j+1]
        c = torch.view_as_complex(t[..., :rot].reshape(*t.shape[:-1], rot // 2, 2).contiguous())
        r = torch.view_as_real(c * phase).reshape(*t.shape[:-1], rot)
        return torch.cat([r, t[..., rot:]], dim=-1)

    x = sd["embedding.word_embeddings.weight"][ids]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(L):
        p = f"layers.{i}."
        y = rms(x, sd[p + "input_layernorm.weight"])
        qkv = y @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([n * d, g * d, g * d], dim=-1)
        q = rope(q.view(b, s, n, d).transpose(1, 2))
        k = rope(k.view(b, s, g, d).transpose(1, 2))
        v = v.view(b, s, g, d).transpose(1, 2)
        k = k[:, :, None].expand(b, g, n // g, s, d).reshape(b, n, s, d)  # ChatGLM2's unsqueeze/expand
        v = v[:, :, None].expand(b, g, n // g, s, d).reshape(b, n, s, d)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, n * d)
        x = x + ctx @ sd[p + "self_attention.dense.weight"].T
        y = rms(x, sd[p + "post_attention_layernorm.weight"])
        a, c = (y @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (a * torch.sigmoid(a) * c) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    x = rms(x, sd["final_layernorm.weight"])
    return x @ sd["output_layer.weight"].T


def test_glm2_matches_independent_reference():
    model = _model("tiny-glm2").eval()
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(ids)
    ref = _glm2_reference(sd, model.cfg, ids).float()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_glm2_matches_transformers_glm():
    """transformers' native GlmForCausalLM is the same architecture: q/k/v split, [gate | up], 50% interleaved rope."""
    from transformers import GlmConfig, GlmForCausalLM

    model = _model("tiny-glm2").eval()
    cfg = model.cfg
    n, g, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    hf = GlmForCausalLM(GlmConfig(
        vocab_size=V, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=n, num_key_value_heads=g, head_dim=d, max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.norm_epsilon, attention_bias=True, tie_word_embeddings=False, attention_dropout=0.0,
        rope_parameters={"rope_theta": cfg.rotary_base, "partial_rotary_factor": cfg.rotary_percent,
                         "rope_type": "default"},
        pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
    ours = {k: v.detach() for k, v in model.named_parameters()}
    mapped = {"model.embed_tokens.weight": ours["embedding.word_embeddings.weight"][:V],
              "model.norm.weight": ours["final_layernorm.weight"],
              "lm_head.weight": ours["output_layer.weight"][:V]}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qw, kw, vw = ours[p + f"self_attention.query_key_value.{kind}"].split([n * d, g * d, g * d])
            mapped[q + f"self_attn.q_proj.{kind}"], mapped[q + f"self_attn.k_proj.{kind}"] = qw, kw
            mapped[q + f"self_attn.v_proj.{kind}"] = vw
        mapped[q + "self_attn.o_proj.weight"] = ours[p + "self_attention.dense.weight"]
        mapped[q + "mlp.gate_up_proj.weight"] = ours[p + "mlp.dense_h_to_4h.weight"]
        mapped[q + "mlp.down_proj.weight"] = ours[p + "mlp.dense_4h_to_h.weight"]
        mapped[q + "input_layernorm.weight"] = ours[p + "input_layernorm.weight"]
        mapped[q + "post_attention_layernorm.weight"] = ours[p + "post_attention_layernorm.weight"]
    hf.load_state_dict(mapped, strict=True)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :V], hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_glm2_rotary_is_interleaved_and_partial():
    from megaocto.kernels.registry import torch_rotary
    from megaocto.model.glm2 import rotary_cos_sin

    x = torch.randn(1, 1, 3, 8)
    cos, sin = rotary_cos_sin(torch.arange(3)[None], rot_dim=4, base=10000.0)
    y = torch_rotary(x, cos, sin, interleaved=True)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])  # the second half passes through
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated
    # position 1, pair (0, 1) rotates by angle 1 * base^0 = 1 rad; pair (2, 3) by base^(-2/4) = 0.01
    for j, ang in ((0, 1.0), (2, 0.01)):
        a, b = x[0, 0, 1, j], x[0, 0, 1, j + 1]
        exp = torch.stack([a * math.cos(ang) - b * math.sin(ang), b * math.cos(ang) + a * math.sin(ang)])
        torch.testing.assert_close(y[0, 0, 1, j:j + 2], exp)


# ------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("name", ["tiny-bigcode", "tiny-glm2"])
def test_packed_segments_equal_separate_runs(name):
    model = _model(name).eval()
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, V, (1, 7), generator=gen), torch.randint(0, V, (1, 9), generator=gen)
    la, lb = torch.randint(0, V, (1, 7), generator=gen), torch.randint(0, V, (1, 9), generator=gen)
    with torch.no_grad():
        alone = torch.cat([model(a, labels=la), model(b, labels=lb)], dim=1)
        seg = torch.tensor([[1] * 7 + [2] * 9])
        packed = model(torch.cat([a, b], 1), segment_ids=seg, labels=torch.cat([la, lb], 1))
        pos = torch.tensor([list(range(7)) + list(range(9))])
        explicit = model(torch.cat([a, b], 1), segment_ids=seg, position_ids=pos, labels=torch.cat([la, lb], 1))
        # with trailing padding (segment 0) nothing becomes NaN and real tokens are unchanged
        pad = torch.zeros(1, 4, dtype=torch.long)
        padded = model(torch.cat([a, b, pad], 1), segment_ids=torch.cat([seg, pad], 1),
                       labels=torch.cat([la, lb, pad], 1))
        unpacked = model(torch.cat([a, b], 1), labels=torch.cat([la, lb], 1))
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, :16], alone, atol=1e-5, rtol=1e-5)
    assert (unpacked[:, 7:] - alone[:, 7:]).abs().max() > 1e-3  # without segments, b attends to a


# ------------------------------------------------------------------------------------------ recompute
def _grads(name, recompute, chunk=1):
    cfg = ModelConfig.from_preset(name, attention_dropout=0.1, hidden_dropout=0.1)
    pc = ParallelContext.single()
    torch.manual_seed(0)
    model = build_model(cfg, pc, recompute=recompute, recompute_num_layers=chunk).train()
    seed_everything(7, pc)
    ids = torch.randint(0, V, (2, 16))
    seg = torch.tensor([[1] * 10 + [2] * 6, [1] * 16])
    loss = model(ids, segment_ids=seg, labels=torch.roll(ids, -1, 1))
    loss.mean().backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["tiny-bigcode", "tiny-glm2"])
def test_recompute_gradients_equal(name):
    loss0, g0 = _grads(name, "none")
    for mode, chunk in (("full", 1), ("full", 2), ("selective", 1)):
        loss, g = _grads(name, mode, chunk)
        torch.testing.assert_close(loss, loss0, atol=0, rtol=0)
        for k in g0:
            torch.testing.assert_close(g[k], g0[k], atol=1e-6, rtol=1e-5, msg=f"{mode}/{chunk} {k}")
    # dropout is really on: a different seed changes the loss
    torch.testing.assert_close(_grads_with_seed(name, 7), loss0, atol=0, rtol=0)
    assert not torch.equal(_grads_with_seed(name, 8), loss0)


def _grads_with_seed(name, seed):
    cfg = ModelConfig.from_preset(name, attention_dropout=0.1, hidden_dropout=0.1)
    pc = ParallelContext.single()
    torch.manual_seed(0)
    model = build_model(cfg, pc).train()
    seed_everything(seed, pc)
    ids = torch.randint(0, V, (2, 16))
    seg = torch.tensor([[1] * 10 + [2] * 6, [1] * 16])
    return model(ids, segment_ids=seg, labels=torch.roll(ids, -1, 1)).detach()


# ------------------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("name", ["tiny-bigcode", "tiny-glm2"])
def test_bf16_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset(name), ParallelContext.single(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.randint(0, V, (2, 16))
    loss = model(ids, labels=torch.roll(ids, -1, 1))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    assert 5.0 < loss.mean().item() < 9.0  # ~ln(1024) at init
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------ attention seam
def test_attention_grouped_kv_and_segments():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    assert "sdpa" in backends() and select_backend(q, k, v) == "sdpa"  # CPU: never flash
    out = attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, ref)
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    out = attention(q, k, v, segment_ids=seg)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], attention(q[1:], k[1:], v[1:])[0])
    torch.testing.assert_close(out[0, :, 3:5], attention(q[:1, :, 3:5], k[:1, :, 3:5], v[:1, :, 3:5])[0])
    mask = segment_mask(seg)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False]
    cu, mx = cu_seqlens_from_segments(seg)
    assert cu.tolist() == [0, 3, 5, 6, 12] and mx == 6
    with pytest.raises(ValueError, match="multiple of K/V heads"):
        attention(q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8))

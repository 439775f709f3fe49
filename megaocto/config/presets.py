"""Named model architectures as plain data (importable without torch).

Each preset is a dict of :class:`megaocto.config.model.ModelConfig` fields plus a ``source`` note saying where the
numbers were checked. Use ``ModelConfig.from_preset(name, **overrides)``.

Init std for bigcode models follows the 1/sqrt(hidden) rule that reproduces the published values
(StarCoder 15B: 0.01275 = 1/sqrt(6144); SantaCoder: 0.022 ≈ 1/sqrt(2048), reference §1.13); the HF configs only
carry the generic ``initializer_range: 0.02``.

Megatron trained all bigcode models with the fused bias-GELU (tanh approximation), so ``activation`` is
``gelu_tanh`` everywhere, even where the exported HF config says ``gelu`` / ``gelu_fast``.

Llama presets (CodeLlama, DeepSeek-Coder) carry the HF ``config.json`` numbers; ``seq_length`` (the training
length, not an architecture number) defaults to 4096, within their 16384 rotary positions.
"""
from __future__ import annotations

_BIGCODE = dict(family="bigcode", num_query_groups=1, activation="gelu_tanh", norm_epsilon=1e-5,
                attention_dropout=0.1, hidden_dropout=0.1, add_qkv_bias=True, add_bias_linear=True,
                tie_embeddings=True, make_vocab_size_divisible_by=128)

_GLM2 = dict(family="glm2", activation="swiglu", norm_epsilon=1e-5, attention_dropout=0.0, hidden_dropout=0.0,
             add_qkv_bias=True, add_bias_linear=False, tie_embeddings=False, rotary_percent=0.5,
             rotary_base=10000.0, make_vocab_size_divisible_by=128)

_LLAMA = dict(family="llama", activation="swiglu", attention_dropout=0.0, hidden_dropout=0.0, add_qkv_bias=False,
              add_bias_linear=False, tie_embeddings=False, rotary_percent=1.0, init_method_std=0.02,
              make_vocab_size_divisible_by=128)
# CodeLlama: rope_theta 1e6, 16384 positions, rms_norm_eps 1e-5 (hf.co/codellama/CodeLlama-*-hf config.json).
_CODELLAMA = dict(_LLAMA, rotary_base=1e6, rope_scaling_factor=1.0, norm_epsilon=1e-5, seq_length=4096,
                  max_position_embeddings=16384)
# DeepSeek-Coder base: rope_theta 1e5 with linear rope_scaling factor 4, 16384 positions, rms_norm_eps 1e-6
# (hf.co/deepseek-ai/deepseek-coder-*-base config.json).
_DEEPSEEK_CODER = dict(_LLAMA, rotary_base=1e5, rope_scaling_factor=4.0, norm_epsilon=1e-6, seq_length=4096,
                       max_position_embeddings=16384, vocab_size=32256)

PRESETS: dict[str, dict] = {
    # ---- tiny models for tests and smoke runs (dropout off so runs are deterministic) ----
    "tiny-bigcode": dict(_BIGCODE, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                         vocab_size=1000, seq_length=64, max_position_embeddings=64, init_method_std=0.02,
                         attention_dropout=0.0, hidden_dropout=0.0,
                         source="test model: 2 layers, MQA, heads divisible by tp=2"),
    "tiny-glm2": dict(_GLM2, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      kv_channels=16, ffn_hidden_size=128, vocab_size=1000, seq_length=64,
                      max_position_embeddings=64, init_method_std=0.02,
                      source="test model: 2 layers, 2 K/V groups (tp=2 splits one group per rank)"),
    "tiny-llama": dict(_LLAMA, num_layers=2, hidden_size=48, num_attention_heads=6, num_query_groups=2,
                       ffn_hidden_size=136, vocab_size=1000, seq_length=64, max_position_embeddings=64,
                       rotary_base=10000.0, rope_scaling_factor=2.0, norm_epsilon=1e-5,
                       source="test model: 2 layers, 6 heads of 8 dims sharing 2 K/V heads (tp=2 splits one group "
                              "per rank; tp=3/6 replicate K/V), ffn 136, linear rope scaling 2"),
    # ---- bigcode ----
    "santacoder-1b": dict(_BIGCODE, num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=8192,
                          vocab_size=49280, seq_length=2048, max_position_embeddings=2048, init_method_std=0.022,
                          source="hf.co/bigcode/santacoder config.json (n_layer 24, n_embd 2048, n_head 16, "
                                 "multiquery, n_positions 2048, vocab 49280); init 0.022 from finetune_santacoder.sh"),
    "starcoderbase-1b": dict(_BIGCODE, num_layers=24, hidden_size=2048, num_attention_heads=16,
                             ffn_hidden_size=8192, vocab_size=49152, seq_length=8192, max_position_embeddings=8192,
                             init_method_std=0.0221,
                             source="hf.co/bigcode/starcoderbase-1b config.json (n_layer 24, n_embd 2048, n_head 16, "
                                    "n_inner 8192, n_positions 8192, vocab 49152, multi_query)"),
    "starcoderbase-3b": dict(_BIGCODE, num_layers=36, hidden_size=2816, num_attention_heads=22,
                             ffn_hidden_size=11264, vocab_size=49152, seq_length=8192, max_position_embeddings=8192,
                             init_method_std=0.0188,
                             source="hf.co/bigcode/starcoderbase-3b config.json (n_layer 36, n_embd 2816, n_head 22, "
                                    "n_inner 11264, n_positions 8192, vocab 49152, multi_query)"),
    "starcoderbase-7b": dict(_BIGCODE, num_layers=42, hidden_size=4096, num_attention_heads=32,
                             ffn_hidden_size=16384, vocab_size=49152, seq_length=8192, max_position_embeddings=8192,
                             init_method_std=0.015625,
                             source="hf.co/bigcode/starcoderbase-7b config.json (n_layer 42, n_embd 4096, n_head 32, "
                                    "n_inner 16384, n_positions 8192, vocab 49152, multi_query)"),
    "starcoder-15b": dict(_BIGCODE, num_layers=40, hidden_size=6144, num_attention_heads=48, ffn_hidden_size=24576,
                          vocab_size=49152, seq_length=8192, max_position_embeddings=8192, init_method_std=0.01275,
                          source="hf.co/bigcode/starcoder config.json (n_layer 40, n_embd 6144, n_head 48, "
                                 "n_inner 24576, n_positions 8192, vocab 49152, multi_query); init 0.01275 from "
                                 "Megatron-LM examples/pretrain_bigcode_model.slurm"),
    # ---- glm2 ----
    "codegeex2-6b": dict(_GLM2, num_layers=28, hidden_size=4096, num_attention_heads=32, num_query_groups=2,
                         kv_channels=128, ffn_hidden_size=13696, vocab_size=65024, seq_length=8192,
                         max_position_embeddings=8192, init_method_std=0.02,
                         source="hf.co/THUDM/codegeex2-6b config.json (num_layers 28, hidden 4096, ffn 13696, "
                                "heads 32, multi_query_group_num 2, kv_channels 128, padded_vocab_size 65024, "
                                "seq_length 8192, rotary_percent 0.5, rmsnorm, add_qkv_bias, no linear bias)"),
    # ---- llama ----
    "codellama-7b": dict(_CODELLAMA, num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
                         ffn_hidden_size=11008, vocab_size=32016,
                         source="hf.co/codellama/CodeLlama-7b-hf config.json (32 layers, hidden 4096, "
                                "intermediate 11008, 32 heads, 32 K/V heads, vocab 32016, rope_theta 1e6, "
                                "max_position_embeddings 16384, rms_norm_eps 1e-5); 6.74B parameters"),
    "codellama-python-7b": dict(_CODELLAMA, num_layers=32, hidden_size=4096, num_attention_heads=32,
                                num_query_groups=32, ffn_hidden_size=11008, vocab_size=32000,
                                source="hf.co/codellama/CodeLlama-7b-Python-hf config.json (as codellama-7b, vocab "
                                       "32000: no infilling tokens)"),
    "codellama-13b": dict(_CODELLAMA, num_layers=40, hidden_size=5120, num_attention_heads=40, num_query_groups=40,
                          ffn_hidden_size=13824, vocab_size=32016,
                          source="hf.co/codellama/CodeLlama-13b-hf config.json (40 layers, hidden 5120, "
                                 "intermediate 13824, 40 heads, vocab 32016, rope_theta 1e6); 13.0B parameters"),
    "codellama-34b": dict(_CODELLAMA, num_layers=48, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                          ffn_hidden_size=22016, vocab_size=32000,
                          source="hf.co/codellama/CodeLlama-34b-hf config.json (48 layers, hidden 8192, "
                                 "intermediate 22016, 64 heads, 8 K/V heads, vocab 32000, rope_theta 1e6); "
                                 "33.7B parameters"),
    "deepseek-coder-1.3b": dict(_DEEPSEEK_CODER, num_layers=24, hidden_size=2048, num_attention_heads=16,
                                num_query_groups=16, ffn_hidden_size=5504,
                                source="hf.co/deepseek-ai/deepseek-coder-1.3b-base config.json (24 layers, hidden "
                                       "2048, intermediate 5504, 16 heads, vocab 32256, rope_theta 1e5, rope_scaling "
                                       "linear 4, rms_norm_eps 1e-6); 1.35B parameters"),
    "deepseek-coder-6.7b": dict(_DEEPSEEK_CODER, num_layers=32, hidden_size=4096, num_attention_heads=32,
                                num_query_groups=32, ffn_hidden_size=11008,
                                source="hf.co/deepseek-ai/deepseek-coder-6.7b-base config.json (32 layers, hidden "
                                       "4096, intermediate 11008, 32 heads, vocab 32256, rope_theta 1e5, rope_scaling "
                                       "linear 4, rms_norm_eps 1e-6); 6.74B parameters"),
    "deepseek-coder-33b": dict(_DEEPSEEK_CODER, num_layers=62, hidden_size=7168, num_attention_heads=56,
                               num_query_groups=8, ffn_hidden_size=19200,
                               source="hf.co/deepseek-ai/deepseek-coder-33b-base config.json (62 layers, hidden "
                                      "7168, intermediate 19200, 56 heads, 8 K/V heads, vocab 32256, rope_theta 1e5, "
                                      "rope_scaling linear 4, rms_norm_eps 1e-6); 33.3B parameters"),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)

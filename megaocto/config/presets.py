"""Named model architectures as plain data (importable without torch).

Each preset is a dict of :class:`megaocto.config.model.ModelConfig` fields plus a ``source`` note saying where the
numbers were checked. Use ``ModelConfig.from_preset(name, **overrides)``.

Init std for bigcode models follows the 1/sqrt(hidden) rule that reproduces the published values
(StarCoder 15B: 0.01275 = 1/sqrt(6144); SantaCoder: 0.022 ≈ 1/sqrt(2048), reference §1.13); the HF configs only
carry the generic ``initializer_range: 0.02``.

Megatron trained all bigcode models with the fused bias-GELU (tanh approximation), so ``activation`` is
``gelu_tanh`` everywhere, even where the exported HF config says ``gelu`` / ``gelu_fast``.
"""
from __future__ import annotations

_BIGCODE = dict(family="bigcode", num_query_groups=1, activation="gelu_tanh", norm_epsilon=1e-5,
                attention_dropout=0.1, hidden_dropout=0.1, add_qkv_bias=True, add_bias_linear=True,
                tie_embeddings=True, make_vocab_size_divisible_by=128)

_GLM2 = dict(family="glm2", activation="swiglu", norm_epsilon=1e-5, attention_dropout=0.0, hidden_dropout=0.0,
             add_qkv_bias=True, add_bias_linear=False, tie_embeddings=False, rotary_percent=0.5,
             rotary_base=10000.0, make_vocab_size_divisible_by=128)

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
}


def preset_names() -> list[str]:
    return sorted(PRESETS)

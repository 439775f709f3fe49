"""Shared test helper: a transformers ``LlamaForCausalLM`` holding the same weights as one of our llama models.

The weight mapping is written out here on purpose (not taken from megaocto.convert.hf_llama), so the "matches
transformers" tests stay independent of the converter they would otherwise be checking.
"""
import io
import json
import os

import torch

CODE_TEXTS = ["def add(a, b):\n    return a + b\n", "print('hello world')", "for i in range(10):\n    x += i\n",
              "class Foo:\n    pass\n", "import os\nos.path.join('a', 'b')\n"] * 20


def write_codellama_tokenizer(directory: str, texts=CODE_TEXTS) -> str:
    """A tiny CodeLlama-style tokenizer trained here (no network): ``tokenizer.model`` (sentencepiece BPE,
    <unk>=0, <s>=1, </s>=2, byte fallback, as Llama's) + CodeLlama's ``tokenizer_config.json``."""
    import sentencepiece as spm

    os.makedirs(directory, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=400,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   hard_vocab_limit=False, minloglevel=2)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CodeLlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return directory


def llama_hf_config(cfg, vocab: int, **extra):
    """A ``transformers.LlamaConfig`` with the architecture of megaocto llama config ``cfg``."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling_factor != 1.0:
        rope = {"rope_type": "linear", "factor": cfg.rope_scaling_factor, "rope_theta": cfg.rotary_base}
    return LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_epsilon, rope_parameters=rope,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, **extra)


def llama_twin(model, vocab: int):
    """``LlamaForCausalLM`` (fp32, eval) with the weights of single-rank megaocto llama ``model``."""
    from transformers import LlamaForCausalLM

    cfg = model.cfg
    hf = LlamaForCausalLM(llama_hf_config(cfg, vocab, bos_token_id=1, eos_token_id=2)).eval()
    ours = {k: v.detach() for k, v in model.named_parameters()}
    mapped = {"model.embed_tokens.weight": ours["embedding.word_embeddings.weight"][:vocab],
              "model.norm.weight": ours["final_layernorm.weight"],
              "lm_head.weight": ours["output_layer.weight"][:vocab]}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        k, v = ours[p + "self_attention.key_value.weight"].chunk(2)
        gate, up = ours[p + "mlp.dense_h_to_4h.weight"].chunk(2)
        mapped.update({
            q + "input_layernorm.weight": ours[p + "input_layernorm.weight"],
            q + "self_attn.q_proj.weight": ours[p + "self_attention.query.weight"],
            q + "self_attn.k_proj.weight": k, q + "self_attn.v_proj.weight": v,
            q + "self_attn.o_proj.weight": ours[p + "self_attention.dense.weight"],
            q + "post_attention_layernorm.weight": ours[p + "post_attention_layernorm.weight"],
            q + "mlp.gate_proj.weight": gate, q + "mlp.up_proj.weight": up,
            q + "mlp.down_proj.weight": ours[p + "mlp.dense_4h_to_h.weight"]})
    hf.load_state_dict(mapped, strict=True)
    return hf


def randomize_norms(model, seed: int = 5):
    """Give every RMSNorm weight random values (they start at 1, which would hide a missing or swapped norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))

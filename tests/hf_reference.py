"""Shared test helper: a transformers GPTBigCode model holding the same weights as one of our bigcode models.

The weight mapping is written out here on purpose (not taken from megaocto.convert.hf_bigcode), so the
"matches transformers" tests stay independent of the converter they would otherwise be checking.
"""
import torch


def gpt_bigcode_twin(model, vocab: int, *, bos: int, eos: int, pad: int | None = None):
    """Build a ``GPTBigCodeForCausalLM`` (eval mode, tied LM head) with ``model``'s weights.

    ``model`` is a single-rank megaocto bigcode-family model (MQA, learned positions, LayerNorm with bias);
    ``vocab`` is the real vocabulary size (our embedding may be padded, only the first ``vocab`` rows are
    copied); ``bos``/``eos``/``pad`` are the special-token ids written into the HF config. Raises
    AssertionError if the mapped state dict does not cover the HF model (only ``lm_head.weight``, which is
    tied, may be missing).
    """
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    cfg = model.cfg
    hf = GPTBigCodeForCausalLM(GPTBigCodeConfig(
        vocab_size=vocab, n_positions=cfg.max_positions, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads, n_inner=cfg.ffn_size, multi_query=True,
        activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=cfg.norm_epsilon, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)).eval()
    ours = {k: v.detach() for k, v in model.named_parameters()}
    mapped = {"transformer.wte.weight": ours["embedding.word_embeddings.weight"][:vocab],
              "transformer.wpe.weight": ours["embedding.position_embeddings.weight"],
              "transformer.ln_f.weight": ours["final_layernorm.weight"],
              "transformer.ln_f.bias": ours["final_layernorm.bias"]}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            mapped[q + f"ln_1.{kind}"] = ours[p + f"input_layernorm.{kind}"]
            mapped[q + f"ln_2.{kind}"] = ours[p + f"post_attention_layernorm.{kind}"]
            # MQA c_attn = [query (h) | key (d) | value (d)], our key_value is [K | V]
            mapped[q + f"attn.c_attn.{kind}"] = torch.cat([ours[p + f"self_attention.query.{kind}"],
                                                          ours[p + f"self_attention.key_value.{kind}"]])
            mapped[q + f"attn.c_proj.{kind}"] = ours[p + f"self_attention.dense.{kind}"]
            mapped[q + f"mlp.c_fc.{kind}"] = ours[p + f"mlp.dense_h_to_4h.{kind}"]
            mapped[q + f"mlp.c_proj.{kind}"] = ours[p + f"mlp.dense_4h_to_h.{kind}"]
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf

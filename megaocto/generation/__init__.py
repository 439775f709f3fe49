"""Generation with a KV cache on tensor-parallel megaocto models (contract: docs/design.md, generation/).

``load_checkpoint_model(load, pc=None, *, dtype=None, device=None, iteration=None) -> (model, cfg)``,
``load_tokenizer(path)``, ``GenerationConfig``, ``generate(model, prompts, gen, pc, *, use_cache=True)``,
``generate_text(model, tokenizer, prompts, gen, pc, *, max_prompt_tokens=None)``, ``completion_text`` and
``KVCache``. Usage: docs/generation.md.
"""
from megaocto.generation.generate import (GenerationConfig, completion_text, generate, generate_text,
                                          next_token_logits, position_limit, truncate_at_stop)
from megaocto.generation.kv_cache import KVCache
from megaocto.generation.loading import load_checkpoint_model, load_tokenizer
from megaocto.generation.sampling import filter_logits, full_vocab_logits, sample_next

__all__ = ["GenerationConfig", "KVCache", "completion_text", "filter_logits", "full_vocab_logits", "generate",
           "generate_text", "load_checkpoint_model", "load_tokenizer", "next_token_logits", "position_limit",
           "sample_next", "truncate_at_stop"]

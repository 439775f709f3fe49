"""GLM2 (ChatGLM2 / CodeGeeX2) decoder with tensor and sequence parallelism.

Block: ``x + drop(attn(RMSNorm(x)))`` then ``x + drop(mlp(RMSNorm(x)))``; final RMSNorm; untied output layer.

* QKV: one fused column-parallel projection with bias, rows ``[q (heads·d) | k (groups·d) | v (groups·d)]``
  (ChatGLM2's ``query_key_value`` layout); the K/V groups are split over TP, query head ``i`` uses group
  ``i // (heads / groups)``.
* Rotary: applied to the first ``rotary_percent·d`` dims of every q/k head, rotating GLM's *interleaved* pairs
  ``(x[2j], x[2j+1])`` by ``pos · base^(-2j / rot_dim)`` (modeling_chatglm.py ``apply_rotary_pos_emb``, where the
  frequency denominator is the rotated width, e.g. 64 for CodeGeeX2's 128-dim heads); the rest passes through.
* MLP: SwiGLU ``dense_4h_to_h(silu(gate) * up)`` with ``dense_h_to_4h`` the fused column-parallel [gate | up].
* No bias on ``dense``/MLP (``add_bias_linear=False``), RMSNorm eps 1e-5, no embedding dropout.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megaocto.config.model import ModelConfig
from megaocto.kernels.attention import attention
from megaocto.model.common import (RMSNorm, begin_kv_cache_step, check_input_ids, checkpoint, default_position_ids,
                                   dropout,
                                   kernel_ops, linear_loss, normal_init, run_layers, scaled_init,
                                   tag_sequence_parallel)
from megaocto.model.common import build_stage_layers, chunk_blocks, stage_chunks, stage_input
from megaocto.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, pad_vocab_size
from megaocto.parallel.mappings import scatter_to_sp


def rotary_cos_sin(position_ids: torch.Tensor, rot_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` of shape ``[b, 1, s, rot_dim/2]`` for GLM's interleaved rotary."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=position_ids.device)
                               / rot_dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [b, s, rot_dim/2]
    return angles.cos()[:, None], angles.sin()[:, None]


class GLM2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, *, dtype, device, selective_recompute: bool):
        super().__init__()
        self.pc, self.cfg = pc, cfg
        self.ops = kernel_ops(cfg, pc, device)
        self.selective_recompute = selective_recompute
        d, heads, groups = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
        self.head_dim, self.local_heads, self.local_groups = d, heads // pc.tp, max(groups // pc.tp, 1)
        kw = dict(dtype=dtype, device=device)
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, [heads * d, groups * d, groups * d], pc,
                                                    bias=cfg.add_qkv_bias,
                                                    init_method=normal_init(cfg.init_method_std), **kw)
        self.dense = RowParallelLinear(heads * d, cfg.hidden_size, pc, bias=cfg.add_bias_linear,
                                       init_method=scaled_init(cfg.init_method_std, cfg.num_layers), **kw)

    def _core(self, q, k, v, segment_ids):
        p = self.cfg.attention_dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(self.head_dim)
        if p > 0.0:
            with self.pc.rng.fork():
                return attention(q, k, v, causal=True, segment_ids=segment_ids, dropout_p=p, scale=scale,
                                 backend=self.ops.attention_backend)
        return attention(q, k, v, causal=True, segment_ids=segment_ids, scale=scale,
                         backend=self.ops.attention_backend)

    def forward(self, x, cos, sin, segment_ids=None, kv_cache=None):
        d = self.head_dim
        qkv = self.query_key_value(x)  # [b, s, (local_heads + 2 local_groups) d]
        b, s, _ = qkv.shape
        q, k, v = qkv.split([self.local_heads * d, self.local_groups * d, self.local_groups * d], dim=-1)
        q = self.ops.rotary(q.view(b, s, self.local_heads, d).transpose(1, 2), cos, sin, interleaved=True)
        k = self.ops.rotary(k.view(b, s, self.local_groups, d).transpose(1, 2), cos, sin, interleaved=True)
        v = v.view(b, s, self.local_groups, d).transpose(1, 2)
        if kv_cache is not None:  # store this step's rotated K and V, attend over the cache
            ctx = kv_cache.attend(q, k, v, scale=1.0 / math.sqrt(d))
        elif self.selective_recompute and torch.is_grad_enabled():
            ctx = checkpoint(lambda q_, k_, v_: self._core(q_, k_, v_, segment_ids), self.pc, q, k, v,
                             replay_rng=self.training and self.cfg.attention_dropout > 0)
        else:
            ctx = self._core(q, k, v, segment_ids)
        return self.dense(ctx.transpose(1, 2).reshape(b, s, self.local_heads * d))


class GLM2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, *, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.ops = kernel_ops(cfg, pc, device)
        f = cfg.ffn_size
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, [f, f], pc, bias=cfg.add_bias_linear,
                                                  init_method=normal_init(cfg.init_method_std), **kw)
        self.dense_4h_to_h = RowParallelLinear(f, cfg.hidden_size, pc, bias=cfg.add_bias_linear,
                                               init_method=scaled_init(cfg.init_method_std, cfg.num_layers), **kw)

    def forward(self, x):
        # local [gate shard | up shard] -> silu(gate) * up
        return self.dense_4h_to_h(self.ops.swiglu(self.dense_h_to_4h(x)))


class GLM2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, *, dtype, device, selective_recompute: bool):
        super().__init__()
        self.pc, self.hidden_dropout = pc, cfg.hidden_dropout
        kw = dict(dtype=dtype, device=device)
        ops = kernel_ops(cfg, pc, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, ops=ops, **kw)
        self.self_attention = GLM2Attention(cfg, pc, selective_recompute=selective_recompute, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, ops=ops, **kw)
        self.mlp = GLM2MLP(cfg, pc, **kw)
        tag_sequence_parallel([self.input_layernorm.weight, self.post_attention_layernorm.weight], pc)

    def forward(self, x, cos=None, sin=None, segment_ids=None, kv_cache=None):
        sp = self.pc.sequence_parallel
        h = self.self_attention(self.input_layernorm(x), cos, sin, segment_ids, kv_cache)
        x = x + dropout(h, self.hidden_dropout, self.training, self.pc, sharded=sp)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + dropout(h, self.hidden_dropout, self.training, self.pc, sharded=sp)


class GLM2Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, vocab: int, *, dtype, device):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(vocab, cfg.hidden_size, pc,
                                                      init_method=normal_init(cfg.init_method_std),
                                                      dtype=dtype, device=device)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class GLM2Model(nn.Module):
    """GLM2 / CodeGeeX2 decoder; see the module docstring. Built by :func:`megaocto.model.build_model`."""

    def __init__(self, cfg: ModelConfig, pc, *, dtype=torch.float32, device=None, recompute: str = "none",
                 recompute_num_layers: int = 1, pp_layers=None, virtual_pp: int = 1):
        super().__init__()
        cfg.validate(pc.tp, sequence_parallel=pc.sequence_parallel)
        self.cfg, self.pc = cfg, pc
        self.recompute, self.recompute_num_layers = recompute, recompute_num_layers
        self.padded_vocab_size = pad_vocab_size(cfg.vocab_size, pc.tp, cfg.make_vocab_size_divisible_by)
        kw = dict(dtype=dtype, device=device)
        # Pipeline stage (pp > 1): the first stage holds the embedding, the last the final norm and output layer
        # (untied: nothing is shared). Every stage draws the embedding so the blocks get the unsplit model's weights.
        pp, pp_rank = getattr(pc, "pp", 1), getattr(pc, "pp_rank", 0)
        self.first_stage, self.last_stage = pp_rank == 0, pp_rank == pp - 1
        # interleaved (virtual_pp > 1): this stage runs several model chunks; chunk 0 of the first stage embeds,
        # the last chunk of the last stage has the head
        self.layer_ranges = stage_chunks(cfg.num_layers, pp, pp_rank, pp_layers, virtual_pp)
        self.layer_range = self.layer_ranges[0] if virtual_pp == 1 else None
        embedding = GLM2Embedding(cfg, pc, self.padded_vocab_size, **kw)
        if self.first_stage:
            self.embedding = embedding
        del embedding
        self.layers = build_stage_layers(
            lambda: GLM2Block(cfg, pc, selective_recompute=(recompute == "selective"), **kw), self.layer_ranges)
        self.ops = kernel_ops(cfg, pc, device)
        if self.last_stage:
            self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, ops=self.ops, **kw)
            tag_sequence_parallel([self.final_layernorm.weight], pc)
            self.output_layer = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab_size, pc, bias=False,
                                                     init_method=normal_init(cfg.init_method_std), **kw)

    def _dropout_on(self) -> bool:
        return self.training and (self.cfg.attention_dropout > 0 or self.cfg.hidden_dropout > 0)

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                kv_cache=None, hidden_states: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
        """``kv_cache``: a :class:`megaocto.generation.kv_cache.KVCache`; this call appends its tokens' rotated K
        and V and attends over the cache (positions from the cache unless given). Pipeline stages after the first
        take the previous stage's output as ``hidden_states``; stages before the last return their output."""
        pc = self.pc
        check_input_ids(input_ids, self.cfg, pc)
        if kv_cache is not None:
            position_ids = begin_kv_cache_step(kv_cache, input_ids, position_ids, segment_ids, pc)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, segment_ids)
        cos, sin = rotary_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rotary_base)
        first, last = self.first_stage and chunk == 0, self.last_stage and chunk == len(self.layer_ranges) - 1
        if first:
            x = self.embedding(input_ids)
            if pc.sequence_parallel:
                x = scatter_to_sp(x, pc, dim=1)
        else:
            stage_input(hidden_states, pc)
            x = hidden_states
        x = run_layers(chunk_blocks(self.layers, self.layer_ranges, chunk), x, pc, self.recompute, self.recompute_num_layers,
                       dropout_on=self._dropout_on(), cos=cos, sin=sin, segment_ids=segment_ids,
                       kv_cache=kv_cache)
        if not last:
            return x
        if kv_cache is not None:
            kv_cache.commit()
            x = kv_cache.head_input(x)  # generation: LM head for the last position only
        x = self.final_layernorm(x)
        if labels is not None:  # fused output GEMM + vocab-parallel cross-entropy (ops.linear_cross_entropy)
            return linear_loss(x, self.output_layer.weight, labels, pc, self.ops, self.cfg.vocab_size)
        # output_layer is column-parallel over the vocab: it all-gathers the SP shards (or copies to TP) itself.
        return self.output_layer(x)

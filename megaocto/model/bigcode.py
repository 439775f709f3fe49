"""GPT / BigCode (SantaCoder, StarCoder) decoder with tensor and sequence parallelism.

Block (pre-LN, Megatron GPT): ``x + drop(attn(LN(x)))`` then ``x + drop(mlp(LN(x)))``; final LayerNorm; learned
absolute position embeddings; tanh-GELU MLP; output logits through the tied word embedding.

Multi-query attention (``num_query_groups == 1``) follows bigcode Megatron-LM exactly (reference §1.2): the query
projection is column-parallel (split by heads); the single K/V projection ``key_value`` ([K | V], 2·head_dim) is a
plain ``nn.Linear`` replicated on every TP rank, and its *output* goes through ``copy_to_tp`` (``gather_from_sp``
with sequence parallelism) so the K/V gradient, which each rank only sees for its own query heads, is summed over
TP before it reaches the replicated weight. With more than one group, Q/K/V are one fused column-parallel
projection ``[q | k | v]`` whose groups are split over TP.

Tensor layout: ``[b, s, h]``; with sequence parallelism the residual stream is ``[b, s/tp, h]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megaocto.config.model import ModelConfig
from megaocto.kernels.attention import attention
from megaocto.model.common import (LayerNorm, begin_kv_cache_step, check_input_ids, checkpoint,
                                   default_position_ids, dropout,
                                   kernel_ops, lm_head_input, linear_loss, normal_init, run_layers,
                                   scaled_init, stage_input, tag_sequence_parallel)
from megaocto.model.common import build_stage_layers, chunk_blocks, stage_chunks
from megaocto.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, pad_vocab_size
from megaocto.parallel.mappings import copy_to_tp, gather_from_sp, scatter_to_sp


class BigCodeAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, *, dtype, device, selective_recompute: bool):
        super().__init__()
        self.pc, self.cfg = pc, cfg
        self.ops = kernel_ops(cfg, pc, device)
        self.selective_recompute = selective_recompute
        d, heads, groups = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
        self.head_dim = d
        self.local_heads = heads // pc.tp
        self.mqa = cfg.is_mqa
        init, out_init = normal_init(cfg.init_method_std), scaled_init(cfg.init_method_std, cfg.num_layers)
        kw = dict(dtype=dtype, device=device)
        if self.mqa:
            self.local_groups = 1
            self.query = ColumnParallelLinear(cfg.hidden_size, heads * d, pc, bias=cfg.add_qkv_bias,
                                              init_method=init, **kw)
            self.key_value = nn.Linear(cfg.hidden_size, 2 * d, bias=cfg.add_qkv_bias, **kw)
            with torch.no_grad():
                init(self.key_value.weight)
                if self.key_value.bias is not None:
                    self.key_value.bias.zero_()
            # Under sequence parallelism each rank's key_value sees only its sequence shard: grads are partial.
            tag_sequence_parallel(self.key_value.parameters(), pc)
        else:
            self.local_groups = groups // pc.tp
            self.query_key_value = ColumnParallelLinear(cfg.hidden_size, [heads * d, groups * d, groups * d], pc,
                                                        bias=cfg.add_qkv_bias, init_method=init, **kw)
        self.dense = RowParallelLinear(heads * d, cfg.hidden_size, pc, bias=cfg.add_bias_linear,
                                       init_method=out_init, **kw)

    def _qkv(self, x: torch.Tensor):
        b = x.shape[0]
        d, pc = self.head_dim, self.pc
        if self.mqa:
            q = self.query(x)  # [b, s, local_heads*d] (gathers the SP shards itself)
            kv = self.key_value(x)  # [b, s or s/tp, 2d], replicated weight
            kv = gather_from_sp(kv, pc, dim=1, grad_is_partial=True) if pc.sequence_parallel else copy_to_tp(kv, pc)
            k, v = kv.split(d, dim=-1)
            s = q.shape[1]
            q = q.view(b, s, self.local_heads, d).transpose(1, 2)
            return q, k.unsqueeze(1), v.unsqueeze(1)
        qkv = self.query_key_value(x)
        s = qkv.shape[1]
        q, k, v = qkv.split([self.local_heads * d, self.local_groups * d, self.local_groups * d], dim=-1)
        q = q.view(b, s, self.local_heads, d).transpose(1, 2)
        k = k.view(b, s, self.local_groups, d).transpose(1, 2)
        v = v.view(b, s, self.local_groups, d).transpose(1, 2)
        return q, k, v

    def _core(self, q, k, v, segment_ids):
        p = self.cfg.attention_dropout if self.training else 0.0
        if p > 0.0:
            with self.pc.rng.fork():  # attention probabilities are sharded by head: per-TP-rank stream
                return attention(q, k, v, causal=True, segment_ids=segment_ids, dropout_p=p,
                                 scale=1.0 / math.sqrt(self.head_dim), backend=self.ops.attention_backend)
        return attention(q, k, v, causal=True, segment_ids=segment_ids, scale=1.0 / math.sqrt(self.head_dim),
                         backend=self.ops.attention_backend)

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        if kv_cache is not None:  # store this step's K/V (one head for MQA) and attend over the cache
            ctx = kv_cache.attend(q, k, v, scale=1.0 / math.sqrt(self.head_dim))
        elif self.selective_recompute and torch.is_grad_enabled():
            ctx = checkpoint(lambda q_, k_, v_: self._core(q_, k_, v_, segment_ids), self.pc, q, k, v,
                             replay_rng=self.training and self.cfg.attention_dropout > 0)
        else:
            ctx = self._core(q, k, v, segment_ids)
        b, _, s, _ = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        return self.dense(ctx)


class BigCodeMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, *, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.ops = kernel_ops(cfg, pc, device)
        # tanh-GELU runs ops.bias_gelu; when that kernel fuses the bias add, the GEMM leaves the bias to it.
        self.fuse_bias = self.approximate == "tanh" and self.ops.fuse_bias
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_size, pc, bias=cfg.add_bias_linear,
                                                  init_method=normal_init(cfg.init_method_std),
                                                  skip_bias_add=self.fuse_bias, **kw)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, pc, bias=cfg.add_bias_linear,
                                               init_method=scaled_init(cfg.init_method_std, cfg.num_layers), **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, bias = self.dense_h_to_4h(x) if self.fuse_bias else (self.dense_h_to_4h(x), None)
        if self.approximate == "tanh":
            return self.dense_4h_to_h(self.ops.bias_gelu(h, bias))
        return self.dense_4h_to_h(F.gelu(h))  # exact (erf) GELU: plain torch


class BigCodeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, *, dtype, device, selective_recompute: bool):
        super().__init__()
        self.pc, self.hidden_dropout = pc, cfg.hidden_dropout
        kw = dict(dtype=dtype, device=device)
        ops = kernel_ops(cfg, pc, device)
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon, ops=ops, **kw)
        self.self_attention = BigCodeAttention(cfg, pc, selective_recompute=selective_recompute, **kw)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon, ops=ops, **kw)
        self.mlp = BigCodeMLP(cfg, pc, **kw)
        tag_sequence_parallel(list(self.input_layernorm.parameters()) +
                              list(self.post_attention_layernorm.parameters()), pc)

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        sp = self.pc.sequence_parallel
        h = self.self_attention(self.input_layernorm(x), segment_ids, kv_cache)
        x = x + dropout(h, self.hidden_dropout, self.training, self.pc, sharded=sp)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + dropout(h, self.hidden_dropout, self.training, self.pc, sharded=sp)


class BigCodeEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, vocab: int, *, dtype, device):
        super().__init__()
        init = normal_init(cfg.init_method_std)
        self.word_embeddings = VocabParallelEmbedding(vocab, cfg.hidden_size, pc, init_method=init,
                                                      dtype=dtype, device=device)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size, dtype=dtype, device=device)
        with torch.no_grad():
            init(self.position_embeddings.weight)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids) + self.position_embeddings(position_ids)


class BigCodeModel(nn.Module):
    """GPT/BigCode decoder; see the module docstring. Built by :func:`megaocto.model.build_model`."""

    def __init__(self, cfg: ModelConfig, pc, *, dtype=torch.float32, device=None, recompute: str = "none",
                 recompute_num_layers: int = 1, pp_layers=None, virtual_pp: int = 1):
        super().__init__()
        cfg.validate(pc.tp, sequence_parallel=pc.sequence_parallel)
        self.cfg, self.pc = cfg, pc
        self.recompute, self.recompute_num_layers = recompute, recompute_num_layers
        self.padded_vocab_size = pad_vocab_size(cfg.vocab_size, pc.tp, cfg.make_vocab_size_divisible_by)
        kw = dict(dtype=dtype, device=device)
        # Pipeline stage (pp > 1): the first stage holds the embedding, the last the final norm and LM head; with tied
        # embeddings the last stage keeps its own copy of the word embedding (tagged `shared`, same name, same
        # init), whose grad the loop all-reduces with the first stage's over pc.embedding_group (as Megatron).
        pp, pp_rank = getattr(pc, "pp", 1), getattr(pc, "pp_rank", 0)
        self.first_stage, self.last_stage = pp_rank == 0, pp_rank == pp - 1
        # interleaved (virtual_pp > 1): this stage runs several model chunks; chunk 0 of the first stage embeds,
        # the last chunk of the last stage has the head
        self.layer_ranges = stage_chunks(cfg.num_layers, pp, pp_rank, pp_layers, virtual_pp)
        self.layer_range = self.layer_ranges[0] if virtual_pp == 1 else None
        embedding = BigCodeEmbedding(cfg, pc, self.padded_vocab_size, **kw)  # every stage draws it (same RNG)
        if self.first_stage:
            self.embedding = embedding
        elif self.last_stage and cfg.tie_embeddings:
            self.embedding = nn.Module()
            self.embedding.word_embeddings = embedding.word_embeddings
            self.embedding.word_embeddings.weight.shared = True
        del embedding
        self.layers = build_stage_layers(
            lambda: BigCodeBlock(cfg, pc, selective_recompute=(recompute == "selective"), **kw), self.layer_ranges)
        self.ops = kernel_ops(cfg, pc, device)
        if self.last_stage:
            self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon, ops=self.ops, **kw)
            tag_sequence_parallel(self.final_layernorm.parameters(), pc)
            if not cfg.tie_embeddings:
                self.output_layer = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab_size, pc, bias=False,
                                                         init_method=normal_init(cfg.init_method_std), **kw)

    def _dropout_on(self) -> bool:
        return self.training and (self.cfg.attention_dropout > 0 or self.cfg.hidden_dropout > 0)

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                kv_cache=None, hidden_states: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
        """``kv_cache``: a :class:`megaocto.generation.kv_cache.KVCache`; this call appends its tokens' K/V and
        attends over the cache (positions from the cache unless given). Pipeline stages after the first take the
        previous stage's output as ``hidden_states``; stages before the last return their output ``[b, s(/tp), h]``."""
        pc = self.pc
        check_input_ids(input_ids, self.cfg, pc)
        used = input_ids.shape[1] + (kv_cache.length if kv_cache is not None else 0)
        if used > self.cfg.max_positions:
            raise ValueError(f"sequence length {used} exceeds max_position_embeddings "
                             f"{self.cfg.max_positions} of this model")
        if kv_cache is not None:
            position_ids = begin_kv_cache_step(kv_cache, input_ids, position_ids, segment_ids, pc)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, segment_ids)
        first, last = self.first_stage and chunk == 0, self.last_stage and chunk == len(self.layer_ranges) - 1
        if first:
            x = self.embedding(input_ids, position_ids)  # [b, s, h], full on every TP rank
            if pc.sequence_parallel:
                x = scatter_to_sp(x, pc, dim=1)
            x = dropout(x, self.cfg.hidden_dropout, self.training, pc, sharded=pc.sequence_parallel)
        else:
            stage_input(hidden_states, pc)
            x = hidden_states
        x = run_layers(chunk_blocks(self.layers, self.layer_ranges, chunk), x, pc, self.recompute, self.recompute_num_layers,
                       dropout_on=self._dropout_on(), segment_ids=segment_ids, kv_cache=kv_cache)
        if not last:
            return x
        if kv_cache is not None:
            kv_cache.commit()
            x = kv_cache.head_input(x)  # generation: LM head for the last position only
        x = self.final_layernorm(x)
        out_weight = self.embedding.word_embeddings.weight if self.cfg.tie_embeddings else self.output_layer.weight
        if labels is not None:  # fused output GEMM + vocab-parallel cross-entropy (ops.linear_cross_entropy)
            return linear_loss(x, out_weight, labels, pc, self.ops, self.cfg.vocab_size)
        if self.cfg.tie_embeddings:
            return F.linear(lm_head_input(x, pc), out_weight)
        return self.output_layer(x)

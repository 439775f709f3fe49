"""Llama (CodeLlama, DeepSeek-Coder) decoder with tensor and sequence parallelism.

Block: ``x + attn(RMSNorm(x))`` then ``x + mlp(RMSNorm(x))``; final RMSNorm; untied output layer; no biases, no
dropout in the released models (the config's dropouts still apply if set).

* Attention: ``query`` is column-parallel (split by heads); ``key_value`` is one projection ``[k (groups·d) |
  v (groups·d)]``. When tp divides the K/V heads (``num_query_groups``) it is column-parallel too and each rank
  owns whole groups (MHA, GQA). When the K/V heads divide tp (e.g. CodeLlama-34B's 8 K/V heads at tp=16) the
  ``key_value`` weight is replicated on every rank, computed whole, and its *output* goes through ``copy_to_tp``
  (``gather_from_sp`` with sequence parallelism), as bigcode's multi-query ``key_value``: each rank only uses the
  group of its query heads, so the K/V gradient is summed over TP before it reaches the replicated weight (and its
  weight grad is tagged ``sequence_parallel`` under SP, where each rank saw only its sequence shard). The tag
  ``kv_groups`` on the ``key_value`` params tells the checkpoint converters that the split turns into replication
  above ``tp = num_query_groups`` (:func:`megaocto.convert.core.param_specs`). Query head ``i`` uses group
  ``i // (heads / groups)`` (transformers' ``repeat_kv``).
* Rotary: the whole head, GPT-NeoX "halves" pairs ``(x[j], x[j + d/2])`` (transformers' ``rotate_half``), angle
  ``(pos / rope_scaling_factor) · rotary_base^(-2j / d)`` (linear RoPE scaling; the factor divides the
  frequencies as transformers' ``_compute_linear_scaling_rope_parameters`` does).
* MLP: SwiGLU ``down(silu(gate) * up)`` — the GLM2 MLP (``dense_h_to_4h`` the fused column-parallel [gate | up],
  ``dense_4h_to_h`` row-parallel).
* Embedding and output layer: both vocab-parallel, untied; padded vocabulary rows are excluded from the softmax.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megaocto.config.model import ModelConfig
from megaocto.kernels.attention import attention
from megaocto.model.common import (RMSNorm, begin_kv_cache_step, check_input_ids, checkpoint,
                                   default_position_ids, dropout, kernel_ops, linear_loss, normal_init, run_layers,
                                   scaled_init, tag_sequence_parallel)
from megaocto.model.common import build_stage_layers, chunk_blocks, stage_chunks, stage_input
from megaocto.model.glm2 import GLM2Embedding as LlamaEmbedding
from megaocto.model.glm2 import GLM2MLP as LlamaMLP
from megaocto.parallel.layers import ColumnParallelLinear, RowParallelLinear, pad_vocab_size
from megaocto.parallel.mappings import copy_to_tp, gather_from_sp, scatter_to_sp


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float,
                   scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` of shape ``[b, 1, s, head_dim/2]`` for the halves-style rotary of the whole head."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                               .float() / head_dim))
    inv_freq = inv_freq / scaling_factor
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [b, s, d/2]
    return angles.cos()[:, None], angles.sin()[:, None]


class ReplicatedLinear(nn.Module):
    """A bias-free ``F.linear`` whose weight every TP rank holds whole (drawn like a column-parallel weight, so
    one seed gives the same values at every TP size)."""

    def __init__(self, in_features: int, out_features: int, *, init_method, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        if self.weight.device.type != "meta":
            with torch.no_grad():
                full = torch.empty(out_features, in_features, dtype=torch.float32, device=self.weight.device)
                init_method(full)
                self.weight.copy_(full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, *, dtype, device, selective_recompute: bool):
        super().__init__()
        self.pc, self.cfg = pc, cfg
        self.ops = kernel_ops(cfg, pc, device)
        self.selective_recompute = selective_recompute
        d, heads, groups = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
        self.head_dim, self.local_heads = d, heads // pc.tp
        self.kv_split = cfg.kv_split_over(pc.tp)
        # K/V heads this rank attends with: its share of the groups, or the one group of its query heads.
        self.local_groups = groups // pc.tp if self.kv_split else 1
        self.group = pc.tp_rank // (pc.tp // groups) if not self.kv_split else 0
        init = normal_init(cfg.init_method_std)
        kw = dict(dtype=dtype, device=device)
        self.query = ColumnParallelLinear(cfg.hidden_size, heads * d, pc, bias=False, init_method=init, **kw)
        if self.kv_split:
            self.key_value = ColumnParallelLinear(cfg.hidden_size, [groups * d, groups * d], pc, bias=False,
                                                  init_method=init, **kw)
        else:
            self.key_value = ReplicatedLinear(cfg.hidden_size, 2 * groups * d, init_method=init, **kw)
            # Under sequence parallelism each rank's key_value sees only its sequence shard: grads are partial.
            tag_sequence_parallel(self.key_value.parameters(), pc)
        self.key_value.weight.kv_groups = groups  # split over TP up to tp = groups, replicated above
        self.dense = RowParallelLinear(heads * d, cfg.hidden_size, pc, bias=False,
                                       init_method=scaled_init(cfg.init_method_std, cfg.num_layers), **kw)

    def _qkv(self, x: torch.Tensor):
        d, pc = self.head_dim, self.pc
        q = self.query(x)  # [b, s, local_heads·d] (gathers the SP shards itself)
        b, s, _ = q.shape
        q = q.view(b, s, self.local_heads, d).transpose(1, 2)
        if self.kv_split:
            k, v = self.key_value(x).chunk(2, dim=-1)  # local [k shard | v shard]
        else:
            kv = self.key_value(x)  # [b, s or s/tp, 2·groups·d], replicated weight
            kv = gather_from_sp(kv, pc, dim=1, grad_is_partial=True) if pc.sequence_parallel else copy_to_tp(kv, pc)
            k, v = kv.chunk(2, dim=-1)
            k = k[..., self.group * d:(self.group + 1) * d]
            v = v[..., self.group * d:(self.group + 1) * d]
        k = k.reshape(b, s, self.local_groups, d).transpose(1, 2)
        v = v.reshape(b, s, self.local_groups, d).transpose(1, 2)
        return q, k, v

    def _core(self, q, k, v, segment_ids):
        p = self.cfg.attention_dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(self.head_dim)
        if p > 0.0:
            with self.pc.rng.fork():  # attention probabilities are sharded by head: per-TP-rank stream
                return attention(q, k, v, causal=True, segment_ids=segment_ids, dropout_p=p, scale=scale,
                                 backend=self.ops.attention_backend)
        return attention(q, k, v, causal=True, segment_ids=segment_ids, scale=scale,
                         backend=self.ops.attention_backend)

    def forward(self, x, cos, sin, segment_ids=None, kv_cache=None):
        q, k, v = self._qkv(x)
        q = self.ops.rotary(q, cos, sin, interleaved=False)
        k = self.ops.rotary(k, cos, sin, interleaved=False)
        if kv_cache is not None:  # store this step's rotated K and V, attend over the cache
            ctx = kv_cache.attend(q, k, v, scale=1.0 / math.sqrt(self.head_dim))
        elif self.selective_recompute and torch.is_grad_enabled():
            ctx = checkpoint(lambda q_, k_, v_: self._core(q_, k_, v_, segment_ids), self.pc, q, k, v,
                             replay_rng=self.training and self.cfg.attention_dropout > 0)
        else:
            ctx = self._core(q, k, v, segment_ids)
        b, _, s, _ = ctx.shape
        return self.dense(ctx.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, pc, *, dtype, device, selective_recompute: bool):
        super().__init__()
        self.pc, self.hidden_dropout = pc, cfg.hidden_dropout
        kw = dict(dtype=dtype, device=device)
        ops = kernel_ops(cfg, pc, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, ops=ops, **kw)
        self.self_attention = LlamaAttention(cfg, pc, selective_recompute=selective_recompute, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, ops=ops, **kw)
        self.mlp = LlamaMLP(cfg, pc, **kw)
        tag_sequence_parallel([self.input_layernorm.weight, self.post_attention_layernorm.weight], pc)

    def forward(self, x, cos=None, sin=None, segment_ids=None, kv_cache=None):
        sp = self.pc.sequence_parallel
        h = self.self_attention(self.input_layernorm(x), cos, sin, segment_ids, kv_cache)
        x = x + dropout(h, self.hidden_dropout, self.training, self.pc, sharded=sp)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + dropout(h, self.hidden_dropout, self.training, self.pc, sharded=sp)


class LlamaModel(nn.Module):
    """Llama decoder; see the module docstring. Built by :func:`megaocto.model.build_model`."""

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
        embedding = LlamaEmbedding(cfg, pc, self.padded_vocab_size, **kw)
        if self.first_stage:
            self.embedding = embedding
        del embedding
        self.layers = build_stage_layers(
            lambda: LlamaBlock(cfg, pc, selective_recompute=(recompute == "selective"), **kw), self.layer_ranges)
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
        pc, cfg = self.pc, self.cfg
        check_input_ids(input_ids, cfg, pc)
        if kv_cache is not None:
            position_ids = begin_kv_cache_step(kv_cache, input_ids, position_ids, segment_ids, pc)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, segment_ids)
        cos, sin = rotary_cos_sin(position_ids, cfg.head_dim, cfg.rotary_base, cfg.rope_scaling_factor)
        first, last = self.first_stage and chunk == 0, self.last_stage and chunk == len(self.layer_ranges) - 1
        if first:
            x = self.embedding(input_ids)
            if pc.sequence_parallel:
                x = scatter_to_sp(x, pc, dim=1)
            x = dropout(x, cfg.hidden_dropout, self.training, pc, sharded=pc.sequence_parallel)
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
            return linear_loss(x, self.output_layer.weight, labels, pc, self.ops, cfg.vocab_size)
        # output_layer is column-parallel over the vocab: it all-gathers the SP shards (or copies to TP) itself.
        return self.output_layer(x)

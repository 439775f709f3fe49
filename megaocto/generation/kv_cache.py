"""Key/value cache for incremental decoding on tensor-parallel models.

Layout: per layer, preallocated ``k`` and ``v`` of shape ``[b, local_kv_heads, max_len, head_dim]`` in the model's
dtype. ``local_kv_heads`` is the number of K/V heads this TP rank owns: 1 for multi-query attention (the single
replicated head, never expanded to the query heads), ``num_query_groups / tp`` for grouped/multi-head attention.

Rows are left-padded: row ``r`` of a batch whose prompts have different lengths starts with ``pad_lengths[r]``
padding slots. Slot ``j`` of row ``r`` holds the token at position ``j - pad_lengths[r]`` (positions offset per
row), so learned (bigcode) and rotary (glm2) position embeddings see the same positions as an unpadded run.

One model forward with a cache is one *step* of ``s`` new tokens per row (prefill: the whole left-padded prompt;
decode: ``s = 1``). The model calls, in order::

    cache.begin(s)                      # checks capacity, builds this step's mask and position ids
    position_ids = cache.position_ids() # [b, s]
    ... every layer i: ctx = cache.layer(i).attend(q, k, v, scale=...)   # stores k, v, attends over the cache
    cache.commit()                      # the s slots are now part of the cache
    x = cache.head_input(x)             # last position only (unless all_logits), then final norm + LM head

Attention rule for a query in slot ``t`` and a key in slot ``j`` of the same row: attend iff ``j <= t`` and slot
``j`` is a real token (``j >= pad``). A padding query attends only to itself so no softmax row is empty; padding
outputs never reach a real token. The prefill of an empty cache goes through the model's attention seam
(:func:`megaocto.kernels.attention.attention` with the model's ``ops.attention_backend``, so flash/Triton backends
apply) with segment ids (padding = 0, prompt = 1); later steps use ``scaled_dot_product_attention`` with an
explicit mask. A one-token decode step folds the query heads of each K/V group into the query-length dimension
(``[b, kv_heads, group, d]`` against ``[b, kv_heads, L, d]``), so MQA/GQA K/V are never expanded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaocto.kernels.attention import attention as seam_attention


class KVCache:
    """Preallocated K/V for ``num_layers`` layers; see the module docstring for the step protocol.

    Args:
        num_layers: transformer blocks of the model.
        batch_size: rows (prompts × samples) decoded together.
        num_kv_heads: K/V heads held by this TP rank (``local_kv_heads``).
        head_dim: per-head width.
        max_len: slots per row (longest prompt incl. padding + new tokens).
        dtype, device: of the cached tensors (the model's).
        pad_lengths: int tensor ``[batch_size]`` of left-padding slots per row (None: no padding).
        attention_backend: backend of the prefill's seam attention (the model's ``ops.attention_backend``,
            which :meth:`for_model` passes; None = the seam's automatic choice).
        all_logits: False (default): a cached forward returns the logits of the last position of each row only
            (``[b, 1, V/tp]``; the model cuts the hidden states before the LM head, see :meth:`head_input`);
            True: of every position of the step.
    """

    def __init__(self, *, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 pad_lengths: torch.Tensor | None = None, attention_backend: str | None = None,
                 all_logits: bool = False):
        if min(num_layers, batch_size, num_kv_heads, head_dim, max_len) < 1:
            raise ValueError(f"KVCache sizes must be >= 1 (layers={num_layers}, batch={batch_size}, "
                             f"kv_heads={num_kv_heads}, head_dim={head_dim}, max_len={max_len})")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size, self.max_len, self.num_kv_heads = batch_size, max_len, num_kv_heads
        self.device = self.k[0].device
        if pad_lengths is None:
            pad_lengths = torch.zeros(batch_size, dtype=torch.long)
        pad_lengths = torch.as_tensor(pad_lengths, dtype=torch.long).to(self.device)
        if tuple(pad_lengths.shape) != (batch_size,):
            raise ValueError(f"pad_lengths must have shape [{batch_size}], got {tuple(pad_lengths.shape)}")
        self.pad_lengths = pad_lengths
        self.padded = bool((pad_lengths > 0).any())
        self.attention_backend, self.all_logits = attention_backend, all_logits
        self.length = 0  # slots filled (the same for every row: padding is on the left)
        self._step: int | None = None
        self._mask: torch.Tensor | None = None
        self._segments: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, pad_lengths: torch.Tensor | None = None, *,
                  all_logits: bool = False) -> "KVCache":
        """A cache shaped for ``model`` (a megaocto BigCodeModel / GLM2Model) on this TP rank, using the model's
        attention backend (``model.ops.attention_backend``, from ``model.kernels``) for the prefill."""
        attn = model.layers[0].self_attention
        param = next(model.parameters())
        return cls(num_layers=len(model.layers), batch_size=batch_size, num_kv_heads=attn.local_groups,
                   head_dim=attn.head_dim, max_len=max_len, dtype=param.dtype, device=param.device,
                   pad_lengths=pad_lengths, attention_backend=model.ops.attention_backend, all_logits=all_logits)

    # ------------------------------------------------------------------ step protocol
    def begin(self, s: int) -> None:
        """Start a step of ``s`` new tokens per row: check capacity and build the attention mask."""
        if self._step is not None:
            raise RuntimeError("KVCache.begin called twice without commit (a model forward failed mid-step?)")
        if s < 1:
            raise ValueError(f"a cached step needs at least one token per row (got {s})")
        if self.length + s > self.max_len:
            raise ValueError(f"KVCache is full: {self.length} slots used + {s} new > max_len {self.max_len}; "
                             f"allocate the cache with max_len >= prompt length + max_new_tokens")
        self._step = s
        total = self.length + s
        t = torch.arange(self.length, total, device=self.device)[:, None]  # query slots [s, 1]
        j = torch.arange(total, device=self.device)[None, :]  # key slots [1, total]
        if self.length == 0:
            # prefill of an empty cache: the seam's segment attention (padding = segment 0) is exactly our rule
            self._mask = None
            self._segments = ((j >= self.pad_lengths[:, None]).long()) if self.padded else None
        elif s == 1 and not self.padded:
            self._mask = None  # one query at the newest slot sees every cached slot
            self._segments = None
        else:
            pad = self.pad_lengths[:, None, None, None]  # [b, 1, 1, 1]
            real = j[None, None] >= pad
            self._mask = (j <= t)[None, None] & (real | (j == t)[None, None])  # [b, 1, s, total]
            self._segments = None

    def position_ids(self) -> torch.Tensor:
        """Positions ``[b, s]`` of this step's tokens: slot index minus the row's left padding (padding: 0)."""
        s = self._require_step()
        slots = torch.arange(self.length, self.length + s, device=self.device)[None, :]
        return (slots - self.pad_lengths[:, None]).clamp(min=0)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final hidden states ``[b, s, h]`` of a cached step that the model feeds to its final norm and LM
        head: the last position only (``[b, 1, h]``; generation needs nothing else) unless ``all_logits``."""
        return hidden if self.all_logits else hidden[:, -1:]

    def layer(self, index: int) -> "LayerKVCache":
        """The view of layer ``index`` that the attention module calls ``attend`` on."""
        return LayerKVCache(self, index)

    def commit(self) -> None:
        """End the step: its ``s`` slots become part of the cache."""
        self.length += self._require_step()
        self._step, self._mask, self._segments = None, None, None

    def _require_step(self) -> int:
        if self._step is None:
            raise RuntimeError("KVCache.begin(s) must be called before the layers run (the model forward does it)")
        return self._step

    # ------------------------------------------------------------------ attention over the cache
    def attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float | None = None) -> torch.Tensor:
        """Store this step's ``k, v`` ``[b, kv_heads, s, d]`` in layer ``index`` and attend ``q`` ``[b, hq, s, d]``
        over every filled slot; returns ``[b, hq, s, d]``."""
        s = self._require_step()
        b, hq, sq, d = q.shape
        if sq != s or tuple(k.shape) != (self.batch_size, self.num_kv_heads, s, d) or k.shape != v.shape:
            raise ValueError(f"KVCache layer {index}: expected q [b, hq, {s}, d] and k, v "
                             f"[{self.batch_size}, {self.num_kv_heads}, {s}, d]; got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        total = self.length + s
        self.k[index][:, :, self.length:total] = k
        self.v[index][:, :, self.length:total] = v
        if self.length == 0:
            return seam_attention(q, k, v, causal=True, segment_ids=self._segments, scale=scale,
                                  backend=self.attention_backend)
        keys, values = self.k[index][:, :, :total], self.v[index][:, :, :total]
        hkv = keys.shape[1]
        group = hq // hkv
        if s == 1:
            # [b, hq, 1, d] -> [b, hkv, group, d]: each K/V head serves its group of query heads as query rows
            out = F.scaled_dot_product_attention(q.reshape(b, hkv, group, d), keys, values, attn_mask=self._mask,
                                                 scale=scale)
            return out.reshape(b, hq, 1, d)
        if group > 1:  # a multi-token continuation (not used by generate): expand K/V for this call only
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask, scale=scale)


class LayerKVCache:
    """One layer's handle on a :class:`KVCache` (what the attention module receives as ``kv_cache``)."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
        """See :meth:`KVCache.attend`."""
        return self.cache.attend(self.index, q, k, v, scale=scale)

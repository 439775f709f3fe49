"""Next-token choice from full-vocabulary logits: greedy, temperature, top-k, top-p (nucleus).

Every TP rank calls :func:`sample_next` on the same full logits (gathered over TP by
:func:`full_vocab_logits`) with a ``torch.Generator`` seeded identically, so every rank picks the same tokens
without further communication. All math is fp32.
"""
from __future__ import annotations

import torch

from megaocto.parallel.mappings import gather_from_tp


def full_vocab_logits(logits: torch.Tensor, pc, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel logits ``[..., V_pad/tp]`` -> fp32 ``[..., vocab_size]`` (all-gathered over TP, padded vocab
    columns dropped). Collective over the TP group; the result is bit-identical on every TP rank."""
    full = gather_from_tp(logits.contiguous(), pc, dim=-1) if pc.tp > 1 else logits
    if full.shape[-1] < vocab_size:
        raise ValueError(f"logits have {full.shape[-1]} vocabulary columns, fewer than vocab_size={vocab_size}")
    return full[..., :vocab_size].float()


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k / nucleus to -inf (``[b, V]`` fp32; a new tensor).

    ``top_k`` keeps exactly the k largest (0 = off; ties broken towards the lowest id, as ``argmax``, so ``top_k=1``
    keeps the greedy token only). ``top_p`` keeps the smallest set of most probable tokens whose
    probability mass reaches ``top_p`` (the most probable token — the lowest id among ties — is always kept;
    1.0 = off). Top-k is applied
    first, then top-p on the renormalised remainder (as HF's warpers).
    """
    out = logits.clone()
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        # exactly k kept; among equal logits the lowest ids win (stable sort), as argmax: top_k=1 is greedy
        order = torch.sort(out, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(out, dtype=torch.bool).scatter(-1, order[..., :top_k], True)
        out = out.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids ``[b]`` (int64) from fp32 logits ``[b, V]``.

    ``temperature == 0`` is greedy (argmax; the lowest id among exact ties). Otherwise the logits are divided
    by ``temperature``, filtered by :func:`filter_logits` and sampled with ``torch.multinomial`` from
    ``generator`` (on the logits' device).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    filtered = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

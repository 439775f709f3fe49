"""Batched autoregressive generation on (tensor-parallel) megaocto models.

``generate(model, prompts, gen, pc)`` decodes token-id prompts; ``generate_text(model, tokenizer, prompts, gen)``
encodes text prompts, applies text stop strings and decodes. Contract (docs/design.md, generation/):

* Prompts of unequal length are left-padded into one batch (``batch_size`` rows at a time); the model gets each
  row's true positions (learned or rotary) and padding is masked, so a row decodes exactly as it would alone.
* With ``use_cache=True`` (default) a :class:`~megaocto.generation.kv_cache.KVCache` holds K/V per layer: one
  prefill forward over the prompts, then one single-token forward per new token. ``use_cache=False`` reruns the
  whole sequence every step (the reference; same tokens).
* Every TP rank must call these functions with the same prompts and config (collective over TP). The logits are
  all-gathered over TP (padded vocab columns dropped) and the next token is chosen on every rank from those
  identical logits with a ``torch.Generator`` seeded with ``gen.seed`` — every rank produces the same tokens.
* Sequence parallelism is switched off on ``pc`` for the duration of the call (a decode step has one token per
  row, which cannot be split over TP) and restored afterwards; the weights are the same either way. The model is
  put in eval mode (no dropout) and restored; no gradients are recorded.
* Returned tokens are the new tokens only, cut before the first ``eos_id`` or token stop sequence. With
  ``num_samples = n`` each prompt is repeated n times, outputs in prompt-major order
  (``[p0s0, p0s1, ..., p1s0, ...]``).
* bigcode's learned position table bounds the length: new tokens stop when the longest prompt of the batch plus
  the new tokens reaches ``max_position_embeddings`` (a prompt longer than that is an error).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import torch

from megaocto.generation.kv_cache import KVCache
from megaocto.generation.sampling import full_vocab_logits, sample_next

StopFn = Callable[[int, list[int]], bool]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to decode.

    Attributes:
        max_new_tokens: most tokens generated per row.
        temperature: 0 = greedy; otherwise softmax temperature.
        top_p: nucleus mass kept (1.0 = off).
        top_k: most probable tokens kept (0 = off).
        seed: seed of the sampling generator (the same on every TP rank).
        stop: stop sequences. Strings are applied on decoded text by :func:`generate_text` (the output is cut at
            the earliest occurrence, the stop string excluded); tuples of token ids are applied by
            :func:`generate` on tokens (cut before the sequence).
        eos_id: end-of-sequence token id (cut before it); None = none (``generate_text`` uses the tokenizer's
            ``eod`` then).
        num_samples: completions per prompt.
    """
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple = ()
    eos_id: int | None = None
    num_samples: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, 0 = greedy (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, 0 = off (got {self.top_k})")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (got {self.num_samples})")
        if isinstance(self.stop, (str, bytes)):
            raise ValueError(f"stop must be a sequence of stop strings / token-id tuples, not one string "
                             f"({self.stop!r}): write stop=({self.stop!r},)")
        for s in self.stop:
            if isinstance(s, str) and s == "" or not isinstance(s, str) and len(tuple(s)) == 0:
                raise ValueError("stop sequences must not be empty")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop if isinstance(s, str))

    @property
    def stop_token_sequences(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(t) for t in s) for s in self.stop if not isinstance(s, str))


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def inference_mode_for(model, pc):
    """Eval mode, no grad, sequence parallelism off on ``pc``; all restored on exit."""
    was_training, was_sp = model.training, pc.sequence_parallel
    model.eval()
    pc.sequence_parallel = False
    try:
        with torch.no_grad():
            yield
    finally:
        pc.sequence_parallel = was_sp
        model.train(was_training)


def _position_limit(model) -> int | None:
    """Most positions a row may use (bigcode's learned table), or None (rotary: unbounded)."""
    cfg = model.cfg
    return cfg.max_positions if cfg.family == "bigcode" else None


def _ends_with(tokens: list[int], seq: tuple[int, ...]) -> bool:
    return len(tokens) >= len(seq) and tuple(tokens[-len(seq):]) == seq


def _cut(tokens: list[int], eos_id: int | None, stops: Sequence[tuple[int, ...]]) -> list[int]:
    """``tokens`` up to (excluding) the first ``eos_id`` or the earliest start of a token stop sequence."""
    end = len(tokens)
    if eos_id is not None and eos_id in tokens:
        end = tokens.index(eos_id)
    for seq in stops:
        n = len(seq)
        for i in range(0, end - n + 1):
            if tuple(tokens[i:i + n]) == seq:
                end = i
                break
    return tokens[:end]


# ---------------------------------------------------------------------------------------------- generate
def generate(model, prompts: Sequence[Sequence[int]], gen: GenerationConfig, pc=None, *, use_cache: bool = True,
             batch_size: int | None = None, stop_fn: StopFn | None = None) -> list[list[int]]:
    """New tokens for every prompt (× ``gen.num_samples``), identical on every TP rank; see the module doc.

    Args:
        model: a megaocto BigCodeModel / GLM2Model (from ``build_model`` or :func:`load_checkpoint_model`).
        prompts: token-id lists, each non-empty, ids in ``[0, model.cfg.vocab_size)``.
        gen: the decoding settings; string stops are ignored here (see :func:`generate_text`).
        pc: the model's ParallelContext (default ``model.pc``).
        use_cache: decode with a KV cache (default) or rerun the full sequence each step.
        batch_size: rows decoded together (default: all rows in one batch).
        stop_fn: ``stop_fn(row, new_tokens) -> bool`` called after each new token of an unfinished row (``row``
            indexes the returned list); True finishes that row. Must give the same answer on every TP rank.
    """
    pc = model.pc if pc is None else pc
    rows = [[int(t) for t in p] for p in prompts for _ in range(gen.num_samples)]
    if any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token (an empty prompt has no next-token "
                         "distribution; start it with the tokenizer's BOS/EOD token)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    step = batch_size or max(len(rows), 1)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(gen.seed)
    out: list[list[int]] = []
    with inference_mode_for(model, pc):
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            row_stop = None if stop_fn is None else (lambda i, toks, _o=start: stop_fn(_o + i, toks))
            out.extend(_generate_batch(model, pc, chunk, gen, generator, device, use_cache, row_stop))
    return out


def _generate_batch(model, pc, rows: list[list[int]], gen: GenerationConfig, generator: torch.Generator,
                    device, use_cache: bool, stop_fn) -> list[list[int]]:
    b = len(rows)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    longest = int(lengths.max())
    max_new = gen.max_new_tokens
    limit = _position_limit(model)
    if limit is not None:
        if longest > limit:
            raise ValueError(f"a prompt has {longest} tokens, more than max_position_embeddings={limit} of the "
                             f"model; shorten the prompt")
        max_new = min(max_new, limit - longest)
    if max_new == 0:
        return [[] for _ in rows]
    pad = longest - lengths
    ids = torch.zeros(b, longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = torch.tensor(r, dtype=torch.long)
    ids, pad = ids.to(device), pad.to(device)
    vocab = model.cfg.vocab_size
    stops = gen.stop_token_sequences

    segments = None
    if use_cache:
        cache = KVCache.for_model(model, b, longest + max_new, pad_lengths=pad)
        logits = model(ids, kv_cache=cache)[:, -1]
    else:
        if bool((pad > 0).any()):  # padding = segment 0, prompt = segment 1: positions restart at the prompt
            segments = (torch.arange(longest, device=device)[None, :] >= pad[:, None]).long()
        logits = model(ids, segment_ids=segments)[:, -1]

    new: list[list[int]] = [[] for _ in rows]
    done = [False] * b
    for step in range(max_new):
        tokens = sample_next(full_vocab_logits(logits, pc, vocab), temperature=gen.temperature, top_k=gen.top_k,
                             top_p=gen.top_p, generator=generator)
        for i, t in enumerate(tokens.tolist()):
            if done[i]:
                continue
            new[i].append(t)
            if (t == gen.eos_id or any(_ends_with(new[i], s) for s in stops)
                    or (stop_fn is not None and stop_fn(i, new[i]))):
                done[i] = True
        if all(done) or step == max_new - 1:
            break
        feed = tokens.to(device)[:, None]
        if use_cache:
            logits = model(feed, kv_cache=cache)[:, -1]
        else:
            ids = torch.cat([ids, feed], dim=1)
            if segments is not None:
                segments = torch.cat([segments, torch.ones_like(feed)], dim=1)
            logits = model(ids, segment_ids=segments)[:, -1]
    return [_cut(r, gen.eos_id, stops) for r in new]


# ---------------------------------------------------------------------------------------------- text
def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` cut at the earliest occurrence of any stop string (the stop excluded)."""
    end = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            end = min(end, i)
    return text[:end]


def generate_text(model, tokenizer, prompts: Sequence[str], gen: GenerationConfig, pc=None, *,
                  use_cache: bool = True, batch_size: int | None = None) -> list[str]:
    """Completions (text after the prompt) for text prompts, × ``gen.num_samples`` in prompt-major order.

    Prompts are encoded with ``tokenizer.encode`` (no special tokens added; an empty prompt becomes
    ``[tokenizer.eod]``); ``eos_id`` defaults to ``tokenizer.eod``. A row stops as soon as its decoded text
    contains a stop string, and the text is cut at the earliest stop. Collective over TP like :func:`generate`.
    """
    encoded = [tokenizer.encode(p) or [tokenizer.eod] for p in prompts]
    if gen.eos_id is None:
        gen = dataclasses.replace(gen, eos_id=tokenizer.eod)
    strings = gen.stop_strings

    def stop_fn(_row: int, toks: list[int]) -> bool:
        if not strings:
            return False
        text = tokenizer.decode(toks)
        return any(s in text for s in strings)

    tokens = generate(model, encoded, gen, pc, use_cache=use_cache, batch_size=batch_size,
                      stop_fn=stop_fn if strings else None)
    return [truncate_at_stop(tokenizer.decode(t), strings) for t in tokens]

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
* bigcode's learned position table bounds each row: a row stops when its own prompt plus its new tokens reach
  ``max_position_embeddings`` (a prompt longer than that is an error); other rows of the batch go on.
* Rows are sorted by prompt length before batching (output order unchanged); greedy decoding decodes each prompt
  once and repeats it ``num_samples`` times.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import torch

from megaocto.data.tokenizer import encode_prompt
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


def position_limit(model) -> int | None:
    """Most positions a row may use (bigcode's learned table), or None (rotary: unbounded)."""
    cfg = model.cfg
    return cfg.max_positions if cfg.family == "bigcode" else None


_position_limit = position_limit


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
             batch_size: int | None = None, stop_fn: StopFn | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New tokens for every prompt (× ``gen.num_samples``), identical on every TP rank; see the module doc.

    Rows are decoded in batches of ``batch_size`` after sorting them by prompt length (less padding; the output
    order is the input order). Greedy decoding (``temperature == 0``) decodes each prompt once and repeats the
    result ``num_samples`` times.

    Args:
        model: a megaocto BigCodeModel / GLM2Model (from ``build_model`` or :func:`load_checkpoint_model`).
        prompts: token-id lists, each non-empty, ids in ``[0, model.cfg.vocab_size)``.
        gen: the decoding settings; string stops are ignored here (see :func:`generate_text`).
        pc: the model's ParallelContext (default ``model.pc``).
        use_cache: decode with a KV cache (default) or rerun the full sequence each step.
        batch_size: rows decoded together (default: all rows in one batch).
        stop_fn: ``stop_fn(row, new_tokens) -> bool`` called after each new token of an unfinished row (``row``
            indexes the returned list; under greedy decoding it is the prompt's first sample,
            ``prompt_index * num_samples``); True finishes that row. Must give the same answer on every TP rank.
        progress: ``progress(done, total)`` after each batch, counting returned rows (prompts × num_samples).
    """
    pc = model.pc if pc is None else pc
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (an empty prompt has no next-token "
                         "distribution; start it with the tokenizer's BOS/EOD token)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    n = gen.num_samples
    repeats = n if gen.temperature == 0.0 else 1  # greedy: the n samples of a prompt are identical
    per_prompt = n // repeats
    rows = [[int(t) for t in p] for p in prompts for _ in range(per_prompt)]
    # the returned-list index of each decoded row (its first copy under greedy decoding)
    out_index = [i * n + j for i in range(len(prompts)) for j in range(per_prompt)]
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))  # stable: samples of a prompt stay adjacent
    step = batch_size or max(len(rows), 1)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(gen.seed)
    decoded: list[list[int] | None] = [None] * len(rows)
    with inference_mode_for(model, pc):
        for start in range(0, len(rows), step):
            members = order[start:start + step]
            row_stop = None if stop_fn is None else (
                lambda i, toks, _m=members: stop_fn(out_index[_m[i]], toks))
            chunk_out = _generate_batch(model, pc, [rows[r] for r in members], gen, generator, device, use_cache,
                                        row_stop)
            for r, toks in zip(members, chunk_out):
                decoded[r] = toks
            if progress is not None:
                progress(min(start + step, len(rows)) * repeats, len(rows) * repeats)
    return [list(t) for t in decoded for _ in range(repeats)]


def _generate_batch(model, pc, rows: list[list[int]], gen: GenerationConfig, generator: torch.Generator,
                    device, use_cache: bool, stop_fn) -> list[list[int]]:
    """New tokens of ``rows`` decoded together; each row stops at eos / a stop / ``max_new_tokens`` / its own
    position limit (bigcode: ``max_position_embeddings - len(prompt)``).

    The cache of one pass holds ``longest prompt + steps`` slots, which the learned position table bounds; rows
    whose own limit lies beyond the pass's end are continued by another pass over ``prompt + new tokens so far``
    (the longest rows of a pass always finish it, so this terminates)."""
    limit = _position_limit(model)
    if limit is not None:
        longest = max(len(r) for r in rows)
        if longest > limit:
            raise ValueError(f"a prompt has {longest} tokens, more than max_position_embeddings={limit} of the "
                             f"model; shorten the prompt")
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    while True:
        budget: dict[int, int] = {}
        for i, r in enumerate(rows):
            room = gen.max_new_tokens - len(new[i])
            if limit is not None:
                room = min(room, limit - len(r) - len(new[i]))
            if not done[i] and room > 0:
                budget[i] = room
        if not budget:
            break
        active = sorted(budget)
        pass_stop = None if stop_fn is None else (lambda k, toks, _a=active: stop_fn(_a[k], toks))
        stopped = _decode_pass(model, pc, [rows[i] + new[i] for i in active], [new[i] for i in active],
                               [budget[i] for i in active], gen, generator, device, use_cache, pass_stop, limit)
        for k, i in enumerate(active):
            done[i] = stopped[k]
    return [_cut(r, gen.eos_id, gen.stop_token_sequences) for r in new]


def _decode_pass(model, pc, contexts: list[list[int]], news: list[list[int]], budgets: list[int],
                 gen: GenerationConfig, generator: torch.Generator, device, use_cache: bool, stop_fn,
                 limit: int | None) -> list[bool]:
    """One batched decode over ``contexts`` (prompt + tokens so far): appends to ``news[k]`` (the row's new tokens
    so far, what stops are checked on) until the row stops or has ``budgets[k]`` more tokens, for at most
    ``limit - longest context`` steps. Returns whether each row stopped (eos, token stop, ``stop_fn``)."""
    b = len(contexts)
    lengths = torch.tensor([len(r) for r in contexts], dtype=torch.long)
    longest = int(lengths.max())
    steps = max(budgets) if limit is None else min(max(budgets), limit - longest)
    pad = longest - lengths
    ids = torch.zeros(b, longest, dtype=torch.long)
    for i, r in enumerate(contexts):
        ids[i, longest - len(r):] = torch.tensor(r, dtype=torch.long)
    ids, pad = ids.to(device), pad.to(device)
    vocab = model.cfg.vocab_size
    stops = gen.stop_token_sequences

    segments = None
    if use_cache:
        cache = KVCache.for_model(model, b, longest + steps, pad_lengths=pad)
        logits = model(ids, kv_cache=cache)[:, -1]
    else:
        if bool((pad > 0).any()):  # padding = segment 0, prompt = segment 1: positions restart at the prompt
            segments = (torch.arange(longest, device=device)[None, :] >= pad[:, None]).long()
        logits = model(ids, segment_ids=segments)[:, -1]

    added = [0] * b
    stopped = [False] * b
    done = [False] * b
    for step in range(steps):
        tokens = sample_next(full_vocab_logits(logits, pc, vocab), temperature=gen.temperature, top_k=gen.top_k,
                             top_p=gen.top_p, generator=generator)
        for i, t in enumerate(tokens.tolist()):
            if done[i]:
                continue
            news[i].append(t)
            added[i] += 1
            if (t == gen.eos_id or any(_ends_with(news[i], s) for s in stops)
                    or (stop_fn is not None and stop_fn(i, news[i]))):
                stopped[i] = done[i] = True
            elif added[i] >= budgets[i]:
                done[i] = True
        if all(done) or step == steps - 1:
            break
        feed = tokens.to(device)[:, None]
        if use_cache:
            logits = model(feed, kv_cache=cache)[:, -1]
        else:
            ids = torch.cat([ids, feed], dim=1)
            if segments is not None:
                segments = torch.cat([segments, torch.ones_like(feed)], dim=1)
            logits = model(ids, segment_ids=segments)[:, -1]
    return stopped


# ---------------------------------------------------------------------------------------------- text
def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` cut at the earliest occurrence of any stop string (the stop excluded)."""
    end = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            end = min(end, i)
    return text[:end]


def completion_text(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text ``new_ids`` add after ``prompt_ids``: ``decode(prompt + new)`` minus ``decode(prompt)``.

    Decoding the new tokens alone is wrong for sentencepiece (it drops the "▁" space of the first piece, as at the
    start of any text) and for byte-level pieces that complete a character; bigcode-evaluation-harness decodes the
    whole sequence and strips the prompt the same way. Only the last ``_CONTEXT_TOKENS`` prompt tokens are decoded
    (cost independent of the prompt length) unless that does not reproduce a prefix, then the whole prompt; if
    even that fails (a tokenizer that normalises the prompt text) the new tokens are decoded alone.
    """
    new_ids = list(new_ids)
    if not new_ids:
        return ""
    prompt_ids = list(prompt_ids)
    tails = [prompt_ids[-_CONTEXT_TOKENS:]] + ([prompt_ids] if len(prompt_ids) > _CONTEXT_TOKENS else [])
    for ctx in tails:
        head, whole = tokenizer.decode(ctx), tokenizer.decode(ctx + new_ids)
        if whole.startswith(head):
            return whole[len(head):]
    return tokenizer.decode(new_ids)


_CONTEXT_TOKENS = 16


def generate_text(model, tokenizer, prompts: Sequence[str], gen: GenerationConfig, pc=None, *,
                  use_cache: bool = True, batch_size: int | None = None,
                  max_prompt_tokens: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Completions (text after the prompt) for text prompts, × ``gen.num_samples`` in prompt-major order.

    Prompts are encoded with :func:`megaocto.data.tokenizer.encode_prompt`: ``tokenizer.encode`` plus ``bos`` in
    front when ``tokenizer.add_bos`` (Llama family), no other special tokens; an empty prompt becomes ``[bos]`` or
    ``[tokenizer.eod]``; ``max_prompt_tokens`` keeps only the last that many tokens of a longer prompt (BOS kept).
    ``eos_id`` defaults to ``tokenizer.eod``. A completion is the text the new tokens add after the prompt
    (:func:`completion_text`, so a sentencepiece leading space is kept). A row stops as soon as its completion
    contains a stop string, and the text is cut at the earliest stop. Collective over TP like :func:`generate`.
    ``progress(done, total)`` is called after each batch (see :func:`generate`).
    """
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 (got {max_prompt_tokens})")
    encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    if gen.eos_id is None:
        gen = dataclasses.replace(gen, eos_id=tokenizer.eod)
    strings = gen.stop_strings
    n = gen.num_samples

    def stop_fn(row: int, toks: list[int]) -> bool:
        text = completion_text(tokenizer, encoded[row // n], toks)
        return any(s in text for s in strings)

    tokens = generate(model, encoded, gen, pc, use_cache=use_cache, batch_size=batch_size,
                      stop_fn=stop_fn if strings else None, progress=progress)
    return [truncate_at_stop(completion_text(tokenizer, encoded[k // n], t), strings) for k, t in enumerate(tokens)]


def next_token_logits(model, prompts: Sequence[Sequence[int]], pc=None, *, batch_size: int | None = None
                      ) -> torch.Tensor:
    """Full-vocabulary fp32 logits ``[len(prompts), vocab_size]`` of the token after each prompt (one batched,
    left-padded prefill per ``batch_size`` prompts, sorted by length; rows returned in input order). Collective over
    TP like :func:`generate`; the result is identical on every TP rank. Used for scoring (e.g. LM-score of a
    Yes/No answer) without decoding."""
    pc = model.pc if pc is None else pc
    if any(len(p) == 0 for p in prompts):
        raise ValueError("next_token_logits: every prompt needs at least one token")
    limit = position_limit(model)
    if limit is not None and prompts and max(len(p) for p in prompts) > limit:
        raise ValueError(f"a prompt has {max(len(p) for p in prompts)} tokens, more than max_position_embeddings="
                         f"{limit} of the model; shorten the prompt")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    step = batch_size or max(len(prompts), 1)
    out = torch.empty(len(prompts), model.cfg.vocab_size, dtype=torch.float32)
    with inference_mode_for(model, pc):
        for start in range(0, len(order), step):
            members = order[start:start + step]
            rows = [list(prompts[i]) for i in members]
            longest = max(len(r) for r in rows)
            pad = torch.tensor([longest - len(r) for r in rows], dtype=torch.long)
            ids = torch.zeros(len(rows), longest, dtype=torch.long)
            for k, r in enumerate(rows):
                ids[k, longest - len(r):] = torch.tensor(r, dtype=torch.long)
            cache = KVCache.for_model(model, len(rows), longest, pad_lengths=pad.to(device))
            logits = model(ids.to(device), kv_cache=cache)[:, -1]
            out[members] = full_vocab_logits(logits, pc, model.cfg.vocab_size).cpu()
    return out

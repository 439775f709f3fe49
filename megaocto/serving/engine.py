"""Batched decoding with per-row settings over one shared KV cache (what ``megaocto serve`` runs).

``Engine(model, tokenizer, pc).run(rows, on_event)`` decodes a batch of :class:`RowRequest` together: one
left-padded prefill, then one single-token forward per step for every row at once (the model's ``kv_cache``
contract of megaocto.generation, so every model family with that contract plugs in). Unlike
:func:`megaocto.generation.generate`, each row has its own ``max_new_tokens``, temperature, top-p/top-k, seed,
repetition penalty, stop strings and logprobs request, because each row is a different client's request.

Rules:
* A row stops at its EOS token, at a stop string (text cut before it, ``finish_reason = "stop"``) or after
  ``max_new_tokens`` (``"length"``). Finished rows stay in the batch (their tokens are ignored) until all finish.
* Sampling per row: repetition penalty (HF/CTRL rule: a positive logit of an already seen token — prompt or
  generated — is divided by the penalty, a negative one multiplied), then greedy (temperature 0) or
  temperature → top-k → top-p → multinomial from the row's own ``torch.Generator`` seeded with ``seed``. The same
  request with the same seed gives the same tokens whatever else is in the batch.
* Logprobs are log-softmax of the model's raw full-vocabulary logits (before penalty/temperature), as vLLM.
* Collective over TP: every rank runs ``run`` with the same rows (including seeds) and gets the same tokens.
* Streaming: ``on_event(row, Event)`` is called after every step for rows that produced text; a suffix that
  could be the start of a stop string (or an incomplete UTF-8 character) is held back until it is resolved, so
  the streamed text always equals the final text.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from megaocto.generation import KVCache, completion_text, filter_logits, full_vocab_logits
from megaocto.generation.generate import inference_mode_for


@dataclasses.dataclass
class RowRequest:
    """One completion to decode.

    Attributes:
        prompt: token ids (non-empty).
        max_new_tokens: most new tokens (>= 1).
        temperature: 0 = greedy.
        top_p: nucleus mass kept (1 = off).
        top_k: most probable tokens kept (0 = off).
        seed: seed of this row's sampling generator (must be the same on every TP rank).
        repetition_penalty: 1 = off; > 1 discourages tokens already in the prompt or the output.
        stop: stop strings (the text is cut before the earliest).
        eos_id: end-of-sequence id (None = none).
        logprobs: None = no logprobs; k >= 0 = the chosen token's logprob plus the k most likely alternatives.
    """
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    eos_id: int | None = None
    logprobs: int | None = None


@dataclasses.dataclass
class TokenLogprob:
    """A generated token with its logprob and the top alternatives ``[(token id, logprob), ...]``."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Event:
    """Streamed progress of one row: new text (may be empty), the tokens it covers, and the finish reason
    (``"stop"``/``"length"``) on the row's last event, else None."""
    text: str
    tokens: list[TokenLogprob]
    finish_reason: str | None


@dataclasses.dataclass
class RowResult:
    """A finished row: its text (stop strings cut), its tokens (after the cut), why it finished."""
    text: str
    tokens: list[TokenLogprob]
    finish_reason: str


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` ``[V]`` with the CTRL/HF repetition penalty applied to the token ids in ``seen`` (a new tensor)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    out = logits.clone()
    picked = out[seen]
    out[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` must wait: the longest suffix that is a proper prefix of a stop
    string, or a trailing U+FFFD (a byte-level token that has not completed its character yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


class _Row:
    def __init__(self, req: RowRequest, device):
        self.req = req
        self.new: list[int] = []
        self.infos: list[TokenLogprob] = []
        self.emitted_text = ""
        self.emitted_tokens = 0
        self.finish: str | None = None
        self.text = ""
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(req.seed) % (2 ** 63))
        self.seen = torch.tensor(sorted(set(req.prompt)), dtype=torch.long, device=device)


class Engine:
    """Decodes batches of :class:`RowRequest` on one model (see the module doc)."""

    def __init__(self, model, tokenizer, pc=None):
        self.model, self.tokenizer = model, tokenizer
        self.pc = model.pc if pc is None else pc
        self.vocab = model.cfg.vocab_size
        self.device = next(model.parameters()).device

    def run(self, requests: Sequence[RowRequest],
            on_event: Callable[[int, Event], None] | None = None) -> list[RowResult]:
        if not requests:
            return []
        for r in requests:
            if not r.prompt:
                raise ValueError("every row needs a non-empty prompt")
            if r.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1 (got {r.max_new_tokens})")
        rows = [_Row(r, self.device) for r in requests]
        b = len(rows)
        longest = max(len(r.prompt) for r in requests)
        steps = max(r.max_new_tokens for r in requests)
        pad = torch.tensor([longest - len(r.prompt) for r in requests], dtype=torch.long)
        ids = torch.zeros(b, longest, dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, longest - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        with inference_mode_for(self.model, self.pc):
            cache = KVCache.for_model(self.model, b, longest + steps, pad_lengths=pad.to(self.device))
            logits = self.model(ids.to(self.device), kv_cache=cache)[:, -1]
            for step in range(steps):
                full = full_vocab_logits(logits, self.pc, self.vocab)
                tokens = [self._choose(row, full[i]) for i, row in enumerate(rows)]
                for i, (row, tok) in enumerate(zip(rows, tokens)):
                    if row.finish is None:
                        self._advance(row, tok, full[i])
                        if on_event is not None:
                            self._emit(i, row, on_event)
                if all(row.finish is not None for row in rows) or step == steps - 1:
                    break
                feed = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
                logits = self.model(feed, kv_cache=cache)[:, -1]
        return [RowResult(row.text, row.infos, row.finish or "length") for row in rows]

    # ------------------------------------------------------------------ per row
    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        if row.finish is not None:
            return 0  # fed to the model but never used
        req = row.req
        seen = row.seen if not row.new else torch.cat([row.seen, torch.tensor(row.new, device=self.device)])
        scores = apply_repetition_penalty(logits, seen, req.repetition_penalty)
        if req.temperature == 0.0:
            return int(torch.argmax(scores))
        filtered = filter_logits((scores / req.temperature)[None], top_k=req.top_k, top_p=req.top_p)
        probs = torch.softmax(filtered, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int, logits: torch.Tensor) -> None:
        req = row.req
        info = TokenLogprob(token, 0.0, [])
        if req.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            info.logprob = float(logp[token])
            if req.logprobs > 0:
                values, idx = torch.topk(logp, min(req.logprobs, logp.numel()))
                info.top = [(int(i), float(v)) for i, v in zip(idx.tolist(), values.tolist())]
        if req.eos_id is not None and token == req.eos_id:
            row.finish = "stop"
            row.text = completion_text(self.tokenizer, req.prompt, row.new)
            return
        row.new.append(token)
        row.infos.append(info)
        text = completion_text(self.tokenizer, req.prompt, row.new)
        cut = _earliest_stop(text, req.stop)
        if cut is not None:
            row.finish, row.text = "stop", text[:cut]
            # keep only the tokens whose text lies before the cut
            while row.infos and len(completion_text(self.tokenizer, req.prompt, row.new[:len(row.infos) - 1])) >= cut:
                row.infos.pop()
            return
        row.text = text
        if len(row.new) >= req.max_new_tokens:
            row.finish = "length"

    def _emit(self, i: int, row: _Row, on_event) -> None:
        if row.finish is None:
            safe = row.text[:len(row.text) - _held_back(row.text, row.req.stop)]
        else:
            safe = row.text
        if not safe.startswith(row.emitted_text):  # a decode that rewrote earlier text (rare): wait for the end
            if row.finish is None:
                return
            safe = row.text
        delta = safe[len(row.emitted_text):]
        toks = row.infos[row.emitted_tokens:] if (delta or row.finish) else []
        if not delta and row.finish is None:
            return
        row.emitted_text = safe if safe.startswith(row.emitted_text) else row.emitted_text + delta
        row.emitted_tokens += len(toks)
        on_event(i, Event(delta, toks, row.finish))


def _earliest_stop(text: str, stops: Sequence[str]) -> int | None:
    best = None
    for s in stops:
        k = text.find(s)
        if k != -1 and (best is None or k < best):
            best = k
    return best

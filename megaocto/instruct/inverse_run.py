"""Running the Inverse-Instruct stages at scale: resumable, ``--shard K/N`` (by code index), on a megaocto model
in-process (batched; under torchrun every TP rank decodes and rank 0 writes) or on an OpenAI-compatible endpoint.

Row keys: extract writes ``{index (= input row), instruction (original), response (code)}``; summarize writes
``{index = code_index·K + k, code_index, k, instruction (prefix + generated), response (code), finish_reason}``;
score adds ``score``; select writes ``{index (= code index), instruction, response, score}``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os

from megaocto.instruct import inverse as inv
from megaocto.instruct.io import read_jsonl
from megaocto.instruct.resumable import (ResumableOutput, fingerprint, in_shard, read_rows, rejected_path, run_path,
                                         shard_path)
from megaocto.instruct.runner import Progress


# ---------------------------------------------------------------------------------------------- backends
class LocalBackend:
    """A megaocto checkpoint in this process (all TP ranks of a torchrun job construct one)."""

    def __init__(self, load: str, tokenizer: str | None = None, *, tp: int | None = None, dtype: str = "auto",
                 batch_size: int = 32):
        import torch

        from megaocto.config.base import ConfigError
        from megaocto.generation import load_checkpoint_model, load_tokenizer
        from megaocto.generation.loading import checkpoint_metadata
        from megaocto.parallel.context import ParallelContext
        from megaocto.serving.engine import Engine
        from megaocto.serving.server import model_context_length

        meta, iteration = checkpoint_metadata(load)
        self.pc = ParallelContext.init(tp=tp if tp is not None else int(meta.get("tp", 1)))
        tok_path = tokenizer or ((meta.get("config") or {}).get("data") or {}).get("tokenizer")
        if not tok_path:
            raise ConfigError(f"{load}: the checkpoint's config has no data.tokenizer; pass --tokenizer PATH")
        self.tokenizer = load_tokenizer(tok_path)
        dt = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.model, _ = load_checkpoint_model(load, self.pc, dtype=dt, iteration=iteration)
        self.engine = Engine(self.model, self.tokenizer, self.pc)
        self.context = model_context_length(self.model)
        self.batch_size = batch_size
        self.name = f"megaocto:{load}"
        self.writer = self.pc.rank == 0
        self._yes = self._no = None

    def close(self) -> None:
        """Under torchrun: every rank reaches this point, then the process group is torn down before the
        interpreter exits (a gloo group left to interpreter shutdown can abort a rank with std::terminate while its
        peer is still closing the connection)."""
        import torch.distributed as dist

        if self.pc.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def sync(self, obj):
        """rank 0's ``obj`` on every rank (the todo list)."""
        if self.pc.world_size == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def summarize(self, items: list[tuple[str, int]], cfg: inv.InverseConfig) -> list[tuple[str | None, str]]:
        """(prompt text, seed) → (generated text or None when the prompt is too long, finish reason)."""
        from megaocto.serving.engine import RowRequest

        rows, slots = [], []
        out: list[tuple[str | None, str]] = [(None, "too_long")] * len(items)
        for i, (prompt, seed) in enumerate(items):
            ids = self.tokenizer.encode(prompt) or [self.tokenizer.eod]
            room = min(cfg.max_new_tokens, self.context - len(ids))
            if room < 1:
                continue
            rows.append(RowRequest(prompt=ids, max_new_tokens=room, temperature=cfg.temperature, top_p=cfg.top_p,
                                   seed=seed, repetition_penalty=cfg.repetition_penalty, stop=("```",),
                                   eos_id=self.tokenizer.eod))
            slots.append(i)
        for start in range(0, len(rows), self.batch_size):
            results = self.engine.run(rows[start:start + self.batch_size])
            for i, r in zip(slots[start:start + self.batch_size], results):
                out[i] = (r.text, r.finish_reason)
        return out

    def score(self, prompts: list[str]) -> list[float | None]:
        """Native LM-scores (None: the prompt does not fit the model)."""
        from megaocto.generation import next_token_logits

        if self._yes is None:
            self._yes = inv.answer_token_ids(self.tokenizer, "yes")
            self._no = inv.answer_token_ids(self.tokenizer, "no")
        encoded = [self.tokenizer.encode(p) or [self.tokenizer.eod] for p in prompts]
        fits = [i for i, ids in enumerate(encoded) if len(ids) <= self.context]
        out: list[float | None] = [None] * len(prompts)
        if fits:
            logits = next_token_logits(self.model, [encoded[i] for i in fits], self.pc, batch_size=self.batch_size)
            for i, s in zip(fits, inv.lm_scores(logits, self._yes, self._no).tolist()):
                out[i] = s
        return out


class EndpointBackend:
    """An OpenAI-compatible ``/v1/completions`` endpoint (vLLM, ``megaocto serve``, ...)."""

    def __init__(self, teacher_cfg, *, concurrency: int = 8, batch_size: int = 64, compat_tokenizer=None):
        from megaocto.instruct.teacher import Teacher

        self.teacher = Teacher(teacher_cfg, max_connections=max(1, concurrency))
        self.concurrency, self.batch_size = concurrency, batch_size
        self.name = f"endpoint:{teacher_cfg.url}:{teacher_cfg.model}"
        self.writer = True
        self.compat_tokenizer = compat_tokenizer

    def close(self) -> None:
        """Close the teacher's HTTP connection pool."""
        self.teacher.close()

    def sync(self, obj):
        return obj

    def _map(self, fn, items):
        with concurrent.futures.ThreadPoolExecutor(max(1, self.concurrency)) as pool:
            return list(pool.map(fn, items))

    def summarize(self, items, cfg: inv.InverseConfig):
        from megaocto.instruct.teacher import TeacherError

        def one(item):
            prompt, seed = item
            try:
                r = self.teacher.complete(prompt, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                          top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, stop=["```"],
                                          seed=seed, n=1)
            except TeacherError as e:
                if e.status in (400, 413, 422):
                    return None, "refused"
                raise
            choice = r["choices"][0]
            return choice.get("text") or "", choice.get("finish_reason") or "stop"
        return self._map(one, items)

    def score(self, prompts: list[str]) -> list[float | None]:
        """InverseCoder's compat rule: top-5 logprobs of the first generated token (greedy)."""
        yes, no = "Yes", ("No", "As")
        if self.compat_tokenizer is not None:  # the token texts of upstream's ids: tokenizer(word) first token
            tok = self.compat_tokenizer
            yes = tok.decode(tok.encode("Yes")[:1])
            no = tuple(tok.decode(tok.encode(w)[:1]) for w in ("No", "As"))

        def one(prompt):
            r = self.teacher.complete(prompt, max_tokens=1, temperature=0, logprobs=5)
            top = ((r["choices"][0].get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
            return inv.compat_score(top, yes, no)
        return self._map(one, prompts)

    def close(self):
        self.teacher.close()


# ---------------------------------------------------------------------------------------------- stages
def _open(path, stage, settings, shard, writer):
    if not writer:
        return None
    return ResumableOutput(path, fingerprint(stage, settings), settings, shard)


def run_extract(inputs: list[str], output: str, *, shard=(0, 1)) -> dict:
    """Stage 1 over every row of ``inputs`` (keys ``instruction``, ``response``)."""
    path = shard_path(output, shard)
    out = ResumableOutput(path, fingerprint("extract", {"inputs": inputs}), {"inputs": inputs}, shard)
    counts = {"fenced": 0, "python": 0, "no_code": 0}
    index, expected = 0, []
    for src in inputs:
        for row in read_jsonl(src, ("response",)):
            i, index = index, index + 1
            if not in_shard(i, shard):
                continue
            expected.append(i)
            if i in out.done:
                continue
            code, reason = inv.extract_code(inv._redecode(row["response"]))
            counts[reason] += 1
            base = {"index": i, "instruction": inv._redecode(row.get("instruction", ""))}
            if code is None:
                out.write(dict(base, reason=reason, original=row["response"]), kept=False)
            else:
                out.write(dict(base, response=code, extract=reason), kept=True)
    complete = out.close(expected)
    return {"stage": "extract", "output": path, "counts": counts, "resumed": out.resumed_kept + out.resumed_rejected,
            "complete": complete}


def _settings(cfg, backend, extra=()):
    s = dataclasses.asdict(cfg)
    s["model"] = backend.name
    for k in extra:
        s.pop(k, None)
    return s


def _process(backend, out, todo: list, total: int, fn, desc: str, progress: bool) -> dict:
    """Run ``fn(chunk) -> [(kept, row)]`` over ``todo`` in chunks of ``backend.batch_size``; rank 0 writes."""
    counts: dict = {}
    bar = Progress(total, desc, enabled=progress and backend.writer)
    for start in range(0, len(todo), backend.batch_size):
        for kept, row in fn(todo[start:start + backend.batch_size]):
            key = "ok" if kept else row["reason"]
            counts[key] = counts.get(key, 0) + 1
            if out is not None:
                out.write(row, kept=kept)
            bar.update(counts)
    bar.close()
    return counts


def run_summarize(input_path: str, output: str, backend, cfg: inv.InverseConfig, *, shard=(0, 1),
                  progress: bool = True) -> dict:
    """Stage 2: K instructions per extracted code."""
    codes = [r for r in read_rows(input_path) if in_shard(r["index"], shard)] if backend.writer else []
    settings = _settings(cfg, backend, ("score_mode", "oss_prefix"))
    settings.update(input=input_path, shard=list(shard), prompt=inv.summarize_prompt("{code}"), prefixes=inv.PREFIXES)
    path = shard_path(output, shard)
    out = _open(path, "summarize", settings, shard, backend.writer)
    K = cfg.num_instructions
    todo = [(c, k) for c in codes for k in range(K) if out is None or c["index"] * K + k not in out.done]
    todo = backend.sync(todo)

    def fn(chunk):
        items = []
        for c, k in chunk:
            row = c["index"] * K + k
            prefix = inv.choose_prefix(cfg.seed, row, c["response"])
            items.append((inv.summarize_prompt(c["response"]) + prefix, cfg.seed + row))
        results = backend.summarize(items, cfg)
        rows = []
        for (c, k), (prompt, _), (text, finish) in zip(chunk, items, results):
            row = {"index": c["index"] * K + k, "code_index": c["index"], "k": k}
            if text is None:
                rows.append((False, dict(row, reason=finish)))
                continue
            prefix = inv.choose_prefix(cfg.seed, row["index"], c["response"])
            rows.append((True, dict(row, instruction=inv._redecode(prefix + text), response=c["response"],
                                    finish_reason=finish)))
        return rows

    counts = _process(backend, out, todo, len(todo), fn, "summarize", progress)
    complete = out.close(c["index"] * K + k for c in codes for k in range(K)) if out else None
    return {"stage": "summarize", "output": path, "counts": counts, "complete": complete,
            "resumed": (out.resumed_kept + out.resumed_rejected) if out else None}


def run_score(input_path: str, output: str, backend, cfg: inv.InverseConfig, *, shard=(0, 1),
              progress: bool = True) -> dict:
    """Stage 3: the LM-score of every (instruction, code) pair."""
    rows = [r for r in read_rows(input_path) if in_shard(r["code_index"], shard)] if backend.writer else []
    settings = {"model": backend.name, "score_mode": cfg.score_mode, "input": input_path, "shard": list(shard),
                "prompt": inv.score_prompt("{instruction}", "{code}")}
    path = shard_path(output, shard)
    out = _open(path, "score", settings, shard, backend.writer)
    todo = backend.sync([r for r in rows if out is None or r["index"] not in out.done])

    def fn(chunk):
        scores = backend.score([inv.score_prompt(r["instruction"], r["response"]) for r in chunk])
        return [(s is not None, dict(r, score=s) if s is not None else dict(r, reason="too_long"))
                for r, s in zip(chunk, scores)]

    counts = _process(backend, out, todo, len(todo), fn, "score", progress)
    complete = out.close(r["index"] for r in rows) if out else None
    return {"stage": "score", "output": path, "counts": counts, "complete": complete}


def run_select(input_path: str, output: str, cfg: inv.InverseConfig, *, shard=(0, 1)) -> dict:
    """Stage 4: top-1 per code, ascending score, ``instruction``/``response`` rows."""
    rows = [r for r in read_rows(input_path) if in_shard(r["code_index"], shard)]
    best = inv.select_best(rows, oss_prefix=cfg.oss_prefix)
    path = shard_path(output, shard)
    for stale in (path, rejected_path(path), run_path(path)):  # recomputed whole from the scores
        if os.path.exists(stale):
            os.remove(stale)
    settings = {"stage": "select", "oss_prefix": cfg.oss_prefix, "input": input_path, "shard": list(shard)}
    out = ResumableOutput(path, fingerprint("select", settings), settings, shard)
    for r in best:
        out.write(r, kept=True)
    out.close(r["index"] for r in best)
    return {"stage": "select", "output": path, "codes": len(best), "candidates": len(rows), "complete": True}


def run_all(inputs: list[str], output: str, backend, cfg: inv.InverseConfig, *, workdir: str | None = None,
            shard=(0, 1), progress: bool = True) -> list[dict]:
    """Every stage in order, intermediate files in ``workdir`` (default ``OUTPUT.work``); rerun to resume."""
    work = workdir or output + ".work"
    os.makedirs(work, exist_ok=True)
    names = {s: os.path.join(work, f"{s}.jsonl") for s in ("extract", "summaries", "scores")}
    reports = []
    if backend.writer:
        reports.append(run_extract(inputs, names["extract"], shard=shard))
    backend.sync(None)  # the extract output exists before the others read it
    reports.append(run_summarize(shard_path(names["extract"], shard), names["summaries"], backend, cfg, shard=shard,
                                 progress=progress))
    if reports[-1]["complete"] is False:
        return reports
    reports.append(run_score(shard_path(names["summaries"], shard), names["scores"], backend, cfg, shard=shard,
                             progress=progress))
    if backend.writer and reports[-1]["complete"] is not False:
        reports.append(run_select(shard_path(names["scores"], shard), output, cfg, shard=shard))
    return reports


"""HumanEvalPack from inside training (the ``eval.humanevalpack`` config section) and from a checkpoint.

Contract:
- :func:`generate_samples(model, tokenizer, task, lang, problems, settings, pc)` — collective over the model's TP
  group (every TP rank calls it and gets identical completions, via ``megaocto.generation.generate``); returns the
  post-processed samples, ``n_samples`` per problem. With a learned position table, a prompt longer than
  ``max(positions - max_new_tokens, positions // 2)`` keeps its last tokens (generation then stops at the table's
  end; the post-processing still uses the full prompt string).
- :class:`HumanEvalPackHook` — built once by the training loop; ``hook.due(iteration, last)`` says whether to run;
  ``hook.run(model, iteration)`` is collective (generation on every rank), executes on global rank 0 only and
  returns ``{"<task>/<lang>/pass@<k>": value}`` there (``{}`` on other ranks); per-problem results go to
  ``<output_dir>/iter_<N>/<task>-<lang>.jsonl`` and a summary to ``.../summary.json``. The caller's logging
  callback ``log(iteration, metrics, elapsed_s)`` (e.g. the training loop's metrics sinks) is called by ``run`` on
  every rank, so the eval package never imports the training loop or its loggers.
Every data-parallel replica generates the same samples (simple and deterministic; only rank 0's are executed).
Pipeline parallelism (pp > 1) is not supported by generation.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from megaocto.eval import humanevalpack as hep


@dataclass(frozen=True)
class SampleSettings:
    """Decoding settings of one evaluation (OctoPack: temperature 0.2, top-p 0.95)."""

    n_samples: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    batch_size: int = 8
    template: str = "octocoder"


def generate_samples(model, tokenizer, task: str, lang: str, problems: Sequence[dict], settings: SampleSettings,
                     pc=None, *, descriptions: Sequence[Sequence[str]] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[list[list[str]], list[list[str]]]:
    """(post-processed samples, raw completions) per problem; collective over TP (identical on every rank).

    Decoding is :func:`megaocto.generation.generate_text` (stop words as stop strings, the tokenizer's EOD as eos),
    so a raw completion is the text after the prompt cut at the earliest stop word.
    For explain-synthesize, each description of a problem is its own prompt (n_samples each), as in the harness.
    ``progress(done, total)`` counts generated samples, after each decoded batch."""
    from megaocto.generation import GenerationConfig, generate_text

    prompts: list[str] = []
    owner: list[tuple[int, str | None]] = []
    for i, p in enumerate(problems):
        descs = descriptions[i] if descriptions is not None else [None]
        for d in descs:
            prompts.append(hep.build_prompt(task, p, settings.template, lang=lang, description=d))
            owner.append((i, d))
    limit = model.cfg.max_positions if getattr(model.cfg, "family", "") == "bigcode" else None
    # at least half the positions for the prompt
    keep = None if limit is None else max(limit - settings.max_new_tokens, limit // 2)
    gen = GenerationConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                           top_p=settings.top_p if settings.temperature > 0 else 1.0, seed=settings.seed,
                           eos_id=tokenizer.eod, num_samples=settings.n_samples,
                           stop=tuple(hep.stop_words(task, lang)))
    completions = generate_text(model, tokenizer, prompts, gen, pc, batch_size=settings.batch_size,
                                max_prompt_tokens=keep, progress=progress)
    samples: list[list[str]] = [[] for _ in problems]
    raw: list[list[str]] = [[] for _ in problems]
    for j, completion in enumerate(completions):
        k = j // settings.n_samples
        i, desc = owner[k]
        raw[i].append(completion)
        samples[i].append(hep.postprocess(task, lang, problems[i], prompts[k] + completion,
                                          template=settings.template, description=desc))
    return samples, raw


def write_results(out_dir: Path, results: "hep.EvalResults", raw: Sequence[Sequence[str]] | None = None) -> None:
    """``<task>-<lang>.jsonl`` (one record per problem) and ``<task>-<lang>.generations.json`` (harness format)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results.task}-{results.lang}"
    with open(out_dir / f"{stem}.jsonl", "w", encoding="utf-8") as f:
        for i, rec in enumerate(results.problems):
            row = dict(rec)
            if raw is not None:
                row["completions"] = list(raw[i])
            f.write(json.dumps(row) + "\n")
    with open(out_dir / f"{stem}.generations.json", "w", encoding="utf-8") as f:
        json.dump([[s["code"] for s in rec["samples"]] for rec in results.problems], f)


class HumanEvalPackHook:
    """Runs ``eval.humanevalpack`` from the training loop (see the module docstring)."""

    def __init__(self, eval_cfg, *, tokenizer_path: str, run_dir: str, pc, total_iters: int,
                 log: Callable[[int, dict[str, float], float], None] | None = None):
        self.cfg = eval_cfg.humanevalpack
        self.log = log
        self.interval = eval_cfg.humanevalpack_interval()
        self.pc = pc
        self.total_iters = total_iters
        if pc.pp > 1:
            raise ValueError("eval.humanevalpack: generation does not support pipeline parallelism (parallel.pp > 1); "
                             "disable the hook and evaluate the checkpoint with `megaocto eval humanevalpack --load`")
        path = self.cfg.tokenizer or tokenizer_path
        if not path:
            raise ValueError("eval.humanevalpack.enabled needs a tokenizer: set eval.humanevalpack.tokenizer or "
                             "data.tokenizer")
        from megaocto.generation import load_tokenizer

        self.tokenizer = load_tokenizer(path)
        self.output_dir = Path(self.cfg.output_dir or os.path.join(run_dir, "humanevalpack"))
        # problems load up front so a bad data_dir fails at start, not after hours of training
        self.problems = {lang: hep.load_problems(lang, self.cfg.data_dir)[:self.cfg.limit]
                         for lang in self.cfg.languages}
        if pc.rank == 0:  # a missing toolchain should fail at start too
            from megaocto.eval.toolchains import check

            for lang in self.cfg.languages:
                check(lang)
        self.settings = SampleSettings(n_samples=self.cfg.n_samples, temperature=self.cfg.temperature,
                                       top_p=self.cfg.top_p, max_new_tokens=self.cfg.max_new_tokens,
                                       seed=self.cfg.seed, batch_size=self.cfg.batch_size, template=self.cfg.template)

    def due(self, iteration: int) -> bool:
        """Every `interval` steps and at the last step (interval 0: only the last)."""
        return iteration == self.total_iters or (self.interval > 0 and iteration % self.interval == 0)

    def run(self, model, iteration: int) -> dict[str, float]:
        """Collective: generate on every rank, execute on rank 0; metrics on rank 0, {} elsewhere; then the log
        callback (every rank)."""
        started = time.time()
        metrics: dict[str, float] = {}
        summary = {}
        for task in self.cfg.tasks:
            for lang in self.cfg.languages:
                problems = self.problems[lang]
                samples, raw = generate_samples(model, self.tokenizer, task, lang, problems, self.settings, self.pc)
                if self.pc.rank != 0:
                    continue
                res = hep.evaluate(task, lang, samples, problems=problems, workers=self.cfg.workers,
                                   timeout=self.cfg.timeout, ks=self.cfg.ks)
                write_results(self.output_dir / f"iter_{iteration:07d}", res, raw)
                summary[f"{task}/{lang}"] = res.summary()
                for k, v in res.metrics.items():
                    metrics[f"{task}/{lang}/{k}"] = v
        if self.pc.rank == 0:
            out = self.output_dir / f"iter_{iteration:07d}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps({"iteration": iteration, **summary}, indent=1))
        if self.log is not None:
            self.log(iteration, metrics, time.time() - started)
        return metrics

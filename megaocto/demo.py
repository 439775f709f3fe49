"""The end-to-end demo: git commits → CommitPackFT filters → tokenizer → packed .bin/.idx → training.

`megaocto demo` runs the whole OctoCoder-style pipeline on a laptop-sized problem with no network:

1. a local git repository (megaocto's own sources replayed as history, or ``--repo PATH``);
2. its single-file commits in CommitPack schema (``megaocto commits``);
3. the CommitPackFT subject filters (``megaocto filter-commits``), with the token-length window
   widened to the demo's sequence length;
4. a byte-level BPE with StarCoder's special tokens trained on those commits (``megaocto tokenizer train``);
5. OctoCoder inputs/targets tokenized into Megatron ``.bin/.idx`` (``megaocto preprocess``);
6. a tiny StarCoder-style (MQA) model finetuned on packed examples with the loss on targets only
   (``megaocto train``), validated on held-out commits, checkpointed.

Every step calls the same library function as its command, so the demo doubles as a smoke test.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from megaocto.config.base import ConfigError, field


@dataclass
class DemoConfig:
    workdir: str = field("demo", "Directory for everything the demo writes (repo, jsonl, tokenizer, data, run).")
    repo: str = field("", "Git repository to take commits from; empty = build one from megaocto's own sources.")
    vocab_size: int = field(2048, "Vocabulary of the BPE tokenizer trained on the commits.")
    seq_length: int = field(512, "Training sequence length (packed rows).")
    iters: int = field(60, "Optimizer steps.")
    global_batch_size: int = field(8, "Sequences per optimizer step.")
    micro_batch_size: int = field(4, "Sequences per forward/backward.")
    lr: float = field(2e-3, "Peak learning rate (cosine decay, 10% warmup).")
    seed: int = field(1234, "Seed of the model init and the data order.")
    extra: list = field(default_factory=list, doc="Extra `--section.field value` overrides for the training run.")

    def validate(self) -> None:
        if self.vocab_size < 512:
            raise ConfigError(f"demo: --vocab-size must be >= 512 (got {self.vocab_size})")
        if self.iters < 1:
            raise ConfigError(f"demo: --iters must be >= 1 (got {self.iters})")


def training_overrides(cfg: DemoConfig, vocab_size: int, prefix: str, tokenizer: str, run_dir: str) -> list[str]:
    """The `--section.field VALUE` list of the demo's training run; the user's `cfg.extra` come last and win."""
    return [
        "--model.preset", "tiny-bigcode", "--model.vocab_size", str(vocab_size),
        "--model.seq_length", str(cfg.seq_length), "--model.max_position_embeddings", str(cfg.seq_length),
        "--data.kind", "packed", "--data.paths", json.dumps([prefix]), "--data.tokenizer", tokenizer,
        "--data.split", "90,10,0", "--data.num_workers", "0",
        "--train.iters", str(cfg.iters), "--train.micro_batch_size", str(cfg.micro_batch_size),
        "--train.global_batch_size", str(cfg.global_batch_size), "--train.seed", str(cfg.seed),
        "--optimizer.lr", str(cfg.lr), "--schedule.style", "cosine",
        "--schedule.warmup_iters", str(max(1, cfg.iters // 10)), "--schedule.min_lr", str(cfg.lr / 10),
        "--checkpoint.save", os.path.join(run_dir, "checkpoints"),
        "--checkpoint.save_interval", str(cfg.iters),
        "--logging.run_dir", run_dir, "--logging.log_interval", str(max(1, cfg.iters // 6)),
        "--eval.interval", str(max(1, cfg.iters // 2)), "--eval.iters", "2",
        *cfg.extra,
    ]


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Run the pipeline; returns a summary dict (paths, counts, first/last/validation loss)."""
    from megaocto.config.loader import load_run_config
    from megaocto.data.filters import FilterConfig, filter_commits
    from megaocto.data.git_commits import extract_commits
    from megaocto.data.preprocess import PreprocessConfig, preprocess
    from megaocto.data.tokenizer import train_bpe_tokenizer
    from megaocto.demo_repo import make_demo_repo
    from megaocto.training.loop import train

    cfg.validate()
    work = os.path.abspath(cfg.workdir)
    prefix = os.path.join(work, "data", "commits")
    tokenizer = os.path.join(work, "tokenizer.json")
    run_dir = os.path.join(work, "run")
    # Check the run config (and the user's extra --section.field overrides) before spending minutes on the pipeline;
    # the vocabulary is not known yet, the requested one stands in for it.
    try:
        load_run_config(None, training_overrides(cfg, cfg.vocab_size, prefix, tokenizer, run_dir))
    except ConfigError as e:
        raise ConfigError(f"training run config: {e}") from None
    os.makedirs(work, exist_ok=True)
    summary: dict = {"workdir": work}

    repo = cfg.repo or make_demo_repo(os.path.join(work, "repo"))
    log(f"[1/6] git repository: {repo}")

    commits = os.path.join(work, "commits.jsonl")
    ex = extract_commits(str(repo), commits)
    skipped = {k: v for k, v in ex.counts.items() if k not in ("rows", "commits")}
    log(f"[2/6] {ex.counts['rows']} single-file commits of {ex.counts['commits']} -> {commits}"
        + (f" (skipped: {skipped})" if skipped else ""))
    summary["commits"] = ex.counts["rows"]

    info = train_bpe_tokenizer([commits], cfg.vocab_size, tokenizer,
                               json_keys=("old_contents", "new_contents", "subject"))
    log(f"[3/6] byte-level BPE, vocab {info['vocab_size']} (StarCoder special tokens 0..18) -> {tokenizer}")

    filtered = os.path.join(work, "commits.filtered.jsonl")
    # CommitPackFT's token window is 50..768 StarCoder tokens; ours is sized so examples fit a packed row.
    filt = filter_commits([commits], filtered, FilterConfig(tokenizer=tokenizer, min_tokens=16,
                                                            max_tokens=cfg.seq_length), log=lambda m: None)
    log(f"[4/6] CommitPackFT filters kept {filt.kept} of {filt.seen} commits -> {filtered}")
    for line in filt.report().splitlines():
        log("      " + line)
    summary["kept_commits"] = filt.kept
    if filt.kept < 20:
        raise RuntimeError(f"only {filt.kept} commits survived the filters; the demo needs at least 20 "
                           f"(use --repo with a larger history)")

    pre = preprocess(PreprocessConfig(inputs=[filtered], output_prefix=prefix, tokenizer=tokenizer,
                                      format="commits-finetune", workers=1, log_interval=0), log=lambda m: None)
    log(f"[5/6] tokenized {pre.docs} (input, target) pairs, {sum(pre.tokens.values()):,} tokens -> {prefix}_"
        f"{{inputs,targets}}_document.{{bin,idx}}")

    if os.path.isdir(run_dir):  # a demo run always starts from scratch (training resumes are tested elsewhere)
        shutil.rmtree(run_dir)
    overrides = training_overrides(cfg, info["vocab_size"], prefix, tokenizer, run_dir)
    run_cfg = load_run_config(None, overrides)
    log(f"[6/6] training tiny-bigcode on packed commits (seq {cfg.seq_length}, {cfg.iters} steps) -> {run_dir}")
    result = train(run_cfg)
    metrics = []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    summary.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                   val_loss=vals[-1] if vals else None, iterations=result.iteration,
                   checkpoint=os.path.join(run_dir, "checkpoints"), exit_code=result.exit_code)
    val = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.3f}"
    log(f"demo finished: training loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} over "
        f"{result.iteration} steps, validation loss {val} (held-out commits); checkpoint in {summary['checkpoint']}")
    return summary

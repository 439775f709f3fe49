"""The end-to-end demo: git commits → CommitPackFT filters → tokenizer → packed .bin/.idx → training.

`megaocto demo` runs the whole OctoCoder-style pipeline on a laptop-sized problem with no network:

1. a local git repository (megaocto's own sources replayed as history, or ``--repo PATH``);
2. its single-file commits in CommitPack schema (``megaocto commits``);
3. the CommitPackFT subject filters (``megaocto filter-commits``), with the token-length window
   widened to the demo's sequence length;
4. a byte-level BPE with StarCoder's special tokens trained on those commits (``megaocto tokenizer train``);
5. OctoCoder inputs/targets tokenized into Megatron ``.bin/.idx`` (``megaocto preprocess``);
6. a tiny StarCoder-style (MQA) model finetuned on packed examples with the loss on targets only
   (``megaocto train`` in this process, or ``bash launch/finetune.sh`` with ``--launcher``: a local torchrun of
   ``--tp`` processes), validated on held-out commits, checkpointed;
7. with ``--hf``: the checkpoint exported to Hugging Face format (``megaocto convert to-hf``), loaded with
   ``transformers`` and asked to complete a held-out commit (compared with ``megaocto generate``);
8. with ``--eval-limit K``: the HumanEvalPack hook (``megaocto eval humanevalpack``) on K problems (the full data
   when found, else the 3 Python problems packaged in ``megaocto/resources/humanevalpack-sample``).

Steps 1-6 call the same library function as their command, so the demo doubles as a smoke test; steps 6 (with a
launcher), 7 and 8 run the commands themselves. A command that is not in this checkout is reported as
"skipped: <step> (not available yet)".
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
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
    launcher: str = field("", "Launch script for the training step (e.g. launch/finetune.sh, run with PRESET=tiny); "
                              "empty = train in this process.")
    tp: int = field(1, "Tensor-parallel size (= local processes) of a launcher run.")
    hf: bool = field(False, "Export the checkpoint to HF format, load it with transformers and generate.")
    eval_limit: int = field(0, "Run the HumanEvalPack hook on this many problems (0 = skip).")
    humanevalpack: str = field("", "HumanEvalPack data directory (<lang>.jsonl); default $MEGAOCTO_HUMANEVALPACK, "
                                   "else ../shared/data/humanevalpack beside the repository when present, else the "
                                   "3 Python problems shipped in megaocto/resources/humanevalpack-sample.")

    def validate(self) -> None:
        if self.vocab_size < 512:
            raise ConfigError(f"demo: --vocab-size must be >= 512 (got {self.vocab_size})")
        if self.iters < 1:
            raise ConfigError(f"demo: --iters must be >= 1 (got {self.iters})")
        if self.tp < 1:
            raise ConfigError(f"demo: --tp must be >= 1 (got {self.tp})")
        if self.tp > 1 and not self.launcher:
            raise ConfigError("demo: --tp > 1 needs --launcher (e.g. launch/finetune.sh) to start the processes")
        if self.launcher and not os.path.isfile(self.launcher):
            raise ConfigError(f"demo: --launcher {self.launcher}: no such file")
        if self.eval_limit < 0:
            raise ConfigError(f"demo: --eval-limit must be >= 0 (got {self.eval_limit})")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_CONFIG = os.path.join(REPO_ROOT, "launch", "configs", "tiny-bigcode.yaml")  # what PRESET=tiny reads


def training_overrides(cfg: DemoConfig, vocab_size: int, prefix: str, tokenizer: str, run_dir: str) -> list[str]:
    """The `--section.field VALUE` list of the demo's training run; the user's `cfg.extra` come last and win.
    A launcher run reads launch/configs/tiny-bigcode.yaml first; these override every field it sets that matters."""
    launcher = ["--checkpoint.load", os.path.join(run_dir, "checkpoints"), "--parallel.tp", str(cfg.tp)] \
        if cfg.launcher else []
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
        *launcher, *cfg.extra,
    ]


def command_available(name: str) -> bool:
    """Whether `megaocto NAME` exists in this checkout (the demo's later steps are optional)."""
    return importlib.util.find_spec(f"megaocto.commands.{name}") is not None


def _megaocto(args: list[str], log, **kw) -> subprocess.CompletedProcess:
    """Run `python -m megaocto.cli ARGS` and log its output indented."""
    proc = subprocess.run([sys.executable, "-m", "megaocto.cli", *args], capture_output=True, text=True, **kw)
    for line in (proc.stdout + proc.stderr).strip().splitlines():
        if line.strip() and "Loading weights" not in line:
            log("      " + line)
    return proc


def train_with_launcher(cfg: DemoConfig, overrides: list[str], run_dir: str, log) -> tuple[int, int]:
    """Step 6 through a launch script (local torchrun of cfg.tp processes): returns (exit code, iteration)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PRESET="tiny", TP=str(cfg.tp), NPROC_PER_NODE=str(cfg.tp), PYTHON=sys.executable,
               MEGAOCTO_ROOT=REPO_ROOT, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    log(f"      PRESET=tiny TP={cfg.tp} bash {cfg.launcher} {' '.join(overrides)}")
    proc = subprocess.run(["bash", cfg.launcher, *overrides], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    with open(os.path.join(run_dir, "launcher.log"), "w", encoding="utf-8") as f:
        f.write(proc.stdout)
    for line in proc.stdout.splitlines():
        if line.startswith(("iter ", "validation", "saved checkpoint", "[megaocto launch", "megaocto train:")):
            log("      " + line)
    iteration = 0
    reason_file = os.path.join(run_dir, "exit_reason.json")
    if os.path.exists(reason_file):
        with open(reason_file, encoding="utf-8") as f:
            iteration = json.load(f).get("iteration") or 0
    if proc.returncode != 0:
        log(proc.stdout[-3000:])
    return proc.returncode, iteration


def hf_generate(hf_dir: str, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """Load the exported model with transformers (offline) and complete `prompt` greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id or 0, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new, tok.decode(new)


def find_humanevalpack(cfg: DemoConfig) -> str | None:
    for d in (cfg.humanevalpack, os.environ.get("MEGAOCTO_HUMANEVALPACK", ""),
              os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "humanevalpack")):
        if d and os.path.isfile(os.path.join(d, "python.jsonl")):
            return d
    return None


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
    steps = 8 if cfg.eval_limit else 7 if cfg.hf else 6
    try:
        load_run_config(LAUNCHER_CONFIG if cfg.launcher else None,
                        training_overrides(cfg, cfg.vocab_size, prefix, tokenizer, run_dir))
    except ConfigError as e:
        raise ConfigError(f"training run config: {e}") from None
    os.makedirs(work, exist_ok=True)
    summary: dict = {"workdir": work}

    repo = cfg.repo or make_demo_repo(os.path.join(work, "repo"))
    log(f"[1/{steps}] git repository: {repo}")

    commits = os.path.join(work, "commits.jsonl")
    ex = extract_commits(str(repo), commits)
    skipped = {k: v for k, v in ex.counts.items() if k not in ("rows", "commits")}
    log(f"[2/{steps}] {ex.counts['rows']} single-file commits of {ex.counts['commits']} -> {commits}"
        + (f" (skipped: {skipped})" if skipped else ""))
    summary["commits"] = ex.counts["rows"]

    info = train_bpe_tokenizer([commits], cfg.vocab_size, tokenizer,
                               json_keys=("old_contents", "new_contents", "subject"))
    log(f"[3/{steps}] byte-level BPE, vocab {info['vocab_size']} (StarCoder special tokens 0..18) -> {tokenizer}")

    filtered = os.path.join(work, "commits.filtered.jsonl")
    # CommitPackFT's token window is 50..768 StarCoder tokens; ours is sized so examples fit a packed row.
    filt = filter_commits([commits], filtered, FilterConfig(tokenizer=tokenizer, min_tokens=16,
                                                            max_tokens=cfg.seq_length), log=lambda m: None)
    log(f"[4/{steps}] CommitPackFT filters kept {filt.kept} of {filt.seen} commits -> {filtered}")
    for line in filt.report().splitlines():
        log("      " + line)
    if filt.seen < 100_000:
        log(f"      note: {filt.seen} commits are too few for the CommitPackFT filters to be representative "
            f"(they were made for millions of CommitPack rows); the rules ran unchanged, only the token window "
            f"is sized to --seq-length")
    summary["kept_commits"] = filt.kept
    if filt.kept < 20:
        raise RuntimeError(f"only {filt.kept} commits survived the filters; the demo needs at least 20 "
                           f"(use --repo with a larger history)")

    pre = preprocess(PreprocessConfig(inputs=[filtered], output_prefix=prefix, tokenizer=tokenizer,
                                      format="commits-finetune", workers=1, log_interval=0), log=lambda m: None)
    log(f"[5/{steps}] tokenized {pre.docs} (input, target) pairs, {sum(pre.tokens.values()):,} tokens -> {prefix}_"
        f"{{inputs,targets}}_document.{{bin,idx}}")

    if os.path.isdir(run_dir):  # a demo run always starts from scratch (training resumes are tested elsewhere)
        shutil.rmtree(run_dir)
    overrides = training_overrides(cfg, info["vocab_size"], prefix, tokenizer, run_dir)
    ckpt = os.path.join(run_dir, "checkpoints")
    how = f"bash {cfg.launcher} (local torchrun, tp={cfg.tp})" if cfg.launcher else "in this process"
    log(f"[6/{steps}] training tiny-bigcode on packed commits (seq {cfg.seq_length}, {cfg.iters} steps, {how}) "
        f"-> {run_dir}")
    if cfg.launcher:
        os.makedirs(run_dir, exist_ok=True)
        exit_code, iteration = train_with_launcher(cfg, overrides, run_dir, log)
    else:
        result = train(load_run_config(None, overrides))
        exit_code, iteration = result.exit_code, result.iteration
    metrics = []
    metrics_file = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics_file):
        with open(metrics_file, encoding="utf-8") as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    summary.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                   val_loss=vals[-1] if vals else None, iterations=iteration, checkpoint=ckpt, exit_code=exit_code)
    if exit_code != 0 or not losses:
        log(f"demo: training failed with exit code {exit_code} (logs in {run_dir})")
        summary["exit_code"] = exit_code or 1
        return summary
    val = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.3f}"
    log(f"      training loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} over {iteration} steps, "
        f"validation loss {val} (held-out commits); checkpoint in {ckpt}")

    # generate / eval run in one process: a tp > 1 checkpoint is resharded to tp=1 for them first.
    ckpt1 = ckpt
    if (cfg.hf or cfg.eval_limit) and cfg.tp > 1 and command_available("convert"):
        ckpt1 = os.path.join(work, "checkpoint-tp1")
        if os.path.isdir(ckpt1):
            shutil.rmtree(ckpt1)
        log(f"      megaocto convert reshard --load {ckpt} --tp 1 --output {ckpt1} (for single-process generation)")
        reshard = _megaocto(["convert", "reshard", "--load", ckpt, "--output", ckpt1, "--tp", "1", "--quiet"], log)
        if reshard.returncode != 0:
            log(f"      reshard failed (exit {reshard.returncode}); the next steps use the tp={cfg.tp} checkpoint")
            ckpt1 = ckpt
    if cfg.hf:
        summary.update(hf_export_and_generate(cfg, work, ckpt1, tokenizer, filtered, log, steps))
    if cfg.eval_limit:
        summary.update(run_eval_hook(cfg, work, ckpt1, tokenizer, log, steps))

    if summary["exit_code"] != 0:
        log(f"demo finished with a failed step (exit code {summary['exit_code']}; see the messages above). "
            f"Where everything went:")
    else:
        log("demo finished. Where everything went:")
    for key, what in (("workdir", "work directory"), ("checkpoint", "megaocto checkpoint"),
                      ("hf_dir", "Hugging Face model"), ("eval_dir", "HumanEvalPack results")):
        if summary.get(key):
            log(f"  {what:22s} {summary[key]}")
    log(f"  {'commits / filtered':22s} {commits} / {filtered}")
    log(f"  {'tokenizer':22s} {tokenizer}")
    log(f"  {'datasets':22s} {prefix}_{{inputs,targets}}_document.{{bin,idx}}")
    log(f"  {'metrics':22s} {metrics_file}")
    return summary


def _demo_prompt(filtered: str) -> str:
    """An OctoCoder prompt from the last (newest) filtered commit, shortened to its first lines: the input side of
    the commits-finetune format the demo trained on (formats.octocoder_question)."""
    from megaocto.data.formats import octocoder_question

    with open(filtered, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    row = next((r for r in reversed(rows) if r["old_contents"].strip()), rows[-1])
    old = "\n".join(row["old_contents"].splitlines()[:8])
    return octocoder_question(f"{row['subject']}\n{old}")


def hf_export_and_generate(cfg: DemoConfig, work: str, ckpt: str, tokenizer: str, filtered: str, log,
                           steps: int) -> dict:
    """Step 7: megaocto convert to-hf -> transformers load + greedy generate (vs megaocto generate)."""
    if not command_available("convert"):
        log(f"[7/{steps}] skipped: convert to HF (not available yet)")
        return {}
    hf_dir = os.path.join(work, "hf")
    if os.path.isdir(hf_dir):
        shutil.rmtree(hf_dir)
    log(f"[7/{steps}] megaocto convert to-hf --load {ckpt} --output {hf_dir} --verify")
    proc = _megaocto(["convert", "to-hf", "--load", ckpt, "--output", hf_dir, "--tokenizer", tokenizer,
                      "--verify", "--quiet"], log)
    if proc.returncode != 0:
        log(f"      convert to-hf failed (exit {proc.returncode}); HF generation skipped")
        return {"exit_code": proc.returncode}
    prompt = _demo_prompt(filtered)
    try:
        new_ids, text = hf_generate(hf_dir, prompt, 32)
    except Exception as e:  # noqa: BLE001 - any transformers failure is reported as this step's failure
        log(f"      transformers could not load or run {hf_dir}: {type(e).__name__}: {e}")
        return {"hf_dir": hf_dir, "exit_code": 1}
    log(f"      transformers AutoModelForCausalLM.from_pretrained({hf_dir}).generate (greedy, 32 tokens):")
    log(f"      prompt: {prompt!r}")
    log(f"      completion: {text!r}")
    out: dict = {"hf_dir": hf_dir, "hf_completion": text}
    if command_available("generate"):
        gen = subprocess.run([sys.executable, "-m", "megaocto.cli", "generate", "--load", ckpt, "--prompt", prompt,
                              "--max-new-tokens", "32", "--tokenizer", tokenizer, "--no-eos-stop", "--jsonl"],
                             capture_output=True, text=True)
        mine = None
        for line in gen.stdout.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            mine = row.get("completion", row.get("text"))
        if gen.returncode == 0 and mine is not None:
            same = mine[:len(text)] == text or text[:len(mine)] == mine
            log(f"      megaocto generate on the megaocto checkpoint: {mine!r} "
                f"({'same text as transformers' if same else 'DIFFERS from transformers'})")
            out["generate_matches_hf"] = same
        else:
            log(f"      megaocto generate failed (exit {gen.returncode}): {gen.stderr.strip()[-500:]}")
    else:
        log("      skipped: megaocto generate comparison (not available yet)")
    return out


def run_eval_hook(cfg: DemoConfig, work: str, ckpt: str, tokenizer: str, log, steps: int) -> dict:
    """Step 8: megaocto eval humanevalpack (synthesize, python) on cfg.eval_limit problems."""
    if not command_available("eval"):
        log(f"[8/{steps}] skipped: HumanEvalPack eval (not available yet)")
        return {}
    data = find_humanevalpack(cfg)
    source = ["--data-dir", data] if data is not None else ["--sample"]
    eval_dir = os.path.join(work, "eval")
    log(f"[8/{steps}] megaocto eval humanevalpack --task synthesize --lang python --limit {cfg.eval_limit} "
        f"{' '.join(source)} (a tiny model scores 0: this shows the hook runs end to end)")
    if data is None:
        log("      no HumanEvalPack data found (--humanevalpack DIR, $MEGAOCTO_HUMANEVALPACK or "
            "../shared/data/humanevalpack): using the 3 Python problems shipped in "
            "megaocto/resources/humanevalpack-sample (a smoke run, not a benchmark)")
    proc = _megaocto(["eval", "humanevalpack", "--task", "synthesize", "--lang", "python", "--load", ckpt,
                      "--tokenizer", tokenizer, *source, "--limit", str(cfg.eval_limit),
                      "--max-new-tokens", "64", "--output", eval_dir], log)
    if proc.returncode != 0:
        log(f"      eval failed (exit {proc.returncode})")
        return {"exit_code": proc.returncode}
    return {"eval_dir": eval_dir}

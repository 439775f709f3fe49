"""`megaocto eval humanevalpack ...` (HumanEvalPack pass@k) and `megaocto eval setup-toolchains`.

Exit codes: 0 ok, 2 usage/config/data errors and missing toolchains (the message names the package), 1 when
something else fails. Details: docs/eval.md.
"""
from __future__ import annotations

import sys

NAME = "eval"
HELP = "HumanEvalPack evaluation (fix, explain, synthesize x 6 languages; pass@k) and toolchain setup."

EPILOG = """\
examples:
  megaocto eval setup-toolchains
  megaocto eval humanevalpack --task synthesize --lang python --generations gens.json --data-dir DIR
  megaocto eval humanevalpack --task fix-tests --lang go --load CKPT --n 20 --output out/
  megaocto eval humanevalpack --task explain-describe --lang rust --load CKPT --output desc/
  megaocto eval humanevalpack --task explain-synthesize --lang rust --load CKPT \\
      --descriptions desc/explain-describe-rust.generations.json
--generations takes the harness format (JSON list with one list of strings per problem, in task order; strings
that start with the prompt are post-processed, others are taken as post-processed code) or JSONL
{"task_id", "completion"} rows (completion = the text generated after the prompt).
Writes <output>/<task>-<lang>.jsonl (per problem), <task>-<lang>.generations.json and
<task>-<lang>.summary.json (pass@k for every k in --k with k <= n)."""


def add_arguments(parser) -> None:
    import argparse

    from megaocto.eval.humanevalpack import LANGUAGES, TASKS, TEMPLATES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="eval_command", metavar="{humanevalpack,magicoder,setup-toolchains}")
    hp = sub.add_parser("humanevalpack", help="score a task x language", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    hp.add_argument("--task", required=True, choices=TASKS)
    hp.add_argument("--lang", required=True, choices=LANGUAGES)
    src = hp.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="megaocto checkpoint directory to generate with")
    src.add_argument("--generations", help="generations file (harness JSON list, or JSONL {task_id, completion})")
    hp.add_argument("--descriptions", default=None, help="explain-synthesize: descriptions from explain-describe "
                    "(its generations.json, or JSONL {task_id, description})")
    data = hp.add_mutually_exclusive_group()
    data.add_argument("--data-dir", default=None, help="directory with <lang>.jsonl (default: $MEGAOCTO_HUMANEVALPACK "
                      "or the hub dataset bigcode/humanevalpack)")
    data.add_argument("--sample", action="store_true", help="the 3 Python problems shipped with megaocto "
                      "(offline smoke run, not a benchmark; megaocto/resources/humanevalpack-sample)")
    hp.add_argument("--template", default="octocoder", choices=TEMPLATES,
                    help="prompt template (continue: synthesize with base models; default: %(default)s)")
    hp.add_argument("--limit", type=int, default=None, help="first K problems only")
    hp.add_argument("--n", type=int, default=1, help="samples per problem (default: %(default)s)")
    hp.add_argument("--temperature", type=float, default=0.2, help="default: %(default)s (OctoPack)")
    hp.add_argument("--top-p", type=float, default=0.95, help="default: %(default)s (OctoPack)")
    hp.add_argument("--max-new-tokens", type=int, default=512, help="default: %(default)s")
    hp.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    hp.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: %(default)s)")
    hp.add_argument("--tokenizer", default=None, help="default: the checkpoint's data.tokenizer")
    hp.add_argument("--iteration", default=None, help="checkpoint iteration or 'release' (default: latest)")
    hp.add_argument("--workers", type=int, default=2, help="programs executed in parallel (default: %(default)s)")
    hp.add_argument("--timeout", type=float, default=None, help="per-program run timeout in seconds (default: per "
                    "language: python/js 10, java 30 incl. compiling, go 20, cpp/rust 10 after compiling)")
    hp.add_argument("--k", default="1,10,100", help="pass@k values, reported when k <= n (default: %(default)s)")
    hp.add_argument("--output", default=None, help="directory for results (default: print the summary only)")
    from megaocto.eval.magicoder import add_subparser as add_magicoder  # Magicoder prompt, HumanEval(+)/MBPP(+)

    add_magicoder(sub)
    st = sub.add_parser("setup-toolchains", help="apt-get install go, boost, testify and rust crates; write the "
                        "cargo config (runs launch/setup_toolchains.sh)")
    st.add_argument("--skip-apt", action="store_true", help="only write the cargo config and npm js-md5")


def _fail(message: str, code: int = 2) -> int:
    print(f"megaocto eval: error: {message}", file=sys.stderr)
    return code


def run(args) -> int:
    if args.eval_command == "setup-toolchains":
        return _setup(args)
    if args.eval_command == "magicoder":
        from megaocto.eval.magicoder import run_subcommand

        return run_subcommand(args)
    if args.eval_command != "humanevalpack":
        return _fail("choose a subcommand: humanevalpack or setup-toolchains (megaocto eval --help)")
    from megaocto.eval.humanevalpack import DataError
    from megaocto.eval.toolchains import ToolchainError

    try:
        return _humanevalpack(args)
    except (DataError, ToolchainError, ValueError, OSError) as e:
        return _fail(str(e))


def _setup(args) -> int:
    import os
    import subprocess

    from megaocto.eval.toolchains import setup_script

    script = setup_script()
    if not script.exists():
        return _fail(f"{script} not found (it ships in the source checkout, launch/setup_toolchains.sh)", 1)
    env = dict(os.environ, SKIP_APT="1" if args.skip_apt else os.environ.get("SKIP_APT", "0"))
    return subprocess.run(["bash", str(script)], env=env).returncode


def _humanevalpack(args) -> int:
    import json
    from pathlib import Path

    from megaocto.eval import humanevalpack as hep
    from megaocto.eval.hook import write_results
    from megaocto.eval.progress import Progress

    ks = [int(k) for k in args.k.split(",") if k.strip()]
    for flag, value in (("--n", args.n), ("--workers", args.workers), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size), ("--limit", args.limit or 1), *((("--k", k) for k in ks))):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1 (got {value})")
    if args.task == "explain-synthesize" and not args.descriptions:
        raise ValueError("--task explain-synthesize needs --descriptions FILE (the output of --task explain-describe)")
    if args.template == "continue" and args.task != "synthesize":
        raise ValueError(f"--template continue is only for synthesize; use octocoder or instruct for {args.task}")
    if args.sample:
        args.data_dir = str(hep.SAMPLE_DIR)
        print(f"using the packaged 3-problem HumanEvalPack sample ({hep.SAMPLE_DIR}): a smoke run, not a benchmark",
              file=sys.stderr)
    problems = hep.load_problems(args.lang, args.data_dir)[:args.limit]
    descriptions = hep.load_descriptions(args.descriptions, problems) if args.descriptions else None
    out = Path(args.output) if args.output else None
    raw = None
    rank = 0
    if args.generations:
        samples = hep.load_generations(args.generations, args.task, args.lang, problems, template=args.template,
                                       descriptions=descriptions)
    else:
        samples, raw, rank = _generate(args, problems, descriptions)
    if rank != 0:
        return 0
    if args.task == "explain-describe":  # descriptions only: saved for explain-synthesize, nothing to execute
        if out is None:
            print(json.dumps(samples, indent=1))
            return 0
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"explain-describe-{args.lang}.generations.json"
        path.write_text(json.dumps(samples))
        print(f"wrote {sum(len(s) for s in samples)} descriptions for {len(samples)} problems to {path}")
        return 0

    res = hep.evaluate(args.task, args.lang, samples, problems=problems, workers=args.workers, timeout=args.timeout,
                       ks=ks, progress=Progress("execute", "programs"))
    summary = res.summary()
    if out is not None:
        write_results(out, res, raw)
        (out / f"{args.task}-{args.lang}.summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


def _generate(args, problems, descriptions):
    """Samples from a checkpoint (single process or torchrun with the checkpoint's tp); returns rank too."""
    import torch

    from megaocto.config.base import ConfigError
    from megaocto.eval.hook import SampleSettings, generate_samples
    from megaocto.eval.progress import Progress
    from megaocto.generation.loading import load_model_and_tokenizer

    try:
        model, tokenizer, pc = load_model_and_tokenizer(args.load, tokenizer=args.tokenizer, iteration=args.iteration)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    settings = SampleSettings(n_samples=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                              template=args.template)
    with torch.no_grad():
        # every TP rank generates (collective); rank 0 reports
        samples, raw = generate_samples(model, tokenizer, args.task, args.lang, problems, settings, pc,
                                        descriptions=descriptions,
                                        progress=Progress("generate", "samples") if pc.rank == 0 else None)
    return samples, raw, pc.rank

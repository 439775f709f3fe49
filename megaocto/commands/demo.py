"""`megaocto demo`: the whole pipeline (git commits → filters → tokenizer → .bin/.idx → training) on a tiny model."""
from __future__ import annotations

import subprocess
import sys

NAME = "demo"
HELP = ("Run the end-to-end OctoCoder-style pipeline on a local git repo with a tiny model (no network); "
        "`make demo` adds --launcher launch/finetune.sh --tp 2 --hf --eval-limit 2")
ACCEPTS_EXTRA = True  # extra --section.field VALUE pairs go to the training run


EPILOG = """\
Any other --section.field VALUE arguments go to the training run (step 6) and override the demo's
settings, e.g.  megaocto demo --iters 20 --train.dtype fp32 --model.num_layers 4
They are checked before the pipeline starts. Fields: docs/training.md (megaocto train --help)."""


def add_arguments(parser):
    import argparse

    from megaocto.demo import DemoConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG

    d = DemoConfig()
    parser.add_argument("--workdir", default=d.workdir, help="output directory (default: %(default)s)")
    parser.add_argument("--repo", default=d.repo, help="git repository to use (default: megaocto's own sources "
                                                       "replayed as a history)")
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary (default: %(default)s)")
    parser.add_argument("--seq-length", type=int, default=d.seq_length, help="sequence length (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=d.iters, help="training steps (default: %(default)s)")
    parser.add_argument("--launcher", default=d.launcher, help="train through this launch script, e.g. "
                        "launch/finetune.sh (a local torchrun; default: in this process)")
    parser.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel processes of a --launcher run "
                                                               "(default: %(default)s)")
    parser.add_argument("--hf", action="store_true", help="export to Hugging Face format, load with transformers "
                                                          "and generate")
    parser.add_argument("--eval-limit", type=int, default=d.eval_limit, help="run the HumanEvalPack hook on this "
                        "many problems (default: %(default)s = skip)")
    parser.add_argument("--humanevalpack", default=d.humanevalpack, help="HumanEvalPack data directory "
                        "(default: $MEGAOCTO_HUMANEVALPACK, else ../shared/data/humanevalpack when present)")


def run(args) -> int:
    from megaocto.config.base import ConfigError
    from megaocto.demo import DemoConfig, run_demo

    cfg = DemoConfig(workdir=args.workdir, repo=args.repo, vocab_size=args.vocab_size,
                     seq_length=args.seq_length, iters=args.iters, extra=list(args._extra),
                     launcher=args.launcher, tp=args.tp, hf=args.hf, eval_limit=args.eval_limit,
                     humanevalpack=args.humanevalpack)
    try:
        summary = run_demo(cfg)
    except ConfigError as e:
        print(f"megaocto demo: config error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:  # e.g. too few commits, git missing
        print(f"megaocto demo: failed: {e} (outputs so far in {args.workdir})", file=sys.stderr)
        return 1
    return summary["exit_code"]
